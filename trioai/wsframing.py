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
"""

from __future__ import annotations

import contextlib
from typing import Final

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from trio_websocket._impl import MAX_MESSAGE_SIZE, MESSAGE_QUEUE_SIZE, RECEIVE_BYTES
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

# Longest wait to write a close frame (Session.close_now's bound): the client may have stopped reading.
CLOSE_FRAME_TIMEOUT: Final = 1.0


class ServerConnection(WebSocketConnection):
    """trio-websocket's connection, failing a connection the client broke with the close code wsproto chose."""

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
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()
