"""Generations outlive their connections: the server's registry runs them, connections attach.

Task tree (the registry's nursery is opened by ``serve``, beside the connections nursery)::

    Registry.run                  the registry's nursery
    └── Registry._run × N         one per generation, inside the generation's own CancelScope
        └── Gateway.generate      admission, the engine stream, events into the generation's log

A generation streams its events (numbered by ``seq``, see ``outbox.StreamSender``) to the
connection it is attached to. When that connection ends for any reason but the client's
``cancel``, a *resumable* generation is detached: it keeps running and its events go to its log
only, until a connection attaches with ``resume`` (replaying every event after the ``seq`` it names)
or ``--resume-window`` passes (then it is abandoned: cancelled, its engine request closed). A
generation that is not resumable is cancelled with its connection, as before. A resumable
generation's log is kept for the window after its terminal event too, so a ``done`` lost on the
wire can still be fetched.

A resume token is 192 random bits (``secrets.token_urlsafe``), compared in constant time, never
logged. An unknown id, an expired generation and a wrong token all get the same
``resume_not_found``, so ids cannot be probed; with API keys, the attaching connection must use the
key the generation was started with. A second attach takes the generation over: the connection
that had it gets ``error`` ``resumed_elsewhere`` for that id.

Memory: each resumable generation's log holds at most ``--resume-buffer-bytes`` (the oldest sent
events go first; a detached generation whose log is full waits, as for a slow client), and all
logs together at most ``--resume-memory-bytes`` (beyond it, the oldest detached generation is
abandoned first).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import TYPE_CHECKING, Final

import trio

from .errors import ErrorCode, ProtocolError
from .outbox import EventEncoder, StreamSender
from .protocol import Cancelled, ChatRequest, Done, Error, RequestId, ResumeRequest
from .sharedgen import Record, is_terminal, summarize
from .state import StateUnavailable

if TYPE_CHECKING:
    from .gateway import Begun, Gateway, RequestStats
    from .session import Session

log = logging.getLogger("trioai.session")

RESUME_TOKEN_BYTES: Final = 24
NOT_FOUND_MESSAGE: Final = "no resumable generation has this id and token (unknown, expired, or a wrong token)"


class Generation:
    """One generation's state: its log (``sender``), its cancel scope, and who is attached."""

    __slots__ = ("request_id", "sender", "scope", "token", "key_id", "client", "conn_id", "stats", "session",
                 "detached_at", "ended_at", "end_reason", "log_bytes", "shared")

    def __init__(self, request_id: RequestId, sender: StreamSender, token: str | None, key_id: str | None,
                 client: str, conn_id: int, stats: RequestStats, session: Session) -> None:
        self.request_id = request_id
        self.sender = sender
        self.scope = trio.CancelScope()
        self.token = token  # None: not resumable
        self.key_id = key_id
        self.client = client
        self.conn_id = conn_id
        self.stats = stats
        self.session: Session | None = session
        self.detached_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason = "cancel"  # what a cancellation of the scope means: see Registry._run
        self.log_bytes = 0
        self.shared = False  # its events are in shared state too (--redis): any instance can resume it

    @property
    def finished(self) -> bool:
        """Whether its terminal event is in its log."""
        return self.sender.finished

    def cancel(self, reason: str = "cancel") -> None:
        """End it: ``cancel`` (the client's: ``cancelled``), ``stop`` (``shutting_down``),
        ``disconnect`` or ``abandoned`` (no event: nobody would get it)."""
        if not self.scope.cancel_called:
            self.end_reason = reason
        self.scope.cancel()


