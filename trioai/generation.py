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

if TYPE_CHECKING:
    from .gateway import Gateway, RequestStats
    from .session import Session

log = logging.getLogger("trioai.session")

RESUME_TOKEN_BYTES: Final = 24
NOT_FOUND_MESSAGE: Final = "no resumable generation has this id and token (unknown, expired, or a wrong token)"


class Generation:
    """One generation's state: its log (``sender``), its cancel scope, and who is attached."""

    __slots__ = ("request_id", "sender", "scope", "token", "key_id", "client", "conn_id", "stats", "session",
                 "detached_at", "ended_at", "end_reason", "log_bytes")

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
        self._nursery.start_soon(self._run, generation, request)
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
        self.gateway.metrics.resumes.inc()
        log.info("request conn=%d id=%s resumed after=%d from conn=%d", session.conn_id, request.id, request.after,
                 generation.conn_id)
        return generation

    def connection_lost(self, generation: Generation) -> None:
        """Its connection ended without a ``cancel``: detach it if resumable, else cancel it."""
        generation.session = None
        if generation.finished:
            generation.sender.detach()
            return
        if generation.token is None:
            generation.cancel("disconnect")
            return
        generation.sender.detach()
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

    async def _run(self, generation: Generation, request: ChatRequest) -> None:
        sender = generation.sender
        stats = generation.stats
        request_id = generation.request_id
        outcome, code = "aborted", None  # stays so when the server itself stops
        try:
            with generation.scope:
                terminal = await self._generate(generation, request)
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

    async def _generate(self, generation: Generation, request: ChatRequest) -> Done | Error:
        try:
            return await self.gateway.generate(request, generation.request_id, generation.sender, generation.stats,
                                               resume_token=generation.token)
        except Exception:
            # A bug of ours must cost one request, not the connection or the server.
            log.exception("request conn=%d id=%s failed unexpectedly", generation.conn_id, generation.request_id)
            return Error(generation.request_id, ErrorCode.INTERNAL_ERROR, "internal error in the gateway")
