"""An HTTP/1.1 transport for httpx on Trio, built on h11: the engine connection's per-token path.

Why not httpx's default transport (httpcore): under the paced load of ``bench.compare`` each SSE
event arrives in its own socket read, and httpcore spends per read five async-generator layers,
two exception-mapping context managers and a ``fail_after`` scope around ``receive_some``; the
profile put about a quarter of the server's CPU there (``docs/benchmarks.md``). This transport is
httpx's documented extension point, so httpx still builds the requests, owns the ``Response`` and
raises its own exception types; a body read here is one ``receive_some`` and h11's parser.

What it does: HTTP/1.1 over TCP or TLS to the origins it is asked for, a keep-alive pool of idle
connections (reused newest first, after a check that the engine has not closed them, and closed
after ``keepalive_expiry``), at most ``max_connections`` open at once (waiting for one is bounded
by the pool timeout). No proxies, no HTTP/2. A response whose body was not read to its end is
closed with its connection, which is how an engine learns that the client went away.

Timeouts come from the request (httpx's ``Timeout``): connect (TCP and TLS handshake), write,
pool, and read for each wait for data; ``read=None`` leaves body reads to the caller, who bounds
the whole stream with one cancel scope (``upstream.ChatStream``) instead of one per read.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import socket as stdlib_socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, cast

import h11
import httpx
import trio

from .sockets import read_socket, write_socket

READ_SIZE: Final = 65536
# Below uvicorn's (so vLLM's) 5 s keep-alive timeout: never reuse a connection the engine is closing.
DEFAULT_KEEPALIVE_EXPIRY: Final = 4.0


class _Connection:
    """One HTTP/1.1 connection: the byte stream, its socket and h11's state."""

    __slots__ = ("origin", "stream", "socket", "receive", "send", "h11", "idle_since")

    def __init__(self, origin: tuple[bytes, bytes, int], stream: trio.abc.Stream, socket: trio.socket.SocketType):
        self.origin = origin
        self.stream = stream
        self.socket = socket
        # Plain TCP reads and writes straight on the socket (see sockets.py): this is the per-token read.
        plain = isinstance(stream, trio.SocketStream)
        self.receive: Callable[[int], Awaitable[bytes | bytearray]] = (
            functools.partial(read_socket, socket) if plain else stream.receive_some
        )
        self.send: Callable[[bytes], Awaitable[None]] = (
            functools.partial(write_socket, socket) if plain else stream.send_all
        )
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def close(self) -> None:
        """Close at once (no TLS close_notify): synchronous, so it is safe in ``finally`` and when cancelled."""
        self.socket.close()