class Registry:
    """Every running generation, and resumable ones for a while after; owns their tasks."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._nursery: trio.Nursery | None = None
        self._by_token: dict[str, Generation] = {}
        self._detached: dict[Generation, None] = {}  # oldest first
        self._kept: dict[Generation, None] = {}  # ended resumable generations, oldest first
        self.log_bytes = 0

    @property
    def detached(self) -> int:
        """Resumable generations running with no connection."""
        return len(self._detached)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every generation's task until cancelled (the server's exit cancels them all)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, session: Session, request: ChatRequest, request_id: RequestId, stats: RequestStats,
              encoder: EventEncoder | None = None) -> Generation:
        """Start a generation attached to ``session`` (its task runs in the registry's nursery);
        ``encoder`` is its wire protocol's when that is not ``/ws/chat`` (it is then not resumable)."""
        assert self._nursery is not None, "Registry.run is not running"
        settings = self.gateway.settings
        resumable = request.resumable if request.resumable is not None else settings.resumable_default
        token = (secrets.token_urlsafe(RESUME_TOKEN_BYTES)
                 if resumable and settings.resume_window > 0 and encoder is None else None)
        sender = StreamSender(session.outbox, request_id, stream_buffer_bytes=settings.stream_buffer_bytes,
                              log_bytes_limit=settings.resume_buffer_bytes if token is not None else None)
        sender.encoder = encoder
        generation = Generation(request_id, sender, token, session.key_id, session.client, session.conn_id, stats,
                                session)
        if token is not None:
            self._by_token[token] = generation
            sender.on_log_change = lambda size: self._log_changed(generation, size)
        begun = None
        if token is None or self.gateway.shared is None:  # a shared one is registered in Redis first
            begun = self.gateway.begin(request, request_id, sender, stats, resume_token=token)
        self._nursery.start_soon(self._run, generation, request, None, begun)
        return generation

    def find(self, request_id: RequestId, token: str, key_id: str | None) -> Generation:
        """The generation ``token`` names, if ``request_id`` and the API key match too."""
        generation = self._by_token.get(token)
        if (generation is None or generation.token is None or generation.request_id != request_id
                or not hmac.compare_digest(generation.token, token) or generation.key_id != key_id):
            raise ProtocolError(ErrorCode.RESUME_NOT_FOUND, NOT_FOUND_MESSAGE, param="resume_token",
                                request_id=request_id)
        return generation

    def resume(self, session: Session, request: ResumeRequest) -> Generation:
        """Attach ``session`` to a generation, replaying its events after ``request.after``."""
        generation = self.find(request.id, request.resume_token, session.key_id)
        sender = generation.sender
        if request.after > sender.last_seq:
            raise ProtocolError(ErrorCode.INVALID_REQUEST,
                                f"'after' is beyond the last event of this generation (seq {sender.last_seq})",
                                param="after", request_id=request.id)
        if request.after + 1 < sender.first_kept_seq:
            raise ProtocolError(ErrorCode.RESUME_NOT_FOUND,
                                f"events after seq {request.after} are no longer kept (the log keeps the last "
                                f"{self.gateway.settings.resume_buffer_bytes} bytes); the first kept is "
                                f"{sender.first_kept_seq}", param="after", request_id=request.id)
        previous = generation.session
        unsent = sender.detach()
        if previous is not None and previous is not session and (unsent or not generation.finished):
            # Fencing: one connection owns a generation. The old one gets resumed_elsewhere instead
            # of the events it had not been sent yet (none after its terminal event, if it had that).
            previous.taken_over(generation)
        self._detached.pop(generation, None)
        generation.detached_at = None
        generation.session = session
        sender.attach(session.outbox, request.after)
        if generation.shared:
            session.share(generation)
        self.gateway.metrics.resumes.inc()
        log.info("request conn=%d id=%s resumed after=%d from conn=%d", session.conn_id, request.id, request.after,
                 generation.conn_id)
        return generation

    async def resume_shared(self, session: Session, request: ResumeRequest) -> Generation:
        """Attach ``session`` to a shared generation another instance runs (or ran): follow its log,
        and continue it here if its owner died. ProtocolError ``resume_not_found`` as for a local one."""
        shared = self.gateway.shared
        assert shared is not None
        assert self._nursery is not None
        not_found = ProtocolError(ErrorCode.RESUME_NOT_FOUND, NOT_FOUND_MESSAGE, param="resume_token",
                                  request_id=request.id)
        try:
            record = await shared.lookup(request.resume_token, request.id, session.key_id)
        except StateUnavailable:
            raise not_found from None
        if record is None:
            raise not_found
        from .gateway import RequestStats

        generation = Generation(request.id, StreamSender(None, request.id), request.resume_token, session.key_id,
                                record.client, session.conn_id, RequestStats(received_at=trio.current_time()),
                                session)
        self._nursery.start_soon(self._follow, generation, record, request.after)
        self.gateway.metrics.resumes.inc()
        log.info("request conn=%d id=%s resumed after=%d from the shared log", session.conn_id, request.id,
                 request.after)
        return generation

    async def _follow(self, generation: Generation, record: Record, after: int) -> None:
        """Send a followed generation's logged frames after ``after`` to its connection, until its
        terminal event; take it over and continue it here if its owner is gone."""
        shared = self.gateway.shared
        session = generation.session
        assert shared is not None
        assert session is not None
        assert generation.token is not None
        token = generation.token
        take_over = False
        try:
            with generation.scope:
                while not take_over:
                    frames = await shared.follow(token, after)
                    for seq, frame in frames:
                        await session.outbox.send_frame(frame)
                        after = seq
                        if is_terminal(frame):
                            generation.sender.finished = True
                            return
                    if not frames and not await shared.owner_alive(token):
                        take_over = await shared.take_over(token)
            if generation.scope.cancelled_caught and generation.end_reason == "cancel":
                # The client's cancel: the owner stops it at its next lease renewal; this connection hears it now.
                with trio.CancelScope(shield=True), trio.move_on_after(shared.lease):
                    await shared.request_cancel(token)
                session.outbox.push_notice(Cancelled(generation.request_id))
                generation.sender.finished = True
        except StateUnavailable:
            session.outbox.push_notice(Error(generation.request_id, ErrorCode.RESUME_NOT_FOUND,
                                             "the shared state is unavailable: this generation cannot be followed "
                                             "from this instance now; resume again later", "resume_token"))
            generation.sender.finished = True
        except Exception:
            # A bug of ours must cost one request, not the connection or the server.
            log.exception("request conn=%d id=%s: following it failed", session.conn_id, generation.request_id)
            session.outbox.push_notice(Error(generation.request_id, ErrorCode.INTERNAL_ERROR,
                                             "internal error in the gateway"))
            generation.sender.finished = True
        finally:
            if not take_over and generation.session is session:
                session.generation_ended(generation)
        if take_over:
            await self._continue_taken_over(generation, record, after)

    async def _continue_taken_over(self, generation: Generation, record: Record, after: int) -> None:
        """This instance now owns a generation whose owner died: continue it from its log's text."""
        shared = self.gateway.shared
        session = generation.session
        assert shared is not None
        assert generation.token is not None
        settings = self.gateway.settings
        try:
            frames = await shared.read_log(generation.token, 0)
        except StateUnavailable:
            frames = []
        summary = summarize(frames)
        sender = StreamSender(None, generation.request_id, stream_buffer_bytes=settings.stream_buffer_bytes,
                              log_bytes_limit=settings.resume_buffer_bytes, first_seq=summary.last_seq)
        generation.sender = sender
        generation.shared = True
        self._by_token[generation.token] = generation
        sender.on_log_change = lambda size: self._log_changed(generation, size)
        shared.adopt(generation, record, summary.last_seq)
        log.warning("request id=%s: its instance is gone; continuing it here after seq %d (%d tokens)",
                    generation.request_id, summary.last_seq, len(summary.parts))
        if session is not None and generation.session is session:
            for seq, frame in frames:  # what the follow had not sent yet
                if seq > after:
                    await session.outbox.send_frame(frame)
            sender.attach(session.outbox, summary.last_seq)
            session.share(generation)
        else:
            shared.relay(generation)
        if summary.terminal:
            sender.finished = True
            if session is not None:
                session.generation_ended(generation)
            return
        generation.scope = trio.CancelScope()  # the follow's scope is spent; cancel() reaches this one
        if not summary.continuable:
            sender.event(Error(generation.request_id, ErrorCode.UPSTREAM_DISCONNECTED,
                               "the instance running this generation stopped, and its answer cannot be continued "
                               "exactly: it holds tool calls or reasoning"))
            if session is not None:
                session.generation_ended(generation)
            return
        await self._run(generation, record.request, continued=summary.parts)

    def connection_lost(self, generation: Generation) -> None:
        """Its connection ended without a ``cancel``: detach it if resumable, else cancel it.

        A shared generation's frames no connection was sent go to the shared log from now on (a
        relay task appends them), so a resume on another instance finds them."""
        generation.session = None
        if generation.token is None and not generation.finished:
            generation.cancel("disconnect")
            return
        generation.sender.detach()
        if generation.shared and self.gateway.shared is not None:
            self.gateway.shared.relay(generation)
        if generation.finished:
            return
        generation.detached_at = trio.current_time()
        self._detached[generation] = None
        log.info("request conn=%d id=%s detached", generation.conn_id, generation.request_id)

    def sweep(self, now: float) -> None:
        """Abandon detached generations past the window; forget ended ones past it (the server's sweeper)."""
        window = self.gateway.settings.resume_window
        # Oldest first: stop at the first one still inside the window (no copy of the whole set).
        while self._detached:
            generation = next(iter(self._detached))
            if generation.detached_at is not None and now - generation.detached_at < window:
                break
            self._abandon(generation)
        while self._kept:
            generation = next(iter(self._kept))
            if generation.ended_at is not None and now - generation.ended_at < window:
                break
            self._forget(generation)

    def _abandon(self, generation: Generation) -> None:
        self._detached.pop(generation, None)
        self.gateway.metrics.abandoned.inc()
        generation.cancel("abandoned")

    def _forget(self, generation: Generation) -> None:
        self._kept.pop(generation, None)
        self._detached.pop(generation, None)
        if generation.token is not None:
            self._by_token.pop(generation.token, None)
        if generation.shared and self.gateway.shared is not None:
            self.gateway.shared.forget(generation)
        self.log_bytes -= generation.log_bytes
        generation.log_bytes = 0
        generation.sender.log = None  # the entries may go

    def _log_changed(self, generation: Generation, size: int) -> None:
        self.log_bytes += size - generation.log_bytes
        generation.log_bytes = size
        limit = self.gateway.settings.resume_memory_bytes
        while self.log_bytes > limit:
            victim = next(iter(self._detached), None) or next(iter(self._kept), None)
            if victim is None:
                break  # only attached generations: each is bounded by its own log limit
            log.info("request id=%s: event logs over --resume-memory-bytes, abandoning the oldest",
                     victim.request_id)
            if victim.finished:
                self._forget(victim)
            else:
                self._abandon(victim)
                self._forget(victim)

    async def _run(self, generation: Generation, request: ChatRequest,
                   continued: tuple[str, ...] | None = None, begun: Begun | None = None) -> None:
        sender = generation.sender
        stats = generation.stats
        request_id = generation.request_id
        outcome, code = "aborted", None  # stays so when the server itself stops
        try:
            with generation.scope:
                if continued is not None:  # taken over from a dead instance
                    terminal = await self._generate(generation, request, continued)
                else:
                    if generation.token is not None and sender.encoder is None and self.gateway.shared is not None:
                        await self._share(generation, request)
                    terminal = await self._generate(generation, request, begun=begun)
                outcome, code = ("error", terminal.code) if isinstance(terminal, Error) else ("done", None)
                sender.event(terminal)
            if generation.scope.cancelled_caught and not sender.finished:
                reason = generation.end_reason
                if reason == "stop":
                    outcome, code = "error", ErrorCode.SHUTTING_DOWN.value
                    sender.event(Error(request_id, code, "the server shut down before this generation finished"))
                elif reason == "cancel":
                    outcome = "cancelled"
                    sender.event(Cancelled(request_id))
                elif reason == "abandoned":
                    outcome = "abandoned"
                # "disconnect": nobody to tell; stays "aborted".
        finally:
            if begun is not None:
                begun.release()  # what nothing took over (given back already, usually)
            generation.ended_at = now = trio.current_time()
            self._detached.pop(generation, None)
            if generation.token is not None and outcome not in ("aborted", "abandoned"):
                self._kept[generation] = None  # its log stays fetchable for the window
            else:
                self._forget(generation)
            session = generation.session
            if session is not None:
                session.generation_ended(generation)
            gateway = self.gateway
            tokens = stats.completion_tokens if stats.completion_tokens is not None else stats.deltas
            gateway.rate_limiter.debit_tokens(generation.client, tokens, now)
            duration = now - stats.received_at
            ttft_ms = stats.ttft_ms
            gateway.metrics.request_finished(
                outcome, code, stats.deltas, None if ttft_ms is None else ttft_ms / 1000.0, duration
            )
            log.info(
                "request conn=%d id=%s outcome=%s%s tokens=%d ttft_ms=%s duration_ms=%.0f",
                generation.conn_id,
                request_id,
                outcome,
                "" if code is None else f" code={code}",
                stats.deltas,
                "-" if ttft_ms is None else f"{ttft_ms:.0f}",
                duration * 1000.0,
            )

    async def _share(self, generation: Generation, request: ChatRequest) -> None:
        """Make a new resumable generation shared (before its first event), if the state answers."""
        shared = self.gateway.shared
        assert shared is not None
        record = Record(generation.request_id, generation.key_id, generation.client, request)
        if not await shared.register(generation, record):
            return
        generation.shared = True
        if generation.session is not None:
            generation.session.share(generation)
        else:
            shared.relay(generation)  # its connection was lost meanwhile

    async def _generate(self, generation: Generation, request: ChatRequest,
                        continued: tuple[str, ...] | None = None, begun: Begun | None = None) -> Done | Error:
        try:
            if continued is not None:
                return await self.gateway.continue_from(request, generation.request_id, continued, generation.sender,
                                                        generation.stats)
            return await self.gateway.generate(request, generation.request_id, generation.sender, generation.stats,
                                               resume_token=generation.token, begun=begun)
        except Exception:
            # A bug of ours must cost one request, not the connection or the server.
            log.exception("request conn=%d id=%s failed unexpectedly", generation.conn_id, generation.request_id)
            return Error(generation.request_id, ErrorCode.INTERNAL_ERROR, "internal error in the gateway")
