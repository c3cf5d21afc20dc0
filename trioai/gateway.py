"""What all connections share, and the life of one generation from admission to its last token.

:class:`Gateway` holds the settings, the upstream client, the global admission limiter and the model
name (asked of the engine once when not configured). :meth:`Gateway.generate` runs one request:
``start``, ``queued`` while waiting for capacity, each delta as ``token``, and returns the terminal
event (``done`` or ``error``) for the caller to send. Cancellation is the caller's: it runs this
inside the request's cancel scope, and leaving the ``stream_chat`` block closes the upstream stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from .admission import Admission
from .config import Settings
from .errors import ErrorCode, UpstreamError
from .generation import Registry
from .metrics import Metrics
from .outbox import StreamSender
from .protocol import AssembledToolCall, ChatRequest, Done, Error, RequestId, Started, Usage
from .ratelimit import RateLimiter
from .singleflight import SharedCall
from .upstream import Upstream

log = logging.getLogger("trioai.gateway")

OVERLOADED_RETRY_AFTER: Final = 1.0
RETRYABLE_CODES: Final = frozenset(
    {ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.UPSTREAM_OVERLOADED, ErrorCode.UPSTREAM_DISCONNECTED}
)
RETRY_BASE_DELAY: Final = 0.25
RETRY_MAX_DELAY: Final = 5.0
#: How long a failed model lookup is shared with every request before the engine is asked again.
MODEL_LOOKUP_RETRY: Final = 2.0


class EngineWatch(Protocol):
    """A supervisor that can tell whether a broken stream means its engine died."""

    async def explain(self, exc: UpstreamError) -> UpstreamError:
        """The error to report for ``exc`` (``upstream_unavailable`` when the engine is down)."""
        ...


@dataclass
class RequestStats:
    """Timings and counts of one request, filled in as it runs (read for the log line)."""

    received_at: float
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    deltas: int = 0
    retries: int = 0
    completion_tokens: int | None = None  # as the engine counted them, when it did

    @property
    def ttft_ms(self) -> float | None:
        """Milliseconds from receiving the request to its first token, queueing included."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.received_at) * 1000.0


