"""One WebSocket connection: a receive loop, a writer task, and a task per generation.

Task tree (the session nursery owns every task of the connection)::

    Session.run                    receive loop: parse, dispatch, answer pings, never blocked by a generation
    └── session nursery
        ├── _write_loop            the only task that writes to the WebSocket (see outbox.py)
        ├── _heartbeat             WebSocket pings (--ping-interval); drops a peer that stops answering
        ├── _close_when_idle       (with --idle-timeout) closes 1000 when nothing happens
        └── _run_stream × N        one per active request, each inside its own CancelScope

``cancel`` cancels that request's scope: whatever it awaits (the engine, capacity, a full buffer)
raises ``Cancelled`` at once, leaving ``stream_chat`` closes the upstream response, and the task then
queues ``cancelled``. When the client goes away, the receive loop ends and the whole nursery is
cancelled the same way, so no generation outlives its connection.

Shutdown: :meth:`Session.drain` refuses new requests (``error`` ``shutting_down``) and closes the
socket with 1001 once the running ones have ended; :meth:`Session.stop` then ends those still
running with ``error`` ``shutting_down``. The close goes through the outbox, after every frame queued
before it.
"""

from __future__ import annotations

import logging
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .errors import ErrorCode, ProtocolError
from .gateway import Gateway, RequestStats
from .outbox import CloseFrame, Outbox, StreamSender
from .protocol import (
    Cancelled,
    CancelRequest,
    ChatRequest,
    Done,
    Error,
    PingRequest,
    Pong,
    RequestId,
    error_from,
    parse_client_event,
)

log = logging.getLogger("trioai.session")

SERVER_ID_PREFIX: Final = "r"
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY_VIOLATION: Final = 1008


