"""One WebSocket connection: a receive loop, a writer task, and a task per generation.

Task tree (the connection's nursery, opened by ``Server.serve_stream``, owns every task of the
connection; trio-websocket's reader task is in it too)::

    Session.run                    receive loop: parse, dispatch, answer pings, never blocked by a generation
    └── connection nursery
        ├── trio-websocket's reader   reads frames, answers pings, feeds get_message()
        ├── _write_loop            the only task that writes frames (see outbox.py); runs while there is
        │                          something to send or a generation running, started again on demand
        ├── _ping                  one WebSocket ping and its pong wait, started by tick()
        └── _run_stream × N        one per active request, each inside its own CancelScope

Timers: an idle connection has no task of its own waiting on a clock. The server's sweeper calls
:meth:`Session.tick` every fraction of the shortest timeout, which sends pings (``--ping-interval``),
closes idle connections (``--idle-timeout``, 1000) and drops a client that has read nothing for
``--send-timeout`` while a frame waits (1008). Besides sparing memory per connection, the writer
then needs no cancel scope per frame.

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
from .generation import Generation
from .outbox import CloseFrame, EventEncoder, Outbox
from .protocol import (
    Cancelled,
    CancelRequest,
    ChatRequest,
    Error,
    Models,
    ModelsRequest,
    PingRequest,
    Pong,
    RequestId,
    ResumeRequest,
    error_from,
    parse_client_event,
)
from .sharedgen import BATCH, frame_id, is_terminal
from .state import StateUnavailable

log = logging.getLogger("trioai.session")

SERVER_ID_PREFIX: Final = "r"
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY_VIOLATION: Final = 1008
#: Ids of ended generations remembered per connection, so that a ``cancel`` which crossed the
#: terminal event on the wire is ignored instead of answered with ``unknown_id``.
ENDED_IDS_REMEMBERED: Final = 64


class Session:
    """The protocol state of one connection: its active streams and its outbox."""

    __slots__ = ("ws", "gateway", "conn_id", "client", "key_id", "outbox", "active", "requests", "last_engine",
                 "draining", "_stopping", "_next_id", "_nursery", "_last_activity", "_last_ping", "_ping_in_flight",
                 "_sending_since", "_stalled", "opened_at", "_ended", "_shared")

    def __init__(self, ws: WebSocketConnection, gateway: Gateway, conn_id: int, client: str = "-",
                 key_id: str | None = None) -> None:
        self.ws = ws
        self.gateway = gateway
        self.conn_id = conn_id
        self.client = client  # whom rate limits count against: the API key id, or the peer address
        self.key_id = key_id  # the API key's id, when keys are configured
        self.outbox = Outbox(gateway.settings.stream_buffer_bytes, start_writer=self._start_writer,
                             connection_buffer_bytes=gateway.settings.connection_buffer_bytes)
        self.outbox.use_connection(ws)  # deltas written by their generation task when the socket is free
        self._shared: dict[str, Generation] | None = None  # shared generations by id (JSON), until their end is sent
        # The generations attached to this connection and not ended (they run in the registry).
        self.active: dict[RequestId, Generation] = {}
        self.requests = 0
        self.last_engine: str | None = None  # the engine of its latest generation (routing prefers it)
        self.draining = False
        self._stopping = False
        self._next_id = 0
        self._nursery: trio.Nursery | None = None  # set while run() can start tasks
        now = trio.current_time()
        self._last_activity = now
        self._last_ping = now
        self._ping_in_flight = False
        self._sending_since: float | None = None  # when the frame being sent started, if one is
        self._stalled = False
        self.opened_at = now
        self._ended: dict[RequestId, None] | None = None  # recently ended ids, oldest first

    def drain(self) -> None:
        """Take no new requests; close with 1001 once the active ones have ended."""
        self.draining = True
        if not self.active:
            self.outbox.close(CLOSE_GOING_AWAY, "server shutting down")

    def stop(self) -> None:
        """End every active generation with ``error`` ``shutting_down`` (after :meth:`drain`)."""
        self.drain()
        self._stopping = True
        for generation in list(self.active.values()):
            generation.cancel("stop")

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve the connection until the client leaves, starting tasks in ``nursery``; cancel it then.

        ``nursery`` is the connection's (it also holds trio-websocket's reader task): every task of
        the session is gone once it exits.
        """
        self._nursery = nursery
        try:
            self.outbox.ensure_writer()  # for frames queued before run() (a drain that began meanwhile)
            await self._receive_loop(nursery)  # until the client leaves
        finally:
            self._nursery = None
            nursery.cancel_scope.cancel()
            # Gone without a cancel: resumable generations detach, the others are cancelled.
            registry = self.gateway.registry
            for generation in list(self.active.values()):
                registry.connection_lost(generation)
            self.active.clear()
            if self._stalled:
                await self.close_now(CLOSE_POLICY_VIOLATION, "client too slow")

    def tick(self, now: float) -> None:
        """Enforce this connection's timers (the server's sweeper calls this; see the module doc)."""
        nursery = self._nursery
        if nursery is None:
            return
        settings = self.gateway.settings
        sending_since = self._sending_since
        if sending_since is not None and now - sending_since >= settings.send_timeout:
            log.info("connection conn=%d read nothing for %g s, disconnecting", self.conn_id, settings.send_timeout)
            self._stalled = True
            nursery.cancel_scope.cancel()
            return
        idle_timeout = settings.idle_timeout
        if (idle_timeout > 0 and not self.active and not self.outbox.closing
                and now - self._last_activity >= idle_timeout):
            log.info("connection conn=%d idle for %g s, closing", self.conn_id, idle_timeout)
            self.outbox.close(CLOSE_NORMAL, "idle timeout")
        if settings.ping_interval > 0 and not self._ping_in_flight and now - self._last_ping >= settings.ping_interval:
            self._ping_in_flight = True
            nursery.start_soon(self._ping, nursery.cancel_scope)

    def _start_writer(self) -> bool:
        if self._nursery is None:
            return False  # run() has not begun (it starts one), or the connection is ending
        self._nursery.start_soon(self._write_loop, self._nursery.cancel_scope)
        return True

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self.ws.get_message()
            except ConnectionClosed:
                return
            self._touch()
            await self.handle(data)

    async def handle(self, data: str | bytes) -> None:
        """Act on one client frame (``/ws/chat``'s events; another wire protocol overrides this)."""
        try:
            event = parse_client_event(data, self.gateway.limits)
            if isinstance(event, ChatRequest):
                await self._start_stream(event)
            elif isinstance(event, CancelRequest):
                await self._cancel(event)
            elif isinstance(event, ResumeRequest):
                await self._resume(event)
            elif isinstance(event, PingRequest):
                await self.outbox.send_control(Pong(event.id))
            elif isinstance(event, ModelsRequest):
                await self.outbox.send_control(Models(event.id, await self.gateway.pool.listing()))
        except ProtocolError as exc:
            await self.outbox.send_control(error_from(exc))

    async def refuse(self, error: Error) -> None:
        """Tell the client a request was refused (another wire protocol encodes it its own way)."""
        await self.outbox.send_control(error)

    async def _admissible(self, request_id: RequestId | None) -> bool:
        """Whether this connection may take one more generation; if not, says why (an ``error``)."""
        settings = self.gateway.settings
        if self.draining:
            await self.refuse(
                Error(request_id, ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect and retry")
            )
            return False
        if request_id is not None and request_id in self.active:
            await self.refuse(
                Error(request_id, ErrorCode.DUPLICATE_ID, f"request {request_id!r} is still active", "id")
            )
            return False
        if len(self.active) >= settings.max_streams_per_connection:
            await self.refuse(
                Error(
                    request_id,
                    ErrorCode.TOO_MANY_STREAMS,
                    f"this connection already runs {settings.max_streams_per_connection} generations; "
                    "wait for one to end or cancel one",
                )
            )
            return False
        return True

    async def _start_stream(self, request: ChatRequest, encoder: EventEncoder | None = None) -> Generation | None:
        """Start a generation for ``request`` if this connection and client may (else an ``error``).

        ``encoder``: the wire protocol's, when it is not ``/ws/chat``.
        """
        if not await self._admissible(request.id):
            return None
        wait = await self.gateway.rate_limiter.admit(self.client, trio.current_time())
        if wait:
            await self.refuse(
                Error(request.id, ErrorCode.RATE_LIMITED, f"rate limit reached; retry in {wait:.1f} s",
                      retry_after=round(wait + 0.05, 1))
            )
            return None
        request_id = request.id if request.id is not None else self._assign_id()
        self.requests += 1
        stats = RequestStats(received_at=trio.current_time(), prefer_engine=self.last_engine)
        generation = self.active[request_id] = self.gateway.registry.start(self, request, request_id, stats,
                                                                           encoder)
        return generation

    async def _resume(self, request: ResumeRequest) -> None:
        if not await self._admissible(request.id):
            return
        try:
            generation = self.gateway.registry.resume(self, request)  # ProtocolError: resume_not_found, ...
        except ProtocolError as exc:
            if exc.code != ErrorCode.RESUME_NOT_FOUND or self.gateway.shared is None:
                raise
            generation = await self.gateway.registry.resume_shared(self, request)  # another instance's?
        if not generation.finished:
            self.active[request.id] = generation

    def generation_ended(self, generation: Generation) -> None:
        """Its terminal event is queued (the registry calls this): it is no longer active here."""
        if generation.stats.engine is not None:
            self.last_engine = generation.stats.engine  # the next request prefers it (its prefix cache)
        request_id = generation.request_id
        if self.active.get(request_id) is generation:
            del self.active[request_id]
        self._remember_ended(request_id)
        self._touch()
        if not self.active:
            if self.draining:
                self.outbox.close(CLOSE_GOING_AWAY, "server shutting down")
            self.outbox.wake_writer()  # it may leave now

    def share(self, generation: Generation) -> None:
        """``generation`` is shared: its frames go to the shared log before they are sent (log, then send)."""
        if self._shared is None:
            self._shared = {}
        self._shared[generation.sender.id_json] = generation
        self.outbox.direct = None  # while one is attached, every frame goes through the writer, which logs first

    async def _log_shared(self, batch: list[str | list[str] | CloseFrame]) -> list[str | list[str] | CloseFrame]:
        """Append the frames of shared generations in ``batch`` to the shared log; the batch to send
        (without the frames of a generation this instance lost to another)."""
        shared = self.gateway.shared
        table = self._shared
        assert shared is not None
        assert table is not None
        groups: dict[Generation, list[str]] = {}
        for item in batch:
            if type(item) is str:
                key = frame_id(item)
                generation = table.get(key) if key is not None else None
                if generation is not None:
                    groups.setdefault(generation, []).append(item)
                    if is_terminal(item):
                        del table[key]  # type: ignore[arg-type]
                        if not table:
                            self.outbox.use_connection(self.ws)  # no shared generation left: the fast path again
        lost: set[str] = set()
        for generation, frames in groups.items():
            if not await shared.append(generation, frames):
                lost.update(frames)
                generation.cancel("disconnect")
        return [item for item in batch if not (type(item) is str and item in lost)] if lost else batch

    def taken_over(self, generation: Generation) -> None:
        """Another connection resumed ``generation``: it is no longer ours (the registry calls this)."""
        request_id = generation.request_id
        if self.active.get(request_id) is generation:
            del self.active[request_id]
        self._remember_ended(request_id)
        self.outbox.push_notice(Error(request_id, ErrorCode.RESUMED_ELSEWHERE,
                                      "another connection resumed this generation", "id"))
        if not self.active:
            self.outbox.wake_writer()

    def _remember_ended(self, request_id: RequestId) -> None:
        ended = self._ended
        if ended is None:
            ended = self._ended = {}
        ended.pop(request_id, None)
        ended[request_id] = None
        if len(ended) > ENDED_IDS_REMEMBERED:
            del ended[next(iter(ended))]

    def _assign_id(self) -> str:
        while True:
            self._next_id += 1
            candidate = f"{SERVER_ID_PREFIX}{self._next_id}"
            if candidate not in self.active:
                return candidate

    async def _cancel(self, request: CancelRequest) -> None:
        request_id = request.id
        self.gateway.metrics.cancels.inc()
        if request.resume_token is not None:
            assert request_id is not None
            try:
                generation = self.gateway.registry.find(request_id, request.resume_token, self.key_id)
            except ProtocolError:
                if self.gateway.shared is None or not await self._cancel_shared(request_id, request.resume_token):
                    raise
                return
            if generation.finished:
                if generation.session is not self:  # the attached one has its terminal event already
                    await self.outbox.send_control(Error(
                        request_id, ErrorCode.NOTHING_TO_CANCEL,
                        "this generation has already ended; resume it to fetch its terminal event", "id"))
                return
            generation.cancel()
            if generation.session is not self:
                # Stopped from a connection that does not own it: this one hears it too.
                await self.outbox.send_control(Cancelled(request_id))
            return
        if request_id is None:
            if not self.active:
                await self.outbox.send_control(
                    Error(None, ErrorCode.NOTHING_TO_CANCEL, "no generation is active on this connection")
                )
            for generation in list(self.active.values()):
                generation.cancel()
            return
        found = self.active.get(request_id)
        if found is None:
            if self._ended is not None and request_id in self._ended:
                return  # it ended while the cancel was on its way: its terminal event says how
            await self.outbox.send_control(
                Error(request_id, ErrorCode.UNKNOWN_ID, f"no active generation has id {request_id!r}", "id")
            )
            return
        found.cancel()

    async def _cancel_shared(self, request_id: RequestId, token: str) -> bool:
        """Cancel a generation another instance runs, through the shared state (False: unknown)."""
        shared = self.gateway.shared
        assert shared is not None
        try:
            if await shared.lookup(token, request_id, self.key_id) is None:
                return False
            await shared.request_cancel(token)
        except StateUnavailable:
            return False
        await self.outbox.send_control(Cancelled(request_id))
        return True

    async def close_now(self, code: int, reason: str) -> None:
        """Best-effort close frame on a connection being torn down (a stalled client: 1008; a bug: 1011).

        The session's tasks are cancelled by now, trio-websocket's reader with them, and an
        interrupted send may have left part of a frame on the wire: so this waits at most a second,
        and the TCP connection is closed either way.
        """
        with trio.move_on_after(min(self.gateway.settings.close_timeout, 1.0)) as scope:
            scope.shield = True
            await self.ws.aclose(code, reason)

    def _touch(self) -> None:
        self._last_activity = trio.current_time()

    async def _ping(self, session_scope: trio.CancelScope) -> None:
        """One WebSocket ping; a client that does not answer in ``ping_timeout`` is dropped.

        Pings keep proxies (Nginx closes a connection silent for ``proxy_read_timeout``) and NATs
        from timing out idle connections, and find clients that vanished without closing.
        trio-websocket's ``ping`` sends (under its send lock, so never inside another frame) and
        then waits for the pong; a timeout that interrupts the send can leave a partial frame,
        which is harmless here since the connection is dropped.
        """
        ping_timeout = self.gateway.settings.ping_timeout
        try:
            with trio.move_on_after(ping_timeout):
                await self.ws.ping()
                return
            log.info("connection conn=%d: no pong within %g s, disconnecting", self.conn_id, ping_timeout)
            session_scope.cancel()
        except ConnectionClosed:
            return
        finally:
            self._ping_in_flight = False
            self._last_ping = trio.current_time()

    async def _write_loop(self, session_scope: trio.CancelScope) -> None:
        outbox = self.outbox
        ws = self.ws
        try:
            while True:
                frame = outbox.pop()
                if frame is None:
                    if not self.active:
                        return  # nothing to send and nothing running: the next frame starts a writer
                    await outbox.wait()
                    continue
                batch: list[str | list[str] | CloseFrame] = [frame]
                if self._shared:  # log, then send: every frame waiting goes to the shared log in one call
                    while len(batch) < BATCH and not isinstance(batch[-1], CloseFrame):
                        more = outbox.pop()
                        if more is None:
                            break
                        batch.append(more)
                    batch = await self._log_shared(batch)
                for frame in batch:
                    if isinstance(frame, CloseFrame):
                        with trio.move_on_after(self.gateway.settings.close_timeout):
                            await ws.aclose(frame.code, frame.reason)
                        session_scope.cancel()
                        return
                    # No cancel scope per frame: tick() enforces the send timeout from this timestamp.
                    self._sending_since = trio.current_time()
                    if type(frame) is str:
                        await ws.send_message(frame)
                    else:
                        for part in frame:  # another wire protocol's frames for one event
                            await ws.send_message(part)
                    self._sending_since = None
        except ConnectionClosed:
            # The client is gone: stop the receive loop and every generation with it.
            session_scope.cancel()
        finally:
            self._sending_since = None
            outbox.writer_stopped()
