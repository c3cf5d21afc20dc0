"""What all connections share, and the life of one generation from admission to its last token.

:class:`Gateway` holds the settings, the engines (:class:`~trioai.enginepool.EnginePool`: models,
admission per model, routing, health), rate limits and metrics. :meth:`Gateway.generate` runs one
request: ``start``, ``queued`` while waiting for capacity, each delta as ``token`` (``failover``
when another engine continues a cut answer), and returns the terminal event (``done`` or ``error``)
for the caller to send. Cancellation is the caller's: it runs this inside the request's cancel
scope, and leaving the ``stream_chat`` block closes the upstream stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from .admission import Admission
from .config import Settings
from .enginepool import Engine, EngineMetrics, EnginePool, is_engine_fault
from .errors import ErrorCode, UpstreamError
from .generation import Registry
from .metrics import Metrics
from .outbox import StreamSender
from .protocol import AssembledToolCall, ChatRequest, Done, Error, Failover, RequestId, Started, Usage
from .ratelimit import RateLimiter
from .sharedgen import SharedGenerations
from .state import State
from .transport import SentRequest
from .upstream import Upstream

log = logging.getLogger("trioai.gateway")

OVERLOADED_RETRY_AFTER: Final = 1.0
RETRYABLE_CODES: Final = frozenset(
    {ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.UPSTREAM_OVERLOADED, ErrorCode.UPSTREAM_DISCONNECTED}
)
RETRY_BASE_DELAY: Final = 0.25
RETRY_MAX_DELAY: Final = 5.0


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
    prefer_engine: str | None = None  # the engine that served this connection last (prefix-cache locality)
    engine: str | None = None  # the engine it ran on (the last one, after a failover)

    @property
    def ttft_ms(self) -> float | None:
        """Milliseconds from receiving the request to its first token, queueing included."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.received_at) * 1000.0


class Gateway:
    """Shared services of one server: settings, the engines, admission, rate limits, metrics."""

    def __init__(self, settings: Settings, pool: EnginePool, *, engine: EngineWatch | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.engine = engine
        self.limits = settings.limits()
        self.metrics = Metrics()
        for member in pool.engines:  # request-start and relay-latency histograms (issue 19)
            self.metrics.watch_upstream(member.upstream)
        self.engine_metrics = EngineMetrics(pool, self.metrics.registry)
        self.rate_limiter = RateLimiter(settings.rate_limit_requests, settings.rate_limit_tokens)
        self.registry = Registry(self)  # runs every generation; serve() starts its task
        self.shared: SharedGenerations | None = None  # with --redis: resumable generations any instance resumes
        self.state: State | None = None  # what serve() shares state through (in process without --redis)

    @property
    def upstream(self) -> Upstream:
        """The first engine's client (with one engine: the engine's)."""
        return self.pool.engines[0].upstream

    @property
    def admission(self) -> Admission:
        """The queue of the default model (with one engine: the one queue)."""
        models = self.pool.models
        return self.pool.admission(self.pool.default_model or (models[0] if models else ""))

    async def model(self) -> str:
        """The default model: configured, or the first the first engine lists (asked once)."""
        return await self.pool.resolve(None)

    def begin(self, request: ChatRequest, request_id: RequestId, sender: StreamSender, stats: RequestStats,
              *, resume_token: str | None = None) -> Begun | None:
        """Start a generation up to its engine request written, now, when nothing on the way has to
        wait: the model known, capacity and engine room free, the client's buffer not full, a pooled
        or newly started plain connection to the engine. Else None, and nothing was done (:meth:`generate` does it all).

        The session calls this in the step that took the request's frame, before its next frame:
        in a burst of requests each then reaches its engine after its own work alone, not after a
        pass over the whole burst (issue 19's request start). :meth:`generate` with ``begun`` reads
        the answer; the ``start`` event is queued here, as :meth:`generate` would.
        """
        pool = self.pool
        model = pool.known_model(request.model)
        if model is None or not sender.has_room:
            return None
        admission = pool.admission(model)
        borrower = admission.take_now()
        if borrower is None:
            return None
        engine = pool.engine_now(model, stats.prefer_engine)
        if engine is None:
            admission.release(borrower)
            return None
        progress = Progress(payload(request, model))
        sent = engine.upstream.send_chat_now(progress.payload, started_at=stats.received_at)
        if sent is None:
            pool.leave(engine)
            admission.release(borrower)
            return None
        stats.admitted_at = trio.current_time()
        sender.event(Started(request_id, model, resume_token))
        return Begun(pool, model, admission, borrower, engine, progress, sent)

    async def generate(
        self, request: ChatRequest, request_id: RequestId, sender: StreamSender, stats: RequestStats,
        *, resume_token: str | None = None, begun: Begun | None = None,
    ) -> Done | Error:
        """Run one generation, sending its events through ``sender``; return its terminal event.

        ``resume_token`` goes out in ``start`` (a resumable generation). ``begun``: what
        :meth:`begin` started of it (released here, whatever happens)."""
        try:
            if begun is not None:
                with begun:
                    return await self._run(request, request_id, begun.model, sender, stats, begun.progress, begun)
            model = await self.pool.resolve(request.model)
            admission = self.pool.admission(model)
            max_queue = self.settings.max_queue
            if max_queue is not None and admission.full and admission.queued >= max_queue:
                return Error(request_id, ErrorCode.OVERLOADED,
                             f"{admission.queued} requests are already waiting for capacity; retry later",
                             retry_after=OVERLOADED_RETRY_AFTER)
            # A slow reader's earlier answers still unsent: the new one waits (outbox.py, Bounds).
            await sender.wait_for_room()
            sender.event(Started(request_id, model, resume_token))
            async with admission.slot(sender.queued):
                stats.admitted_at = trio.current_time()
                return await self._run(request, request_id, model, sender, stats)
        except UpstreamError as exc:
            if self.engine is not None:
                exc = await self.engine.explain(exc)
            return Error(request_id, exc.code.value, exc.message, exc.param, exc.retry_after)

    async def continue_from(self, request: ChatRequest, request_id: RequestId, parts: Sequence[str],
                            sender: StreamSender, stats: RequestStats) -> Done | Error:
        """Continue a generation another instance started and lost: ``parts`` are the text deltas its
        clients were sent (from the shared log); the engine writes on after them. No ``start``
        again (it is in the log): the events number on from ``sender``'s first ``seq``."""
        try:
            model = await self.pool.resolve(request.model)
            body = payload(request, model)
            progress = Progress(body)
            if parts:  # else nothing was sent yet: the request runs as it was
                progress.text.extend(parts)
                if not progress.continue_after_cut(request):
                    return Error(request_id, ErrorCode.UPSTREAM_DISCONNECTED,
                                 "the instance running this generation stopped, and its answer cannot be continued "
                                 "exactly (structured output was asked, or no tokens are left)")
            async with self.pool.admission(model).slot(sender.queued):
                stats.admitted_at = trio.current_time()
                return await self._run(request, request_id, model, sender, stats, progress)
        except UpstreamError as exc:
            return Error(request_id, exc.code.value, exc.message, exc.param, exc.retry_after)

    async def _run(
        self, request: ChatRequest, request_id: RequestId, model: str, sender: StreamSender, stats: RequestStats,
        progress: Progress | None = None, begun: Begun | None = None,
    ) -> Done:
        """Relay the request from an engine; on failure, try again where that is safe.

        Before the first token, a failure that may pass (refused, 503, 429, cut) is retried, on
        another healthy engine of the model at once when there is one, else on the same after a
        backoff; never for timeouts (the client already waited the timeout) and never for longer
        than :data:`RETRY_MAX_DELAY` at once. After the first token, a broken, failed or stalled
        stream is *continued* on another engine (see :func:`continuation`) when both engines allow
        it and only text was relayed; otherwise the client gets the error.
        """
        if progress is None:
            progress = Progress(payload(request, model))
        retries = 0
        tried: list[str] = []
        prefer = stats.prefer_engine
        cause: UpstreamError | None = None  # what broke the answer that a continuation carries on
        usable: Callable[[Engine], bool] | None = None  # after a cut: only engines that may continue it
        if progress.continuations:
            usable = may_continue
        while True:
            # The first attempt of a begun generation: its engine and request are taken already.
            holding = begun.engine_held() if begun is not None else self.pool.engine_for(model, prefer, tried, usable)
            async with holding as engine:
                stats.engine = engine.name
                try:
                    done = await self._relay(engine, request_id, sender, stats, progress,
                                             begun.sent if begun is not None else None)
                except UpstreamError as exc:
                    self.pool.record(engine, exc)
                    self.engine_metrics.requests.labels(engine.name, "failed").inc()
                    failure = exc
                else:
                    self.pool.record(engine, None)
                    self.engine_metrics.requests.labels(engine.name, "ok").inc()
                    return done
            tried.append(engine.name)
            prefer = None
            begun = None
            if not stats.deltas:
                retries = await self._before_first_token(failure, request_id, model, tried, retries, stats)
                continue
            if not self._continue(failure, engine, request, request_id, model, tried, sender, progress, stats):
                # An engine that refused the continuation (400: it lacks these fields) is not the news.
                raise cause if cause is not None and not is_engine_fault(failure) else failure
            cause = cause or failure
            usable = may_continue

    async def _before_first_token(self, exc: UpstreamError, request_id: RequestId, model: str, tried: list[str],
                                  retries: int, stats: RequestStats) -> int:
        """Wait before the next try of a request that has relayed nothing (or raise ``exc``)."""
        if retries >= self.settings.upstream_retries or exc.code not in RETRYABLE_CODES:
            raise exc
        retries += 1
        stats.retries = retries
        other = self.pool.alternative(model, tried)
        if other is not None:  # another engine: no reason to wait
            self.engine_metrics.failovers.labels("retry").inc()
            log.info("request id=%s: %s on engine %s (%s); retry %d on engine %s", request_id, exc.code, tried[-1],
                     exc.message, retries, other.name)
            return retries
        delay = exc.retry_after if exc.retry_after is not None else RETRY_BASE_DELAY * 2 ** (retries - 1)
        if delay > RETRY_MAX_DELAY:
            raise exc
        tried.clear()  # the same engine(s) again
        log.info("request id=%s: %s (%s); retry %d in %.2f s", request_id, exc.code, exc.message, retries, delay)
        await trio.sleep(delay)
        return retries

    def _continue(self, exc: UpstreamError, engine: Engine, request: ChatRequest, request_id: RequestId, model: str,
                  tried: list[str], sender: StreamSender, progress: Progress, stats: RequestStats) -> bool:
        """Set up the continuation of a cut answer on another engine; False when it may not be."""
        if (not is_engine_fault(exc) or not progress.continuable or not engine.spec.can_continue
                or progress.continuations >= self.settings.upstream_retries):
            return False
        target = self.pool.alternative(model, tried, may_continue)
        if target is None:
            return False
        if not progress.continue_after_cut(request):
            return False
        self.engine_metrics.failovers.labels("continuation").inc()
        log.warning("request id=%s: engine %s failed after %d tokens (%s); continuing on engine %s", request_id,
                    engine.name, stats.deltas, exc.message, target.name)
        sender.event(Failover(request_id, engine.name, target.name, sender.last_seq))
        return True

    async def _relay(
        self, engine: Engine, request_id: RequestId, sender: StreamSender, stats: RequestStats, progress: Progress,
        sent: SentRequest | None = None,
    ) -> Done:
        finish_reason: str | None = None
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        calls = progress.calls
        text = progress.text
        started_at = None if stats.retries or stats.deltas else stats.received_at  # request start: 1st attempt
        async with engine.upstream.stream_chat(progress.payload, started_at=started_at, sent=sent) as chunks:
            async for chunk in chunks:
                over = False
                if chunk.reasoning:  # a reasoning model's thinking comes before its answer
                    over = sender.put_reasoning(chunk.reasoning)
                    _count_delta(stats)
                    progress.continuable = False
                content = chunk.content
                if content and progress.skip:
                    content = progress.unsent(content)
                if content:
                    _count_delta(stats)
                    text.append(content)
                    over = sender.put_token(content, chunk.logprobs) or over
                if chunk.tool_calls:
                    for call in chunk.tool_calls:
                        over = sender.put_tool_call(call.index, call.call_id, call.name, call.arguments) or over
                        _assemble(calls, call.index, call.call_id, call.name, call.arguments)
                    _count_delta(stats)
                    progress.continuable = False
                if over:  # the client reads slower than the engine writes
                    with chunks.paused():
                        await sender.drained()
                if chunk.finish_reason is not None:
                    finish_reason = chunk.finish_reason
                if chunk.has_usage:
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        usage = progress.usage(prompt_tokens, completion_tokens, stats.deltas)
        stats.completion_tokens = None if usage.source == "gateway" else usage.completion_tokens
        return Done(request_id, finish_reason, usage, stats.ttft_ms, _decode_rate(usage.completion_tokens, stats),
                    tuple(AssembledToolCall(c[0], c[1], "".join(c[2])) for _, c in sorted(calls.items())))


class Begun:
    """What :meth:`Gateway.begin` started of a generation: its model, capacity unit, engine room
    and written request. As a context manager it gives back, on exit, whatever is still held
    (each once): the unit, the engine's room, the request's connection if its answer was not read."""

    __slots__ = ("model", "engine", "progress", "sent", "_pool", "_admission", "_borrower", "_on_engine")

    def __init__(self, pool: EnginePool, model: str, admission: Admission, borrower: object, engine: Engine,
                 progress: Progress, sent: SentRequest) -> None:
        self.model = model
        self.engine = engine
        self.progress = progress
        self.sent = sent
        self._pool = pool
        self._admission = admission
        self._borrower: object | None = borrower
        self._on_engine = True

    def __enter__(self) -> Begun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Give back whatever is still held (each thing once; safe to call again)."""
        self.sent.abandon()
        self._leave_engine()
        borrower, self._borrower = self._borrower, None
        if borrower is not None:
            self._admission.release(borrower)

    @asynccontextmanager
    async def engine_held(self) -> AsyncIterator[Engine]:
        """The engine for the first attempt's body (as ``EnginePool.engine_for``); its room is given
        back after it."""
        try:
            yield self.engine
        finally:
            self._leave_engine()

    def _leave_engine(self) -> None:
        if self._on_engine:
            self._on_engine = False
            self._pool.leave(self.engine)


def may_continue(engine: Engine) -> bool:
    """Whether an engine may continue another's cut answer (its entry's ``continue``)."""
    return engine.spec.can_continue


def payload(request: ChatRequest, model: str) -> dict[str, Any]:
    """The engine request body of a chat request (without the streaming options)."""
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in request.messages]}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    body.update(request.sampling.to_payload())
    body.update(request.chat_fields)
    return body


#: Request fields a continuation cannot honour: the engine would start the constrained output over.
NOT_CONTINUABLE: Final = frozenset({"response_format", "guided_json", "guided_regex", "guided_choice",
                                    "guided_grammar", "structured_outputs", "continue_final_message",
                                    "add_generation_prompt", "echo"})


def continuation(body: dict[str, Any], text: str, produced: int, request: ChatRequest) -> dict[str, Any] | None:
    """The engine request that continues ``body``'s answer after ``text`` (``produced`` deltas of it).

    vLLM's ``continue_final_message`` with ``add_generation_prompt: false``: the partial answer is
    the last message, an assistant one, and the model writes on from its end; ``max_tokens`` is
    what is left. None when that cannot be exact: no text yet, no tokens left, or a request whose
    output is constrained from its start (structured output).

    The partial answer goes without its trailing whitespace: chat templates (Gemma's, Llama's)
    trim message content, so the engine writes that whitespace again; the gateway then swallows
    it (:attr:`Progress.skip`), and ``produced`` must not count the whitespace-only deltas
    (:func:`trailing_whitespace`).
    """
    prefix = text.rstrip()
    if not prefix or NOT_CONTINUABLE.intersection(request.chat_fields):
        return None
    follow_up = dict(body)
    follow_up["messages"] = [*body["messages"], {"role": "assistant", "content": prefix}]
    follow_up["continue_final_message"] = True
    follow_up["add_generation_prompt"] = False
    if "max_tokens" in body:
        left = int(body["max_tokens"]) - produced
        if left < 1:
            return None
        follow_up["max_tokens"] = left
    return follow_up


def trailing_whitespace(parts: Sequence[str]) -> tuple[str, int]:
    """The whitespace that ends the text of ``parts`` (the engine writes it again after a
    continuation), and how many of the last parts are whitespace only (deltas not to count)."""
    text = "".join(parts)
    whitespace = text[len(text.rstrip()):]
    count = 0
    for part in reversed(parts):
        if part.strip():
            break
        count += 1
    return whitespace, count


class Progress:
    """What a request has relayed so far, across the engines it ran on (for continuations)."""

    __slots__ = ("original", "payload", "text", "calls", "continuable", "continuations", "skip", "_deltas_before",
                 "_completion_tokens")

    def __init__(self, body: dict[str, Any]) -> None:
        self.original = body  # what the client asked: every continuation is built from it
        self.payload = body  # what the current part sends
        self.text: list[str] = []  # content relayed so far, every part
        self.calls: dict[int, list[Any]] = {}  # index -> [call_id, name, argument fragments]
        self.continuable = True  # False once reasoning or a tool call was relayed
        self.continuations = 0
        self.skip = ""  # text the next part writes again first (see continuation): not sent twice
        self._deltas_before = 0  # content deltas of the parts before the current one
        self._completion_tokens = 0  # their tokens, as the gateway counted them (their engines died first)

    def continue_after_cut(self, request: ChatRequest) -> bool:
        """Make the next part continue the text relayed so far (:func:`continuation` of the original
        request, whitespace-only deltas not counted as produced); False when that cannot be exact."""
        follow_up = continuation(self.original, "".join(self.text),
                                 len(self.text) - trailing_whitespace(self.text)[1], request)
        if follow_up is None:
            return False
        self.next_part(follow_up)
        return True

    def next_part(self, body: dict[str, Any]) -> None:
        """The current part broke off: the next one sends ``body``; count what the broken one relayed."""
        produced = len(self.text)
        self._completion_tokens += produced - self._deltas_before
        self._deltas_before = produced
        self.continuations += 1
        self.payload = body
        self.skip = trailing_whitespace(self.text)[0]

    def unsent(self, content: str) -> str:
        """What of a delta the client has not seen yet: after a continuation, the engine's first
        deltas may write again the whitespace the partial answer ended with."""
        skip = self.skip
        matched = 0
        while matched < len(content) and matched < len(skip) and content[matched] == skip[matched]:
            matched += 1
        if matched == len(content):
            self.skip = skip[matched:]  # all of it written again: wait for the rest
            return ""
        self.skip = ""  # done (or the engine went another way: nothing more to compare)
        return content[matched:]

    def usage(self, prompt_tokens: int | None, completion_tokens: int | None, deltas: int) -> Usage:
        """The usage of every part added: a broken part's completion as the gateway counted it, the
        last part's as its engine reported (``source`` ``"mixed"``), prompt tokens the last part's."""
        if not self.continuations:
            if completion_tokens is None:
                return Usage(None, deltas, source="gateway")
            return Usage(prompt_tokens, completion_tokens)
        if completion_tokens is None:
            return Usage(None, len(self.text), source="gateway")
        return Usage(prompt_tokens, self._completion_tokens + completion_tokens, source="mixed")


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
