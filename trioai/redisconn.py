"""One Redis connection whose callers read their own answers: the connection :mod:`trioai.redisstate`
sends its scripts and plain commands on.

Why not a coredis connection: coredis runs a reader and a writer task per connection, so one
request is three task wake-ups (the caller hands its command to the writer, the reader parses the
answer and wakes the caller) and passes AnyIO's layers each way; paced as a generation's appends
are, that is most of the gateway's CPU per round trip (``bench.redisfloor``). Here the caller sends
its command and reads the answer itself: one wake-up, when the answer arrives. Over plain TCP or a
Unix socket the reads and writes go straight to the socket (:mod:`trioai.sockets`, as the engine's
and the client's do), over TLS through ``trio.SSLStream``.

The RESP is coredis's own (its packer and its parser, so answers and errors, ``MovedError`` and
``NoScriptError`` included, are what the rest of the client gets), and so is where to connect and
how to authenticate (the pool's location and connection settings); this module only does the I/O.

Several tasks share it, and their requests are pipelined: each writes its command at once (a send
lock only orders whole commands) and the answers come back in that order. The task at the head of
the line that finds nobody reading reads, hands every answer it parses to its waiter, and when its
own has come wakes the next waiter to read on: no reader task, and a request alone wakes once. A
request cannot be abandoned half-way, which would leave its answer for the next caller: it runs
shielded from cancellation, under its own deadline (the state's timeout), so a cancelled caller
waits at most that long; a request that fails or runs out of time breaks the connection (every
request in flight fails, :attr:`usable` turns False, and the owner opens another).
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Final, cast

import coredis.exceptions
import trio
from coredis._packer import Packer  # coredis's RESP encoder (not exported; coredis is pinned < 7)
from coredis.connection import Location, TCPLocation, UnixDomainSocketLocation
from coredis.parser import NotEnoughData, Parser

from .sockets import read_socket, write_socket

#: Bytes asked of the socket per read.
RECEIVE_SIZE: Final = 65536
#: RESP3 (what coredis speaks, so that scripts' answers have the same types on both paths).
PROTOCOL: Final = 3


class _Waiter:
    """One request in flight: its answer once read (an exception for an error answer or a broken
    connection), and the event that wakes its task (with the answer, or to read on)."""

    __slots__ = ("answer", "done", "woken")

    def __init__(self) -> None:
        self.answer: object = None
        self.done = False
        self.woken = trio.Event()


class RedisConnection:
    """A connection to one Redis server (see the module docstring); open with :meth:`open`."""

    __slots__ = ("location", "timeout", "usable", "_tls", "_socket", "_packer", "_parser", "_send_lock",
                 "_waiters", "_reading")

    def __init__(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream], location: Location,
                 timeout: float) -> None:
        self.location = location
        self.timeout = timeout
        self.usable = True
        self._tls = stream if isinstance(stream, trio.SSLStream) else None
        self._socket = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
        self._packer = Packer("utf-8")
        self._parser = Parser()
        self._send_lock = trio.StrictFIFOLock()
        self._waiters: deque[_Waiter] = deque()  # in the order their commands were written
        self._reading = False

    @classmethod
    async def open(cls, location: Location, *, seconds: float, username: str | None = None,
                   password: str | None = None, db: int | None = None,
                   ssl_context: ssl.SSLContext | None = None) -> RedisConnection:
        """Connect to ``location`` and greet it (``HELLO 3``, with ``AUTH`` if a password is
        given, then ``SELECT`` a database other than 0), within ``seconds`` in all; each later
        request has ``seconds`` too."""
        with trio.fail_after(seconds):
            stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
            if isinstance(location, TCPLocation):
                stream = await trio.open_tcp_stream(location.host, location.port)  # sets TCP_NODELAY
                if ssl_context is not None:
                    stream = trio.SSLStream(stream, ssl_context, server_hostname=location.host)
            elif isinstance(location, UnixDomainSocketLocation):
                stream = await trio.open_unix_socket(location.path)
            else:
                raise ValueError(f"cannot connect to {location!r}")
            connection = cls(stream, location, seconds)
            try:
                hello: list[str | int] = [PROTOCOL]
                if password is not None:
                    hello += ["AUTH", username or "default", password]
                await connection.request(b"HELLO", *hello)
                if db:
                    await connection.request(b"SELECT", db)
            except BaseException:
                connection.close()
                raise
        return connection

    async def request(self, command: bytes, *args: str | bytes | int | float) -> object:
        """``command``'s answer (text decoded as UTF-8); an error answer raised as coredis's exception
        for it. :class:`coredis.exceptions.ConnectionError` if the connection is or becomes broken,
        :class:`trio.TooSlowError` (the connection then broken) past :attr:`timeout`."""
        data = b"".join(self._packer.pack_command(command, *args))
        if not self.usable:
            raise coredis.exceptions.ConnectionError(f"the connection to {self.location!r} is closed")
        waiter = _Waiter()
        try:
            with trio.CancelScope(shield=True), trio.fail_after(self.timeout):
                await self._send(data, waiter)
                while not waiter.done:
                    if self._reading:
                        await waiter.woken.wait()
                        if not waiter.done:
                            waiter.woken = trio.Event()
                    else:
                        await self._read()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break(f"connection to {self.location!r} lost: {exc!r}")
            raise coredis.exceptions.ConnectionError(f"connection to {self.location!r} lost: {exc!r}") from exc
        except BaseException as exc:
            self._break(f"connection to {self.location!r} broken by another request's {exc!r}")
            raise
        await trio.lowlevel.checkpoint_if_cancelled()  # a caller cancelled meanwhile is cancelled now
        if isinstance(waiter.answer, BaseException):
            raise waiter.answer
        return waiter.answer

    async def _send(self, data: bytes, waiter: _Waiter) -> None:
        try:
            self._send_lock.acquire_nowait()  # no schedule point when nobody else is writing
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if not self.usable:
                raise trio.ClosedResourceError("closed while waiting to send")
            self._waiters.append(waiter)
            if self._tls is None:
                await write_socket(self._socket, data)
            else:
                await self._tls.send_all(data)
        finally:
            self._send_lock.release()

    async def _read(self) -> None:
        """Read once, and give each answer parsed to its waiter; then wake the next waiter, to read on."""
        self._reading = True
        try:
            received = (await read_socket(self._socket, RECEIVE_SIZE) if self._tls is None
                        else await self._tls.receive_some(RECEIVE_SIZE))
            if not received:
                raise trio.BrokenResourceError(f"{self.location!r} closed the connection")
            self._parser.feed(cast(bytes, received))
            while not isinstance(answer := self._parser.parse(decode=True, encoding="utf-8"), NotEnoughData):
                if not self._waiters:
                    raise trio.BrokenResourceError(f"{self.location!r} sent an answer nobody asked for")
                waiter = self._waiters.popleft()
                waiter.answer = cast(tuple[object, object], answer)[1]
                waiter.done = True
                waiter.woken.set()
        finally:
            self._reading = False
            if self._waiters:
                self._waiters[0].woken.set()

    def _break(self, reason: str) -> None:
        """Close the connection: every request in flight fails with ``reason``."""
        self.usable = False
        self._socket.close()  # a task blocked on the socket wakes with ClosedResourceError
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.answer = coredis.exceptions.ConnectionError(reason)
            waiter.done = True
            waiter.woken.set()

    def close(self) -> None:
        """Close the connection now; every request in flight fails."""
        self._break(f"the connection to {self.location!r} was closed")
