"""A client's framing violation gets a close frame before the TCP close (RFC 6455 §7.1.7).

When a client breaks the framing rules (invalid UTF-8 in a text frame or close reason, a reserved
bit or opcode, an unmasked frame, an oversized or fragmented control frame, a stray continuation, a
close code not allowed on the wire), wsproto raises ``ParseFailed`` inside ``events()`` and reports
it as a ``CloseConnection`` event carrying the code to send (1002, or 1007 for invalid UTF-8),
leaving the connection ``OPEN``. trio-websocket 0.12.2 (``WebSocketConnection``'s reader task and
``_handle_close_connection_event``, read from that release) handles every ``CloseConnection`` as
one the client sent: it replies only in ``REMOTE_CLOSING``, so here it sends nothing and closes TCP,
and the client (a browser reports 1006) cannot tell its own bug from a network fault.

:class:`ServerConnection` sends that close frame first. It also keeps the session's teardown from
cancelling a close frame on its way out (this one, or the reply to a client's close), for at most
:data:`CLOSE_FRAME_TIMEOUT`. Everything else is trio-websocket's: messages take the same path as
before (the override runs once, when the connection closes). :func:`wrap_server_stream` is
trio-websocket's, building this class.

The per-frame path (issue 19): trio-websocket sends every message through wsproto and a
``StrictFIFOLock``, whose ``acquire`` yields to the scheduler even when the lock is free: one more
pass of the run loop per token. On a plain TCP connection (``sockets.ClientStream``) with no
extension negotiated, :meth:`ServerConnection.send_message` builds the text frame's header itself
(RFC 6455 §5.2: FIN, opcode 1, unmasked from a server, 7/16/64-bit length) and writes it at once
when nothing else is being sent; a frame the kernel does not take whole goes through the lock as
before. :meth:`ServerConnection.write_now` writes several frames in one system call without
awaiting anything: a remainder the kernel did not take (a slow reader) is sent by a task of the
connection's nursery under the lock, before any other frame (the fast paths refuse while it waits),
and a failed write takes the same path, so the error surfaces where trio-websocket raises it.
wsproto's state is untouched by these complete, unfragmented text messages, so control frames
(pings, pongs, close) still go through wsproto and the lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Final

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from trio_websocket._impl import MAX_MESSAGE_SIZE, MESSAGE_QUEUE_SIZE, RECEIVE_BYTES
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Event

from .outbox import RelaySample, take_relay_sample
from .sockets import ClientStream

# Longest wait to write a close frame (Session.close_now's bound): the client may have stopped reading.
CLOSE_FRAME_TIMEOUT: Final = 1.0


def text_frame(message: str) -> bytes:
    """One unmasked, final text frame carrying ``message`` (RFC 6455 §5.2), as a server sends it."""
    payload = message.encode()
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class ServerConnection(WebSocketConnection):
    """trio-websocket's connection, failing a connection the client broke with the close code wsproto chose,
    with a lean path for text frames (see the module doc)."""

    # Class defaults, so an idle connection carries no more than the one attribute wrap_server_stream sets.
    _nursery: trio.Nursery | None = None  # where a remainder's sender runs; None: no fast path
    _tail: bytes | None = None  # bytes of frames written only in part: they go before anything else

    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may write: a plain TCP socket, the connection open, no extension,
        nothing being sent (the lock free) and no remainder waiting."""
        return (self._tail is None and self._nursery is not None and not self._stream_lock.locked()
                and self._close_reason is None and self._wsproto.state is ConnectionState.OPEN
                and type(self._stream) is ClientStream and not self._extensions())

    def _extensions(self) -> bool:
        connection = self._wsproto.connection  # not None once OPEN
        return connection is None or bool(connection._proto.extensions)

    def write_now(self, messages: Iterable[str]) -> None:
        """Write text frames for ``messages`` in one system call, without waiting (see the module doc).

        Only when :meth:`can_write_now` says so; what the kernel does not take is sent by a task of
        the connection's nursery, ahead of any later frame.
        """
        data = b"".join(map(text_frame, messages))
        sample = take_relay_sample()
        stream = self._stream
        assert type(stream) is ClientStream
        fd = stream.socket.fileno()
        sent = 0
        if fd >= 0:
            try:
                sent = os.write(fd, data)
            except OSError:
                sent = 0  # would block, or broken: the task's send_all raises what trio-websocket expects
        if sent == len(data):
            if sample is not None:
                sample.written()
            return
        self._tail = data[sent:]
        nursery = self._nursery
        assert nursery is not None
        # A closed nursery means the connection is gone, and the remainder with it.
        with contextlib.suppress(RuntimeError):
            nursery.start_soon(self._send_tail, sample)

    async def _send_tail(self, sample: RelaySample | None) -> None:
        with contextlib.suppress(ConnectionClosed):  # the reader task sees a broken connection too
            async with self._stream_lock:
                await self._write_locked(b"")
            if sample is not None:
                sample.written()

    async def _write_locked(self, data: bytes) -> None:
        """Under the lock: any remainder, then ``data``; a broken stream closes the connection (as trio-websocket)."""
        tail = self._tail
        if tail is not None:
            data = tail + data
        if not data:
            return
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._tail = None
            await self._abort_web_socket()
            assert self._close_reason is not None
            raise ConnectionClosed(self._close_reason) from None
        self._tail = None

    async def send_message(self, message: str | bytes) -> None:
        """trio-websocket's ``send_message``; a text frame is written at once when nothing else is being sent."""
        if type(message) is str and self.can_write_now():
            await trio.lowlevel.checkpoint_if_cancelled()
            self.write_now((message,))
            return
        sample = take_relay_sample()  # the frame's, if outbox.pop handed one: before any await
        await super().send_message(message)
        if sample is not None:
            sample.written()

    async def _send(self, event: Event) -> None:
        # trio-websocket's _send, sending a remainder of write_now first.
        data = self._wsproto.send(event)
        async with self._stream_lock:
            await self._write_locked(data)

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        # Once the connection reads as closed, the session's writer gets ConnectionClosed and cancels
        # the connection's tasks, this one too, before the close frame (ours or the reply) is out:
        # so it is written shielded, for at most CLOSE_FRAME_TIMEOUT.
        with trio.move_on_after(CLOSE_FRAME_TIMEOUT) as scope:
            scope.shield = True
            # A close the client sent moves wsproto to REMOTE_CLOSING (or CLOSED): still OPEN means
            # wsproto failed to parse the client's bytes. (LOCAL_CLOSING: our close frame is out.)
            if self._wsproto.state is ConnectionState.OPEN:
                # Closed before the frame goes out, as trio-websocket does for a reply: a send_message
                # racing it raises ConnectionClosed rather than wsproto's LocalProtocolError.
                self._close_reason = CloseReason(event.code, event.reason or None)
                with contextlib.suppress(ConnectionClosed):  # the client is gone already
                    await self._send(CloseConnection(code=event.code, reason=event.reason))
            await super()._handle_close_connection_event(event)
        if scope.cancelled_caught:
            # The client is not reading: close TCP without the frame. That wakes a send blocked on
            # the socket, and the reader task then ends, closing the message channel.
            await self._close_stream()


async def wrap_server_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    message_queue_size: int = MESSAGE_QUEUE_SIZE,
    max_message_size: int = MAX_MESSAGE_SIZE,
    receive_buffer_size: int | None = RECEIVE_BYTES,
) -> WebSocketRequest:
    """trio-websocket's ``wrap_server_stream`` (same arguments), with a :class:`ServerConnection`."""
    connection = ServerConnection(
        stream,
        WSConnection(ConnectionType.SERVER),
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
        receive_buffer_size=receive_buffer_size,
    )
    connection._nursery = nursery
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()
