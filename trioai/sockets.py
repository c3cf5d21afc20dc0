"""Plain-TCP reads and writes for the two paths every token takes: the engine's socket and the client's.

trio's ``SocketStream`` is general-purpose, and on these paths it does more than they need.
``receive_some`` tries the read first and waits only on ``EAGAIN``: an engine's socket usually has
no data yet (the next token is being computed), so that order costs a failed system call and an
exception per token. ``send_all`` passes a conflict detector, two context managers and trio's
try-then-wait socket helper (an async context manager of its own), and then yields to the
scheduler even when the kernel took every byte at once; trio-websocket, which writes every frame
through it, has already yielded once for its send lock. Under the paced load of ``bench.compare``
these layers were a tenth of the server's CPU (``docs/benchmarks.md``).

So here a read waits for readability and then reads, and a write writes and waits for writability
only when the kernel's buffer is full; OS errors become trio's stream errors as ``SocketStream``
raises them. The file descriptor is looked up on every call, never cached: a closed socket reports
-1 (``ClosedResourceError``) rather than a number the kernel may have given to another socket.
TLS streams are left to trio (``trio.SSLStream``).

For ``--workers`` (``workers.py``) it also binds listening sockets with ``SO_REUSEPORT``: several
processes, each with its own listener on one port, the kernel spreading new connections among them.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Final

import trio

DEFAULT_RECEIVE_SIZE: Final = 65536
# As trio's open_tcp_listeners: the kernel clamps it to net.core.somaxconn.
LISTEN_BACKLOG: Final = 0xFFFF
_CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})


def _fd(sock: trio.socket.SocketType) -> int:
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was already closed")
    return fd


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("the socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def read_socket(sock: trio.socket.SocketType, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes:
    """Up to ``max_bytes`` from a non-blocking socket (``b""`` at EOF): wait until readable, then read.

    A socket closed meanwhile raises ``trio.ClosedResourceError``, a broken connection
    ``trio.BrokenResourceError``.
    """
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    fd = _fd(sock)  # still ours after a wait: closing the socket wakes the wait with an error
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue  # readable was spurious
        except OSError as exc:
            raise _stream_error(exc) from exc


async def write_socket(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> None:
    """All of ``data`` to a non-blocking socket, waiting only while the kernel's buffer is full.

    A checkpoint for cancellation, but no yield when the kernel takes everything at once: a caller
    that writes in a loop must yield elsewhere (trio-websocket yields for its send lock before
    every frame). Cancelled while waiting, part of ``data`` may have been written.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    fd = _fd(sock)  # a closed socket is an error even with nothing to write; see read_socket
    with memoryview(data) as items, items.cast("B") as view:
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc
            view = view[sent:]


class ClientStream(trio.abc.HalfCloseableStream):
    """A client's TCP connection as trio-websocket sees it: a ``trio.SocketStream`` whose
    ``receive_some`` and ``send_all`` are :func:`read_socket` and :func:`write_socket`.

    Like ``SocketStream``, it refuses a send while another is in progress, and a send or
    ``send_eof`` racing one (trio-websocket sends under a lock; trio itself refuses two tasks
    waiting to read the same socket).
    """

    __slots__ = ("stream", "socket", "_sending")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._sending = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` (see :func:`write_socket`)."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        self._sending = True
        try:
            await write_socket(self.socket, data)
        finally:
            self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` (see :func:`read_socket`); ``b""`` once the client has closed its side."""
        return await read_socket(self.socket, DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket is writable."""
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Shut down the sending side."""
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await self.stream.send_eof()

    async def aclose(self) -> None:
        """Close the socket."""
        await self.stream.aclose()


def _passive_addresses(host: str, port: int) -> list[tuple[int, int, int, tuple[str | int, ...]]]:
    """``host``'s addresses to listen on (as ``trio.open_tcp_listeners`` resolves them), without repeats."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: list[tuple[int, int, int, tuple[str | int, ...]]] = []
    for family, kind, proto, _, address in infos:
        entry = (int(family), int(kind), proto, tuple(item for item in address if isinstance(item, str | int)))
        if entry not in seen:
            seen.append(entry)
    return seen


def _bind(family: int, kind: int, proto: int, address: tuple[str | int, ...], *, reuseport: bool) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def reuseport_sockets(host: str, port: int, *, listen: bool = True) -> list[socket.socket]:
    """Sockets on every address of ``host`` at ``port`` (not 0) with ``SO_REUSEPORT``, listening if ``listen``.

    Other sockets with ``SO_REUSEPORT`` of the same user may bind the same port; each listening one
    gets its share of new connections (by a hash of the client's address and port).
    Raises ``OSError`` (``EADDRINUSE``) when a socket without ``SO_REUSEPORT`` holds the port.
    """
    if port == 0:
        raise ValueError("SO_REUSEPORT listeners need a known port; see reserve_port")
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in _passive_addresses(host, port):
            sock = _bind(family, kind, proto, address, reuseport=True)
            sockets.append(sock)
            if listen:
                sock.listen(LISTEN_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def reserve_port(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """Check that ``port`` (0: any free one) is free on every address of ``host`` and hold it.

    Returns the port and sockets bound to it with ``SO_REUSEPORT`` but not listening: they get no
    connections, but keep the port for the workers (and for a worker restarted after all died).
    The check binds without ``SO_REUSEPORT`` first, so a port already served by another program,
    even one using ``SO_REUSEPORT`` itself, is an ``OSError`` (``EADDRINUSE``) here rather than a
    port silently shared with it.
    """
    for family, kind, proto, address in _passive_addresses(host, port):
        if port != 0:
            address = (address[0], port, *address[2:])
        with _bind(family, kind, proto, address, reuseport=False) as probe:
            port = int(probe.getsockname()[1])  # the first address of port 0 picks it; the others follow
    return port, reuseport_sockets(host, port, listen=False)
