"""systemd integration: readiness and watchdog notifications, and socket activation.

Both protocols are small and stable, so they are written here rather than pulled in:

- ``sd_notify``: one datagram per state change (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``,
  ``STATUS=...``) to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the
  abstract namespace). Without ``$NOTIFY_SOCKET`` every call is a no-op.
- Socket activation: systemd passes listening sockets as file descriptors 3, 4, ... and says how
  many in ``$LISTEN_FDS``, for the process ``$LISTEN_PID``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from typing import Final

import trio

log = logging.getLogger("trioai.systemd")

SD_LISTEN_FDS_START: Final = 3


class Notifier:
    """Sends ``sd_notify`` messages to systemd (or does nothing when not run by systemd)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_interval: float | None = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        """True when systemd is listening for notifications."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False if there is no socket or it failed.

        Never blocks: the datagram is sent with ``MSG_DONTWAIT``, so a stuck systemd cannot stall
        the event loop (a lost ``WATCHDOG=1`` is what the watchdog is for).
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", assignments[0] if assignments else "", exc)
            return False
        return True

    async def run_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` until cancelled.

        A Trio task: if the event loop stalls, the pings stop and systemd restarts the service.
        Returns at once when the watchdog is not enabled for this process.
        """
        if self.watchdog_interval is None or self.address is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


def inherited_sockets(env: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed to this process (empty when not socket-activated).

    Removes ``LISTEN_*`` from ``env`` (default ``os.environ``) so that child processes, such as the
    embedded engine, do not think the sockets are theirs; marks the descriptors close-on-exec.
    """
    env = os.environ if env is None else env
    pid = env.pop("LISTEN_PID", "")
    count = env.pop("LISTEN_FDS", "")
    env.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ValueError(f"socket-activated fd {fd} is not a stream socket")
        sockets.append(sock)
    return sockets


def listeners_from(sockets: list[socket.socket]) -> list[trio.SocketListener]:
    """Trio listeners over already-listening stdlib sockets."""
    listeners = []
    for sock in sockets:
        sock.setblocking(False)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners
