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

import errno
import functools
import ipaddress
import math
import os
import socket as stdlib_socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, cast

import h11
import httpx
import trio

from .sockets import read_socket, write_socket

READ_SIZE: Final = 65536
_perf_counter = time.perf_counter
# Below uvicorn's (so vLLM's) 5 s keep-alive timeout: never reuse a connection the engine is closing.
DEFAULT_KEEPALIVE_EXPIRY: Final = 4.0
#: A request extension: a callable run once the request's bytes are written (before the answer).
REQUEST_WRITTEN: Final = "trioai.request_written"


class _Connection:
    """One HTTP/1.1 connection: its socket, the TLS stream over it if any, and h11's state."""

    __slots__ = ("origin", "socket", "receive", "send", "h11", "idle_since", "read_at", "connecting")

    def __init__(self, origin: tuple[bytes, bytes, int], socket: trio.socket.SocketType,
                 tls: trio.SSLStream[trio.SocketStream] | None = None):
        self.origin = origin
        self.socket = socket
        # Plain TCP reads and writes straight on the socket (see sockets.py): this is the per-token read.
        self.receive: Callable[[int], Awaitable[bytes | bytearray]] = (
            functools.partial(read_socket, socket) if tls is None else tls.receive_some
        )
        self.send: Callable[[bytes], Awaitable[None]] = (
            functools.partial(write_socket, socket) if tls is None else tls.send_all
        )
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.read_at = 0.0  # time.perf_counter() of the latest socket read (relay-latency samples)
        # The TCP connect was started but not seen to complete: the request's write waits for it, and
        # an error or timeout there is the connect's (see _connect_tcp).
        self.connecting = False

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
            await self._send_request(conn, request, timeouts.get("connect" if conn.connecting else "write"))
            _written(request)
        except BaseException:
            self._discard(conn)
            raise
        return await self._respond(conn, request)

    def send_now(self, request: httpx.Request) -> SentRequest | None:
        """Write ``request`` without waiting, on an idle pooled connection or a new one to an IP
        address (plain HTTP); None (nothing sent) when that is not possible: TLS, a host name to
        resolve, no free connection slot, a body that is not in memory.

        What the kernel does not take at once is written by :meth:`SentRequest.response`, which reads
        the answer.
        This is how a generation's first request is written in the step that took its frame
        (``Gateway.begin``): in a burst, every yield before the write makes the request wait for a
        pass over all the others.
        """
        url = request.url
        if self._closed or url.scheme != "http" or not isinstance(request.stream, httpx.ByteStream):
            return None
        origin = (url.raw_scheme, url.raw_host, url.port or 80)
        conn = self._take_idle(origin) or self._open_now(origin)
        if conn is None:
            return None
        data = _request_bytes(conn, request, [request.read()])
        try:
            written = os.write(conn.socket.fileno(), data)
        except BlockingIOError:
            written = 0
        except OSError:  # the engine closed it meanwhile, or it broke: the caller takes the usual path
            self._discard(conn)
            return None
        if written:
            conn.connecting = False  # the kernel took bytes: the connect is over
        if written == len(data):
            _written(request)
        return SentRequest(self, conn, request, data[written:])

    def _open_now(self, origin: tuple[bytes, bytes, int]) -> _Connection | None:
        """A new plain-HTTP connection to an IP address, its connect started (see :func:`_connect_tcp`);
        None when no slot is free, the host is a name, or the connect failed at once."""
        family = _ip_family(origin[1])
        if family is None:
            return None
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return None
        try:
            sock, pending = _start_connect(family, origin[1], origin[2])
        except OSError:
            self._slots.release()
            return None
        conn = _Connection(origin, sock)
        conn.connecting = pending
        return conn

    async def _respond(self, conn: _Connection, request: httpx.Request, unsent: bytes = b"") -> httpx.Response:
        """Write what is left of ``request`` on ``conn``, then read the answer's head."""
        timeouts = request.extensions.get("timeout", {})
        try:
            if unsent:
                await self._write(conn, request, unsent, timeouts.get("write"))
                _written(request)
            head = await self._receive_head(conn, request, timeouts.get("read"))
        except BaseException:
            self._discard(conn)
            raise
        body = ResponseBody(self, conn, request, timeouts.get("read"))
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
        # A free slot is taken without a schedule point: in a burst of new requests, each yield here
        # would make every request wait for a pass over all the others before it is sent.
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(_seconds(timeouts.get("pool"))) as waiting:
                await self._slots.acquire()
            if waiting.cancelled_caught:
                raise httpx.PoolTimeout("no connection to the engine became free in time", request=request) from None
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            scheme, host, port = origin
            with trio.move_on_after(_seconds(timeouts.get("connect"))) as connecting:
                try:
                    # Plain HTTP to an address: the request is written while the connection completes.
                    sock, pending = await _connect_tcp(host, port, wait=scheme == b"https")
                except OSError as exc:
                    raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
                tls = None
                if scheme == b"https":
                    context = self._ssl_context or ssl.create_default_context()
                    tls = trio.SSLStream(trio.SocketStream(sock), context, server_hostname=host.decode("ascii"),
                                         https_compatible=True)
                    try:
                        await tls.do_handshake()
                    except (trio.BrokenResourceError, ssl.SSLError) as exc:
                        sock.close()
                        raise httpx.ConnectError(f"TLS handshake failed: {exc}", request=request) from exc
            if connecting.cancelled_caught:
                raise httpx.ConnectTimeout("connecting to the engine timed out", request=request)
            conn = _Connection(origin, sock, tls)
            conn.connecting = pending
            return conn
        except BaseException:
            self._slots.release()
            raise

    async def _send_request(self, conn: _Connection, request: httpx.Request, write_timeout: float | None) -> None:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        await self._write(conn, request, _request_bytes(conn, request, [chunk async for chunk in request.stream]),
                          write_timeout)

    async def _write(self, conn: _Connection, request: httpx.Request, data: bytes, write_timeout: float | None) -> None:
        with trio.move_on_after(_seconds(write_timeout)) as writing:
            try:
                await conn.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if conn.connecting:  # the connect failed (refused, unreachable): say so, as before
                    cause = exc.__cause__ or exc
                    raise httpx.ConnectError(str(cause) or type(cause).__name__, request=request) from exc
                raise httpx.WriteError(f"sending to the engine failed: {exc}", request=request) from exc
        if writing.cancelled_caught:
            if conn.connecting:
                raise httpx.ConnectTimeout("connecting to the engine timed out", request=request)
            raise httpx.WriteTimeout("sending to the engine timed out", request=request)
        conn.connecting = False

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


class SentRequest:
    """A request :meth:`H11Transport.send_now` wrote (or began to write) on a pooled or new connection.

    Exactly one of :meth:`response` (write the rest, read the answer) or :meth:`abandon` (close
    the connection) should follow; both are safe to call again, and after each other.
    """

    __slots__ = ("request", "_transport", "_conn", "_unsent")

    def __init__(self, transport: H11Transport, conn: _Connection, request: httpx.Request, unsent: bytes) -> None:
        self.request = request
        self._transport = transport
        self._conn: _Connection | None = conn
        self._unsent = unsent

    async def response(self) -> httpx.Response:
        """The answer, as :meth:`H11Transport.handle_async_request` returns it (httpx's errors too)."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise httpx.StreamClosed()
        return await self._transport._respond(conn, self.request, self._unsent)

    def abandon(self) -> None:
        """Close the connection unless :meth:`response` took it: the engine sees the request end."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._discard(conn)


def _request_bytes(conn: _Connection, request: httpx.Request, body: list[bytes]) -> bytes:
    """``request``'s head and ``body`` as h11 frames them on ``conn``."""
    send = conn.h11.send
    parts = [send(h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw))]
    parts.extend(send(h11.Data(data=chunk)) for chunk in body if chunk)
    parts.append(send(h11.EndOfMessage()))
    return b"".join(part for part in parts if part)


def _written(request: httpx.Request) -> None:
    """Run the request's :data:`REQUEST_WRITTEN` callback, if it has one."""
    written = request.extensions.get(REQUEST_WRITTEN)
    if written is not None:
        written()


class ResponseBody(httpx.AsyncByteStream):
    """A response body as it arrives; closing it early closes the connection."""

    def __init__(self, transport: H11Transport, conn: _Connection, request: httpx.Request,
                 read_timeout: float | None) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._request = request
        self._read_timeout = read_timeout
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (data := await self.next_data()) is not None:
            yield data

    async def next_data(self) -> bytes | None:
        """The body's next bytes as they arrive, None at its end: what iterating yields, as a plain
        coroutine (``upstream.ChatStream`` calls it per engine read, without two generator layers)."""
        conn = self._conn
        if conn is None or self._complete:
            if self._complete:
                return None
            raise httpx.StreamClosed()
        request = self._request
        timeout = self._read_timeout
        if timeout is None:
            event = await _next_event(conn, request)
        else:
            with trio.move_on_after(timeout) as reading:
                event = await _next_event(conn, request)
            if reading.cancelled_caught:
                raise httpx.ReadTimeout("the engine sent nothing in time", request=request)
        if type(event) is h11.Data:
            return bytes(event.data)
        if type(event) is h11.EndOfMessage:
            self._complete = True
            return None
        raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in the response body", request=request)

    @property
    def read_at(self) -> float | None:
        """``time.perf_counter()`` of the latest read of this response's bytes from the socket."""
        return self._conn.read_at if self._conn is not None else None

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
            data = await conn.receive(READ_SIZE)
            conn.read_at = _perf_counter()
            conn.h11.receive_data(cast(bytes, data))
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.ReadError(f"reading from the engine failed: {exc}", request=request) from exc


async def _connect_tcp(host: bytes, port: int, *, wait: bool = True) -> tuple[trio.socket.SocketType, bool]:
    """A TCP connection to ``host`` (``TCP_NODELAY`` set), and whether it may still be completing;
    for an IP address (the usual engine URL) one plain connect.

    ``trio.open_tcp_stream`` resolves the name and races the addresses it finds (happy eyeballs)
    in a nursery of its own; for a single literal address that is half the CPU of a new engine
    connection, which a burst of new requests pays one after another. Without ``wait`` the connect
    is only started (a non-blocking ``connect`` says ``EINPROGRESS`` even on loopback, where the
    handshake is in fact done by then): the first write waits until the socket is writable, and
    fails with the connect's error if it failed, so a new connection costs no schedule point.
    """
    family = _ip_family(host)
    if family is None:
        stream = await trio.open_tcp_stream(host.decode("ascii"), port)  # sets TCP_NODELAY
        return stream.socket, False
    if not wait:
        sock, pending = _start_connect(family, host, port)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            sock.close()
            raise
        return sock, pending
    sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, True)
        await sock.connect((host.decode("ascii"), port))
    except BaseException:
        sock.close()
        raise
    return sock, False


def _start_connect(family: int, host: bytes, port: int) -> tuple[trio.socket.SocketType, bool]:
    """A TCP connect to the IP address ``host`` started (``TCP_NODELAY`` set), and whether it may
    still be completing (see :func:`_connect_tcp`); ``OSError`` when it failed at once."""
    raw = stdlib_socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        raw.setblocking(False)
        raw.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, True)
        address = (host.decode("ascii"), port)
        code = raw.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, f"Error connecting to {address!r}: {os.strerror(code)}")
    except BaseException:
        raw.close()
        raise
    return trio.socket.from_stdlib_socket(raw), code != 0


@functools.lru_cache(maxsize=256)
def _ip_family(host: bytes) -> int | None:
    """``AF_INET`` or ``AF_INET6`` for an IP address, None for a host name (asked once per host:
    ``ipaddress`` takes microseconds, and every new engine connection asks)."""
    try:
        version = ipaddress.ip_address(host.decode("ascii")).version
    except ValueError:
        return None
    return stdlib_socket.AF_INET6 if version == 6 else stdlib_socket.AF_INET


def _seconds(timeout: float | None) -> float:
    return math.inf if timeout is None else timeout
