"""The client's address behind a reverse proxy (``--trusted-proxies``), sans I/O.

A TCP peer inside a trusted network is a proxy (Nginx) that names the client in its request
headers. Nginx's ``$proxy_add_x_forwarded_for`` *appends* the address it saw to whatever
``X-Forwarded-For`` the client sent, so only the right end of the list is trustworthy: the client
is the right-most address that is not itself a trusted proxy (a chain of trusted proxies is walked
through). Without ``X-Forwarded-For``, ``X-Real-IP`` names it. Headers from any other peer are
ignored: anyone can send them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: str | None, headers: Sequence[tuple[bytes, bytes]], trusted: Sequence[Network]) -> str | None:
    """The client's address: from the proxy headers when ``peer`` is a trusted proxy, else ``peer``.

    ``headers`` are the request's raw (name, value) pairs. An address is returned in its canonical
    form (``::FFFF:1.2.3.4`` and ``::ffff:1.2.3.4`` are one client).
    """
    peer_ip = parse_address(peer) if peer is not None else None
    if peer_ip is None or not _is_trusted(peer_ip, trusted):
        return peer
    forwarded = [v for n, v in headers if n.lower() == b"x-forwarded-for"]
    if forwarded:
        hops = b",".join(forwarded).decode("latin-1").split(",")
        nearest = peer_ip
        for hop in reversed(hops):
            ip = parse_address(hop)
            if ip is None:
                break  # garbage the client wrote: it names no one; keep the last hop we could trust
            if not _is_trusted(ip, trusted):
                return str(ip)
            nearest = ip
        return str(nearest)
    real = [v for n, v in headers if n.lower() == b"x-real-ip"]
    if real:
        ip = parse_address(real[-1].decode("latin-1"))
        if ip is not None:
            return str(ip)
    return str(peer_ip)


def parse_address(text: str) -> IPAddress | None:
    """An IP address from a header entry (``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80``, ``::1``), or None."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_trusted(ip: IPAddress, trusted: Sequence[Network]) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d
    return any(ip in network for network in trusted)