class Session:
    """The protocol state of one connection: its active streams and its outbox."""

    def __init__(self, ws: WebSocketConnection, gateway: Gateway, conn_id: int, client: str = "-") -> None:
        self.ws = ws
        self.gateway = gateway
        self.conn_id = conn_id
        self.client = client  # whom rate limits count against: the API key id, or the peer address
        self.outbox = Outbox(gateway.settings.stream_buffer_bytes)
        self.active: dict[RequestId, trio.CancelScope] = {}
        self._next_id = 0
        self.requests = 0
        self.draining = False
        self._stopping = False
        self._last_activity = trio.current_time()
        self._activity = trio.Event()

    def drain(self) -> None:
        """Take no new requests; close with 1001 once the active ones have ended."""
        self.draining = True
        if not self.active:
            self.outbox.close(CLOSE_GOING_AWAY, "server shutting down")

    def stop(self) -> None:
        """End every active generation with ``error`` ``shutting_down`` (after :meth:`drain`)."""
        self.drain()
        self._stopping = True
        for scope in self.active.values():
            scope.cancel()

    async def run(self) -> None:
        """Serve the connection until the client leaves; every task is gone when this returns."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop, nursery.cancel_scope)
            if self.gateway.settings.ping_interval > 0:
                nursery.start_soon(self._heartbeat, nursery.cancel_scope)
            if self.gateway.settings.idle_timeout > 0:
                nursery.start_soon(self._close_when_idle)
            try:
                await self._receive_loop(nursery)
            finally:
                nursery.cancel_scope.cancel()

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        limits = self.gateway.limits
        while True:
            try:
                data = await self.ws.get_message()
            except ConnectionClosed:
                return
            self._touch()
            try:
                event = parse_client_event(data, limits)
            except ProtocolError as exc:
                await self.outbox.send_control(error_from(exc))
                continue
            if isinstance(event, ChatRequest):
                await self._start_stream(nursery, event)
            elif isinstance(event, CancelRequest):
                await self._cancel(event.id)
            elif isinstance(event, PingRequest):
                await self.outbox.send_control(Pong(event.id))

    async def _start_stream(self, nursery: trio.Nursery, request: ChatRequest) -> None:
        settings = self.gateway.settings
        if self.draining:
            await self.outbox.send_control(
                Error(request.id, ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect and retry")
            )
            return
        if request.id is not None and request.id in self.active:
            await self.outbox.send_control(
                Error(request.id, ErrorCode.DUPLICATE_ID, f"request {request.id!r} is still active", "id")
            )
            return
        if len(self.active) >= settings.max_streams_per_connection:
            await self.outbox.send_control(
                Error(
                    request.id,
                    ErrorCode.TOO_MANY_STREAMS,
                    f"this connection already runs {settings.max_streams_per_connection} generations; "
                    "wait for one to end or cancel one",
                )
            )
            return
        wait = self.gateway.rate_limiter.admit(self.client, trio.current_time())
        if wait:
            await self.outbox.send_control(
                Error(request.id, ErrorCode.RATE_LIMITED, f"rate limit reached; retry in {wait:.1f} s",
                      retry_after=round(wait + 0.05, 1))
            )
            return
        request_id = request.id if request.id is not None else self._assign_id()
        scope = trio.CancelScope()
        self.active[request_id] = scope
        self.requests += 1
        stats = RequestStats(received_at=trio.current_time())
        nursery.start_soon(self._run_stream, request, request_id, scope, stats)

    def _assign_id(self) -> str:
        while True:
            self._next_id += 1
            candidate = f"{SERVER_ID_PREFIX}{self._next_id}"
            if candidate not in self.active:
                return candidate

    async def _cancel(self, request_id: RequestId | None) -> None:
        if request_id is None:
            if not self.active:
                await self.outbox.send_control(
                    Error(None, ErrorCode.NOTHING_TO_CANCEL, "no generation is active on this connection")
                )
            self.gateway.metrics.cancels.inc()
            for scope in self.active.values():
                scope.cancel()
            return
        found = self.active.get(request_id)
        self.gateway.metrics.cancels.inc()
        if found is None:
            await self.outbox.send_control(
                Error(request_id, ErrorCode.UNKNOWN_ID, f"no active generation has id {request_id!r}", "id")
            )
            return
        found.cancel()

    async def _run_stream(
        self, request: ChatRequest, request_id: RequestId, scope: trio.CancelScope, stats: RequestStats
    ) -> None:
        sender = self.outbox.stream(request_id)
        # Stays "aborted" when the connection itself ends: nothing can be sent then.
        outcome, code = "aborted", None
        try:
            with scope:
                terminal = await self._generate(request, request_id, sender, stats)
                outcome, code = ("error", terminal.code) if isinstance(terminal, Error) else ("done", None)
                sender.event(terminal)
            if scope.cancelled_caught and not sender.finished:
                if self._stopping:
                    outcome, code = "error", ErrorCode.SHUTTING_DOWN.value
                    sender.event(Error(request_id, code, "the server shut down before this generation finished"))
                else:
                    outcome = "cancelled"
                    sender.event(Cancelled(request_id))
        finally:
            del self.active[request_id]
            self._touch()
            if self.draining and not self.active:
                self.outbox.close(CLOSE_GOING_AWAY, "server shutting down")
            now = trio.current_time()
            tokens = stats.completion_tokens if stats.completion_tokens is not None else stats.deltas
            self.gateway.rate_limiter.debit_tokens(self.client, tokens, now)
            duration = now - stats.received_at
            ttft_ms = stats.ttft_ms
            self.gateway.metrics.request_finished(
                outcome, code, stats.deltas, None if ttft_ms is None else ttft_ms / 1000.0, duration
            )
            log.info(
                "request conn=%d id=%s outcome=%s%s tokens=%d ttft_ms=%s duration_ms=%.0f",
                self.conn_id,
                request_id,
                outcome,
                "" if code is None else f" code={code}",
                stats.deltas,
                "-" if ttft_ms is None else f"{ttft_ms:.0f}",
                duration * 1000.0,
            )

    async def _generate(
        self, request: ChatRequest, request_id: RequestId, sender: StreamSender, stats: RequestStats
    ) -> Done | Error:
        try:
            return await self.gateway.generate(request, request_id, sender, stats)
        except Exception:
            # A bug of ours must cost one request, not the connection or the server.
            log.exception("request conn=%d id=%s failed unexpectedly", self.conn_id, request_id)
            return Error(request_id, ErrorCode.INTERNAL_ERROR, "internal error in the gateway")

    async def _drop_stalled_client(self, session_scope: trio.CancelScope) -> None:
        """The client read nothing for ``send_timeout``: abort its generations and disconnect.

        The interrupted send may have left part of a frame on the wire, so the 1008 close frame
        is only a best effort: the TCP connection is closed either way.
        """
        settings = self.gateway.settings
        log.info("connection conn=%d read nothing for %g s, disconnecting", self.conn_id, settings.send_timeout)
        session_scope.cancel()
        with trio.move_on_after(min(settings.close_timeout, 1.0)) as scope:
            scope.shield = True
            await self.ws.aclose(CLOSE_POLICY_VIOLATION, "client too slow")

    def _touch(self) -> None:
        self._last_activity = trio.current_time()
        self._activity.set()
        self._activity = trio.Event()

    async def _close_when_idle(self) -> None:
        """Close with 1000 after ``idle_timeout`` with no generation running and no client frame."""
        idle_timeout = self.gateway.settings.idle_timeout
        while True:
            if self.active:
                await self._activity.wait()  # a stream ending touches
                continue
            with trio.move_on_at(self._last_activity + idle_timeout):
                await self._activity.wait()
                continue
            log.info("connection conn=%d idle for %g s, closing", self.conn_id, idle_timeout)
            self.outbox.close(CLOSE_NORMAL, "idle timeout")
            return

    async def _heartbeat(self, session_scope: trio.CancelScope) -> None:
        """Ping every ``ping_interval``; a client that does not answer in ``ping_timeout`` is dropped.

        Pings keep proxies (Nginx closes a connection silent for ``proxy_read_timeout``) and NATs
        from timing out idle connections, and find clients that vanished without closing.
        trio-websocket's ``ping`` sends and then waits for the pong; a timeout that interrupts the
        send can leave a partial frame, which is harmless here since the connection is dropped.
        """
        settings = self.gateway.settings
        try:
            while True:
                await trio.sleep(settings.ping_interval)
                with trio.move_on_after(settings.ping_timeout):
                    await self.ws.ping()
                    continue
                log.info("connection conn=%d: no pong within %g s, disconnecting", self.conn_id,
                         settings.ping_timeout)
                session_scope.cancel()
                return
        except ConnectionClosed:
            return

    async def _write_loop(self, session_scope: trio.CancelScope) -> None:
        try:
            while True:
                frame = await self.outbox.next_frame()
                if isinstance(frame, CloseFrame):
                    with trio.move_on_after(self.gateway.settings.close_timeout):
                        await self.ws.aclose(frame.code, frame.reason)
                    session_scope.cancel()
                    return
                with trio.move_on_after(self.gateway.settings.send_timeout) as send_scope:
                    await self.ws.send_message(frame)
                if send_scope.cancelled_caught:
                    await self._drop_stalled_client(session_scope)
                    return
        except ConnectionClosed:
            # The client is gone: stop the receive loop and every generation with it.
            session_scope.cancel()
