"""Handshake-time limits: the connection cap under a burst, and whom rate limits count against."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url, wrap_client_stream

from trioai.clientaddr import Network, client_address, parse_address
from trioai.server import CHAT_PATH, RunningServer

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, send

LOCAL: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
NETS: tuple[Network, ...] = (ipaddress.ip_network("10.0.0.0/8"), *LOCAL)


def h(**values: str) -> list[tuple[bytes, bytes]]:
    """Request headers from keyword arguments (``x_forwarded_for`` → ``X-Forwarded-For``)."""
    return [(name.replace("_", "-").title().encode(), value.encode()) for name, value in values.items()]


# client_address: the pure header logic.


def test_untrusted_peer_is_the_client_whatever_it_sends() -> None:
    headers = h(x_forwarded_for="198.51.100.1", x_real_ip="198.51.100.2")
    assert client_address("203.0.113.9", headers, NETS) == "203.0.113.9"
    assert client_address("127.0.0.1", headers, ()) == "127.0.0.1"  # no trusted proxies: the default


def test_trusted_peer_names_the_right_most_untrusted_hop() -> None:
    # The client claimed 1.1.1.1; Nginx appended the address it saw (203.0.113.5).
    assert client_address("127.0.0.1", h(x_forwarded_for="1.1.1.1, 203.0.113.5"), NETS) == "203.0.113.5"
    # A chain of trusted proxies is walked through.
    headers = h(x_forwarded_for="1.1.1.1, 203.0.113.5, 10.1.2.3")
    assert client_address("127.0.0.1", headers, NETS) == "203.0.113.5"
    # Several header lines are one list, in order.
    headers = [(b"x-forwarded-for", b"1.1.1.1"), (b"X-Forwarded-For", b"203.0.113.5, 10.0.0.1")]
    assert client_address("127.0.0.1", headers, NETS) == "203.0.113.5"


def test_all_trusted_hops_give_the_left_most() -> None:
    assert client_address("127.0.0.1", h(x_forwarded_for="10.0.0.7, 10.0.0.1"), NETS) == "10.0.0.7"


def test_garbage_hop_stops_the_walk_at_the_last_trusted_hop() -> None:
    assert client_address("127.0.0.1", h(x_forwarded_for="1.1.1.1, nonsense, 10.0.0.2"), NETS) == "10.0.0.2"
    assert client_address("127.0.0.1", h(x_forwarded_for="nonsense"), NETS) == "127.0.0.1"


def test_x_real_ip_only_without_x_forwarded_for() -> None:
    assert client_address("::1", h(x_real_ip="2001:db8::7"), NETS) == "2001:db8::7"
    assert client_address("::1", h(x_real_ip="garbage"), NETS) == "::1"
    assert client_address("::1", h(x_real_ip="2001:db8::7", x_forwarded_for="203.0.113.5"), NETS) == "203.0.113.5"
    assert client_address("::1", [], NETS) == "::1"


def test_addresses_with_ports_mapped_and_canonical_forms() -> None:
    assert client_address("::ffff:127.0.0.1", h(x_forwarded_for="203.0.113.5:4711"), LOCAL) == "203.0.113.5"
    assert client_address("127.0.0.1", h(x_forwarded_for="[2001:DB8::1]:443"), LOCAL) == "2001:db8::1"
    assert client_address(None, h(x_forwarded_for="203.0.113.5"), LOCAL) is None
    assert parse_address(" 10.0.0.1 ") == ipaddress.ip_address("10.0.0.1")
    assert parse_address("unknown") is None


# The same, end to end: whom a handshake's rate limits count against.


@asynccontextmanager
async def connect_from(
    source: str, server: RunningServer, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket whose TCP connection comes from ``source`` (any 127.x.y.z works on Linux)."""
    stream = await trio.open_tcp_stream(server.host, server.port, local_address=source)
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, server.host, CHAT_PATH, extra_headers=headers or [])
        try:
            yield ws
        finally:
            await ws.aclose()


async def first_request_passes(ws: WebSocketConnection) -> None:
    await send(ws, chat("hi", max_tokens=2, id="first"))
    assert (await collect_until_terminal(ws, {"first"}))["first"][-1]["type"] == "done"


async def second_request_is_rate_limited(ws: WebSocketConnection) -> None:
    await send(ws, chat("hi", max_tokens=2, id="second"))
    assert (await collect_until_terminal(ws, {"second"}))["second"][-1]["code"] == "rate_limited"


async def test_forged_forwarding_headers_from_an_untrusted_peer_are_ignored(start_gateway: StartGateway) -> None:
    server = await start_gateway(rate_limit_requests=1, trusted_proxies="127.0.0.1")
    headers = [(b"X-Forwarded-For", b"198.51.100.1"), (b"X-Real-IP", b"198.51.100.1")]
    async with connect_from("127.0.0.2", server, headers) as ws:
        assert {s.client for s in server.server.sessions} == {"127.0.0.2"}
        await first_request_passes(ws)
    headers = [(b"X-Forwarded-For", b"198.51.100.2"), (b"X-Real-IP", b"198.51.100.2")]  # a "new client"
    async with connect_from("127.0.0.2", server, headers) as ws:
        assert {s.client for s in server.server.sessions} == {"127.0.0.2"}
        await second_request_is_rate_limited(ws)


async def test_a_trusted_proxy_names_the_client(start_gateway: StartGateway, caplog: pytest.LogCaptureFixture) -> None:
    server = await start_gateway(rate_limit_requests=1, trusted_proxies="127.0.0.1, ::1")
    caplog.set_level(logging.INFO, logger="trioai.server")
    for client in ("198.51.100.1", "198.51.100.2"):
        async with connect_from("127.0.0.1", server, [(b"X-Real-IP", client.encode())]) as ws:
            assert client in {s.client for s in server.server.sessions}
            await first_request_passes(ws)
            await second_request_is_rate_limited(ws)
    opened = [r.getMessage() for r in caplog.records if " open " in r.getMessage()]
    assert len(opened) == 2
    assert "peer=198.51.100.1 via=127.0.0.1:" in opened[0] and "peer=198.51.100.2 via=127.0.0.1:" in opened[1]


# The connection cap under a burst of handshakes.


async def test_connection_cap_holds_under_a_burst_of_handshakes(start_gateway: StartGateway) -> None:
    cap, burst = 5, 100
    server = await start_gateway(max_connections=cap)
    accepted = 0
    rejected: list[int] = []
    settled, release = trio.Event(), trio.Event()

    def one_settled() -> None:
        if accepted + len(rejected) == burst:
            settled.set()

    async def client() -> None:
        nonlocal accepted
        try:
            async with open_websocket_url(server.url):
                accepted += 1
                one_settled()
                await release.wait()
        except ConnectionRejected as exc:
            rejected.append(exc.status_code)
            one_settled()

    async with trio.open_nursery() as clients:
        for _ in range(burst):
            clients.start_soon(client)
        with trio.fail_after(30):
            await settled.wait()
        open_now = server.server.open_connections
        release.set()
    assert (accepted, open_now) == (cap, cap)
    assert rejected == [503] * (burst - cap)
    # Every slot came back: a new connection gets in once the burst is gone.
    with trio.fail_after(5):
        while server.server.open_connections:
            await trio.sleep(0.01)
    async with open_websocket_url(server.url) as ws:
        await first_request_passes(ws)