class Gateway:
    """Shared services of one server: settings, upstream, admission, model name."""

    def __init__(self, settings: Settings, upstream: Upstream, *, engine: EngineWatch | None = None) -> None:
        self.settings = settings
        self.upstream = upstream
        self.engine = engine
        self.limits = settings.limits()
        self.admission = Admission(settings.max_concurrency)
        self.metrics = Metrics()
        self.rate_limiter = RateLimiter(settings.rate_limit_requests, settings.rate_limit_tokens)
        self.registry = Registry(self)  # runs every generation; serve() starts its task
        self._model = settings.model
        # One lookup in flight, shared by every request that needs it; a failure is shared briefly.
        self._model_lookup = SharedCall(self._first_listed_model, error_ttl=MODEL_LOOKUP_RETRY)

    async def model(self) -> str:
        """The model to request: configured, or the first the engine lists (asked once)."""
        if self._model is not None:
            return self._model
        return await self._model_lookup.get()

    async def _first_listed_model(self) -> str:
        models = await self.upstream.list_models()
        if not models:
            raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine lists no models")
        self._model = models[0]
        log.info("using model %s (first listed by the engine)", self._model)
        return self._model

    async def generate(
        self, request: ChatRequest, request_id: RequestId, sender: StreamSender, stats: RequestStats,
        *, resume_token: str | None = None,
    ) -> Done | Error:
        """Run one generation, sending its events through ``sender``; return its terminal event.

        ``resume_token`` goes out in ``start`` (a resumable generation)."""
        try:
            model = await self.model()
            max_queue = self.settings.max_queue
            if max_queue is not None and self.admission.full and self.admission.queued >= max_queue:
                return Error(request_id, ErrorCode.OVERLOADED,
                             f"{self.admission.queued} requests are already waiting for capacity; retry later",
                             retry_after=OVERLOADED_RETRY_AFTER)
            # A slow reader's earlier answers still unsent: the new one waits (outbox.py, Bounds).
            await sender.wait_for_room()
            sender.event(Started(request_id, model, resume_token))
            async with self.admission.slot(sender.queued):
                stats.admitted_at = trio.current_time()
                return await self._relay_with_retries(request, request_id, model, sender, stats)
        except UpstreamError as exc:
            if self.engine is not None:
                exc = await self.engine.explain(exc)
            return Error(request_id, exc.code.value, exc.message, exc.param, exc.retry_after)

    async def _relay_with_retries(
        self, request: ChatRequest, request_id: RequestId, model: str, sender: StreamSender, stats: RequestStats
    ) -> Done:
        """Retry failures that happened before the first token and may pass (refused, 503, 429, cut).

        Never after a token was relayed (the client would see text twice), never for timeouts (the
        client already waited the timeout), and never for longer than :data:`RETRY_MAX_DELAY` at once.
        """
        attempt = 0
        while True:
            try:
                return await self._relay(request, request_id, model, sender, stats)
            except UpstreamError as exc:
                # Safe whatever the engine says: the client has seen no text of this request yet.
                if stats.deltas or attempt >= self.settings.upstream_retries or exc.code not in RETRYABLE_CODES:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else RETRY_BASE_DELAY * 2**attempt
                if delay > RETRY_MAX_DELAY:
                    raise
                attempt += 1
                stats.retries = attempt
                log.info("request id=%s: %s (%s); retry %d in %.2f s", request_id, exc.code, exc.message, attempt,
                         delay)
                await trio.sleep(delay)

    async def _relay(
        self, request: ChatRequest, request_id: RequestId, model: str, sender: StreamSender, stats: RequestStats
    ) -> Done:
        payload: dict[str, object] = {"model": model, "messages": [dict(m) for m in request.messages]}
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        payload.update(request.sampling.to_payload())
        payload.update(request.chat_fields)
        finish_reason: str | None = None
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        calls: dict[int, list[Any]] = {}  # index -> [call_id, name, argument fragments]
        async with self.upstream.stream_chat(payload) as chunks:
            async for chunk in chunks:
                over = False
                if chunk.reasoning:  # a reasoning model's thinking comes before its answer
                    over = sender.put_reasoning(chunk.reasoning)
                    _count_delta(stats)
                if chunk.content:
                    _count_delta(stats)
                    over = sender.put_token(chunk.content, chunk.logprobs) or over
                if chunk.tool_calls:
                    for call in chunk.tool_calls:
                        over = sender.put_tool_call(call.index, call.call_id, call.name, call.arguments) or over
                        _assemble(calls, call.index, call.call_id, call.name, call.arguments)
                    _count_delta(stats)
                if over:  # the client reads slower than the engine writes
                    with chunks.paused():
                        await sender.drained()
                if chunk.finish_reason is not None:
                    finish_reason = chunk.finish_reason
                if chunk.has_usage:
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        stats.completion_tokens = completion_tokens
        if completion_tokens is None:
            usage = Usage(None, stats.deltas, source="gateway")
        else:
            usage = Usage(prompt_tokens, completion_tokens)
        return Done(request_id, finish_reason, usage, stats.ttft_ms, _decode_rate(usage.completion_tokens, stats),
                    tuple(AssembledToolCall(c[0], c[1], "".join(c[2])) for _, c in sorted(calls.items())))


def _count_delta(stats: RequestStats) -> None:
    """One delta of output (text, reasoning or a tool call), for TTFT, the decode rate and retries."""
    now = trio.current_time()
    if stats.first_token_at is None:
        stats.first_token_at = now
    stats.last_token_at = now
    stats.deltas += 1


def _assemble(calls: dict[int, list[Any]], index: int, call_id: str | None, name: str | None, arguments: str) -> None:
    call = calls.get(index)
    if call is None:
        call = calls[index] = [None, None, []]
    if call_id is not None:
        call[0] = call_id
    if name is not None and call[1] is None:
        call[1] = name
    call[2].append(arguments)


def _decode_rate(tokens: int, stats: RequestStats) -> float | None:
    """Tokens per second after the first one (the engine's decode speed as the client saw it)."""
    if stats.first_token_at is None or stats.last_token_at is None or tokens < 2:
        return None
    elapsed = stats.last_token_at - stats.first_token_at
    return (tokens - 1) / elapsed if elapsed > 0 else None