class H11Transport(httpx.AsyncBaseTransport):
    """httpx transport: HTTP/1.1 on Trio with h11 and a keep-alive pool (see the module doc)."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False

    @property
    def connections_open(self) -> int:
        """Connections open now, in use or idle."""
        return self._max_connections - self._slots.value

    @property
    def connections_idle(self) -> int:
        """Open connections waiting in the pool for a request."""
        return len(self._idle)

    def close_expired(self) -> int:
        """Close idle connections past ``keepalive_expiry`` or closed by the engine; how many.

        Taking a connection checks this too; calling it now and then (the server's sweeper does)
        also frees the sockets of a pool nobody draws from.
        """
        now = trio.current_time()
        keep = []
        for conn in self._idle:
            if self._spent(conn, now):
                self._discard(conn)
            else:
                keep.append(conn)
        closed = len(self._idle) - len(keep)
        self._idle = keep
        return closed

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close with their responses."""
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())
        await trio.lowlevel.checkpoint()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled or new connection; the body streams as it is read."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
        origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.scheme == "https" else 80))
        conn = self._take_idle(origin)
        if conn is None:
            conn = await self._open(request, origin, timeouts)
        try:
            await self._send_request(conn, request, timeouts.get("write"))
            head = await self._receive_head(conn, request, timeouts.get("read"))
        except BaseException:
            self._discard(conn)
            raise
        body = _ResponseBody(self, conn, request, timeouts.get("read"))
        return httpx.Response(
            status_code=head.status_code,
            headers=head.headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
        )

    def _take_idle(self, origin: tuple[bytes, bytes, int]) -> _Connection | None:
        now = trio.current_time()
        idle = self._idle
        for index in range(len(idle) - 1, -1, -1):
            conn = idle[index]
            if conn.origin != origin:
                continue
            del idle[index]
            if self._spent(conn, now):
                self._discard(conn)
                continue
            return conn
        return None

    def _spent(self, conn: _Connection, now: float) -> bool:
        """Whether an idle connection must not be reused: past its expiry, or readable, which for
        an idle connection means the engine closed it (EOF) or broke it."""
        return now - conn.idle_since > self.keepalive_expiry or conn.socket.is_readable()

    async def _open(self, request: httpx.Request, origin: tuple[bytes, bytes, int],
                    timeouts: dict[str, float | None]) -> _Connection:
        pool_timeout = timeouts.get("pool")
        with trio.move_on_after(_seconds(pool_timeout)) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise httpx.PoolTimeout("no connection to the engine became free in time", request=request)
        try:
            scheme, host, port = origin
            with trio.move_on_after(_seconds(timeouts.get("connect"))) as connecting:
                try:
                    tcp = await _connect_tcp(host.decode("ascii"), port)
                except OSError as exc:
                    raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
                stream: trio.abc.Stream = tcp
                if scheme == b"https":
                    context = self._ssl_context or ssl.create_default_context()
                    tls = trio.SSLStream(tcp, context, server_hostname=host.decode("ascii"), https_compatible=True)
                    try:
                        await tls.do_handshake()
                    except (trio.BrokenResourceError, ssl.SSLError) as exc:
                        tcp.socket.close()
                        raise httpx.ConnectError(f"TLS handshake failed: {exc}", request=request) from exc
                    stream = tls
            if connecting.cancelled_caught:
                raise httpx.ConnectTimeout("connecting to the engine timed out", request=request)
            return _Connection(origin, stream, tcp.socket)
        except BaseException:
            self._slots.release()
            raise

    async def _send_request(self, conn: _Connection, request: httpx.Request, write_timeout: float | None) -> None:
        target = request.url.raw_path
        parts = [conn.h11.send(h11.Request(method=request.method, target=target, headers=request.headers.raw))]
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for chunk in request.stream:
            parts.append(conn.h11.send(h11.Data(data=chunk)))
        parts.append(conn.h11.send(h11.EndOfMessage()))
        with trio.move_on_after(_seconds(write_timeout)) as writing:
            try:
                await conn.send(b"".join(p for p in parts if p))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.WriteError(f"sending to the engine failed: {exc}", request=request) from exc
        if writing.cancelled_caught:
            raise httpx.WriteTimeout("sending to the engine timed out", request=request)

    async def _receive_head(self, conn: _Connection, request: httpx.Request,
                            read_timeout: float | None) -> h11.Response:
        with trio.move_on_after(_seconds(read_timeout)) as reading:
            while True:
                event = await _next_event(conn, request)
                if isinstance(event, h11.Response):
                    return event
                if not isinstance(event, h11.InformationalResponse):
                    raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} from the engine",
                                                    request=request)
        assert reading.cancelled_caught
        raise httpx.ReadTimeout("the engine sent no response in time", request=request)

    def _release(self, conn: _Connection, reusable: bool) -> None:
        """A response is over: pool its connection when the exchange ended cleanly, else close it."""
        # With requests waiting for a slot, free one rather than keep an idle connection they cannot take.
        if (reusable and not self._closed and not self._slots.statistics().tasks_waiting
                and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE):
            conn.h11.start_next_cycle()
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            self._discard(conn)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._slots.release()


class _ResponseBody(httpx.AsyncByteStream):
    """A response body as it arrives; closing it early closes the connection."""

    def __init__(self, transport: H11Transport, conn: _Connection, request: httpx.Request,
                 read_timeout: float | None) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._request = request
        self._read_timeout = read_timeout
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        request = self._request
        timeout = self._read_timeout
        while True:
            if timeout is None:
                event = await _next_event(conn, request)
            else:
                with trio.move_on_after(timeout) as reading:
                    event = await _next_event(conn, request)
                if reading.cancelled_caught:
                    raise httpx.ReadTimeout("the engine sent nothing in time", request=request)
            if type(event) is h11.Data:
                yield bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                self._complete = True
                return
            else:
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in the response body",
                                                request=request)

    async def aclose(self) -> None:
        """Give the connection back to the pool if the body was read to its end; else close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._release(conn, self._complete)
        await trio.lowlevel.checkpoint()


async def _next_event(conn: _Connection, request: httpx.Request) -> object:
    """The next h11 event of the response (head or body), reading as needed; errors as httpx's."""
    try:
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.h11.receive_data(cast(bytes, await conn.receive(READ_SIZE)))
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.ReadError(f"reading from the engine failed: {exc}", request=request) from exc


async def _connect_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``; for an IP address (the usual engine URL) one plain connect.

    ``trio.open_tcp_stream`` resolves the name and races the addresses it finds (happy eyeballs)
    in a nursery of its own; for a single literal address that is half the CPU of a new engine
    connection, which a burst of new requests pays one after another.
    """
    try:
        family = stdlib_socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else stdlib_socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _seconds(timeout: float | None) -> float:
    return math.inf if timeout is None else timeout
