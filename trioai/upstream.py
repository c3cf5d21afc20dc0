"""The engine side: httpx requests to an OpenAI-compatible API over one shared transport.

Model listing and health checks have a small pool of their own (:data:`PROBE_MAX_CONNECTIONS`), so
however many readiness probes arrive, they never take a connection a chat request needs; each probe
closes its connection after the answer, so none sits idle between probes (nothing sweeps that pool).

Resource handling: :meth:`Upstream.stream_chat` is an async context manager; leaving it (normally,
by an exception, or by cancellation) closes the HTTP response, and closing an unfinished streaming
response closes its connection, which is how vLLM learns to abort the request and free the GPU.

Error handling: every httpx exception and every non-200 answer becomes an
:class:`~trioai.errors.UpstreamError` with a code a client can act on (the mapping is
:data:`HTTP_STATUS_CODES` and :func:`upstream_error`, after httpcore's ``map_exceptions``).
Requests run on :class:`~trioai.transport.H11Transport`, a lean HTTP/1.1 transport (why: see there).
Only ``Exception`` is caught, so ``trio.Cancelled`` always passes. Engine messages are forwarded
for 4xx answers (they describe the client's request, e.g. a too-long context); 5xx bodies are only
logged, since they may hold internals, and our API key is never part of any message. Every engine
string that can reach a client (messages, ``param``, model ids) is made encodable as UTF-8 first
(:func:`~trioai.sse.encodable`), and a ``Retry-After`` is used only when it is a sane number.

Timeouts are the server's: ``connect_timeout`` for the TCP connect, ``first_token_timeout`` from
sending the request to the first data event, ``token_timeout`` between data events after that.
Keep-alive comment lines do not reset them: a stalled engine that only sends comments times out.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final

import httpx
import trio

from . import __version__
from .errors import ErrorCode, UpstreamError
from .outbox import RelaySample, arm_relay_sample, disarm_relay_sample, flush_deferred
from .protocol import dumps
from .sse import DONE, Chunk, SSEDecoder, encodable, parse_chunk
from .transport import REQUEST_WRITTEN, H11Transport, ResponseBody, SentRequest

log = logging.getLogger("trioai.upstream")

# Statuses whose engine message describes the client's own request, so it is passed on.
CLIENT_FAULT_STATUSES: Final = frozenset({400, 413, 422})
HTTP_STATUS_CODES: Final[dict[int, tuple[ErrorCode, bool]]] = {
    # status: (code the client sees, retryable)
    408: (ErrorCode.UPSTREAM_TIMEOUT, True),
    429: (ErrorCode.UPSTREAM_OVERLOADED, True),
    502: (ErrorCode.UPSTREAM_UNAVAILABLE, True),
    503: (ErrorCode.UPSTREAM_UNAVAILABLE, True),
    504: (ErrorCode.UPSTREAM_TIMEOUT, True),
}
ERROR_BODY_LIMIT: Final = 64 * 1024
FINISH_TIMEOUT: Final = 0.5
FINISH_LIMIT: Final = 64 * 1024
MODELS_TIMEOUT: Final = 10.0
PROBE_MAX_CONNECTIONS: Final = 2
#: One engine read in this many is timed through the gateway (``Upstream.on_relay``): a clock read
#: and a histogram update are cheap, but not free on the per-token path.
RELAY_SAMPLE_EVERY: Final = 16
# Beyond this a Retry-After is taken to mean "much later", not the engine's exact wish.
MAX_RETRY_AFTER: Final = 3600.0
# RFC 9110 delay-seconds (digits), with a fraction tolerated; not inf, nan, 1e9, -5 or an HTTP date.
_DELAY_SECONDS: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


def upstream_error(exc: httpx.HTTPError, phase: str) -> UpstreamError:
    """The :class:`UpstreamError` for an httpx exception; ``phase`` goes into the message."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE, f"cannot connect to the engine ({phase})", retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, f"engine timed out ({phase})", retryable=True)
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return UpstreamError(
            ErrorCode.UPSTREAM_DISCONNECTED, f"engine closed the connection ({phase})", retryable=phase != "stream"
        )
    return UpstreamError(ErrorCode.UPSTREAM_ERROR, f"engine request failed ({phase})")


@contextmanager
def map_httpx_errors(phase: str) -> Iterator[None]:
    """Turn httpx's exceptions into :class:`UpstreamError` (see :func:`upstream_error`)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise upstream_error(exc, phase) from exc


def _iterator_reader(parts: AsyncIterator[bytes]) -> Callable[[], Awaitable[bytes | None]]:
    """``next_data`` for a body read through httpx's iterator: its next part, None at the end."""

    async def next_data() -> bytes | None:
        try:
            return await parts.__anext__()
        except StopAsyncIteration:
            return None

    return next_data


class ChatStream:
    """The chunks of one streaming chat completion, read with the server's timeouts.

    Iterating yields each :class:`~trioai.sse.Chunk` up to (not including) ``[DONE]``; a stream that
    ends without ``[DONE]`` raises ``upstream_disconnected``.

    The first-token and between-token timeouts are one cancel scope around the whole stream (see
    :meth:`Upstream.stream_chat`) whose deadline moves on with the tokens, rather than a scope per
    read: this is the per-token path. A between-token timeout fires at most 1/8 late. Time spent
    waiting for a slow client is not the engine's: wrap such waits in :meth:`paused`.
    """

    def __init__(self, response: httpx.Response, decoder: SSEDecoder, first_token_timeout: float,
                 token_timeout: float, on_relay: Callable[[float], None] | None = None) -> None:
        self._response = response
        # H11Transport's body is read per engine read by a plain coroutine; another transport's
        # through httpx's iterator.
        body = response.stream
        self._parts: AsyncGenerator[bytes, None] | None = None
        if isinstance(body, ResponseBody):
            self._next_data: Callable[[], Awaitable[bytes | None]] = body.next_data
        else:
            self._parts = parts = response.aiter_raw()  # type: ignore[assignment]
            self._next_data = _iterator_reader(parts)
        self._decoder = decoder
        self._pending: collections.deque[Chunk] = collections.deque()
        self._deadline = trio.current_time() + first_token_timeout
        self.timer = trio.CancelScope(deadline=self._deadline)
        self._token_timeout = token_timeout
        self.first = True
        self._done = False
        # Relay-latency sampling (outbox.RelaySample): every RELAY_SAMPLE_EVERY-th read is timed.
        self._on_relay = on_relay
        self._reads = 0
        self._sample: RelaySample | None = None  # of the read whose chunks are being returned

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> Chunk:
        pending = self._pending
        while not pending:
            # The frames the previous chunks queued go out before this task waits (outbox.py).
            flush_deferred()
            if self._sample is not None:
                if disarm_relay_sample(self._sample):  # no delta took it (a role-only chunk): time the next read
                    self._reads = 0
                self._sample = None
            if self._done:
                raise StopAsyncIteration
            try:
                data = await self._next_data()
            except httpx.HTTPError as exc:
                raise upstream_error(exc, "stream") from exc
            if data is None:
                raise UpstreamError(ErrorCode.UPSTREAM_DISCONNECTED, "engine ended the stream without [DONE]")
            if self._on_relay is not None:
                self._reads += 1
                if self._reads % RELAY_SAMPLE_EVERY == 1:  # the first read with a delta, then one in N
                    # From the socket read itself when the transport says when it was (H11Transport).
                    read_at = getattr(self._response.stream, "read_at", None) or time.perf_counter()
                    self._sample = RelaySample(read_at, self._on_relay)
            progressed = False
            for event in self._decoder.feed(data):
                chunk = parse_chunk(event)
                if chunk is DONE:
                    self._done = True
                    break
                # A role-only first chunk is not a token: the first-token deadline still runs.
                progressed = progressed or not self.first or bool(
                    chunk.content or chunk.finish_reason is not None or chunk.has_usage
                )
                pending.append(chunk)
            if progressed:
                # Setting a deadline is not free (trio re-files the scope), so it moves in steps:
                # never before last token + token_timeout, at most an eighth of that later.
                limit = trio.current_time() + self._token_timeout
                if self.first or limit > self._deadline:
                    self._deadline = self.timer.deadline = limit + self._token_timeout / 8
                    self.first = False
            if self._sample is not None:
                arm_relay_sample(self._sample)  # the next delta queued carries it (outbox.py)
        return pending.popleft()

    @property
    def done(self) -> bool:
        """True once ``[DONE]`` arrived."""
        return self._done

    async def read_rest(self, limit: int, seconds: float) -> bytes:
        """Up to ``limit`` bytes of what is left of the HTTP body, within ``seconds`` (what arrived
        by then is returned, hence a bound of its own rather than the caller's cancel scope).

        For an error answer's body, and after ``[DONE]`` for the body's end, so that the connection
        is reused: a body that does not end within the bounds just loses its connection.
        """
        body = b""
        with trio.move_on_after(seconds):
            try:
                while (part := await self._next_data()) is not None:
                    body += part
                    if len(body) >= limit:
                        break
            except httpx.HTTPError:
                pass  # the caller has what arrived; the connection is closed with the response
        return body[:limit]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the engine's clock while the caller waits for something else (a slow client)."""
        self.timer.deadline = math.inf
        try:
            yield
        finally:
            self._deadline = self.timer.deadline = trio.current_time() + self._token_timeout

    async def aclose(self) -> None:
        """Stop reading and close the HTTP response (and with it, an unfinished request)."""
        try:
            if self._parts is not None:
                await self._parts.aclose()
        finally:
            await self._response.aclose()


class Upstream:
    """The shared client to one OpenAI-compatible engine (``base_url`` ends in ``/v1``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        first_token_timeout: float = 120.0,
        token_timeout: float = 30.0,
        max_connections: int = 64,
        max_line_bytes: int = 1 << 20,
        transport: httpx.AsyncBaseTransport | None = None,
        probe_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        self.max_line_bytes = max_line_bytes
        # identity: the stream is read raw (no decompression step on the per-token path).
        headers = {"user-agent": f"trioai/{__version__}", "accept-encoding": "identity"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.transport = transport or H11Transport(max_connections=max_connections)
        # Issue 19's histograms (the gateway sets them to its metrics' observe): seconds from a
        # request's start (``stream_chat``'s ``started_at``) to its engine request written, and
        # from a sampled engine read to the frame carrying it handed to the kernel.
        self.on_request_start: Callable[[float], None] | None = None
        self.on_relay: Callable[[float], None] | None = None
        # Read timeouts are ours (first/next token); httpx's would count keep-alive comments.
        timeout = httpx.Timeout(connect=connect_timeout, read=None, write=connect_timeout, pool=connect_timeout)
        self._probes = httpx.AsyncClient(
            base_url=self.base_url + "/", headers=headers, timeout=timeout, trust_env=False,
            transport=probe_transport or H11Transport(max_connections=PROBE_MAX_CONNECTIONS),
        )
        # What a chat request repeats, built once (see stream_chat).
        self._chat_url = httpx.URL(self.base_url + "/chat/completions")
        # send_chat_now's transport can write at once (plain HTTP): else it would build requests for nothing.
        self._sends_now = isinstance(self.transport, H11Transport) and self._chat_url.scheme == "http"
        # Every header but the body's length, Host included: a request built from them with its body
        # as a stream gets nothing added or checked again by httpx (a quarter of the cost of building
        # one from ``content=``). httpx's defaults ``accept: */*`` and ``connection: keep-alive``
        # are left out: HTTP/1.1 keeps the connection anyway, and the answer is an event stream.
        self._chat_headers = [(b"Host", self._chat_url.netloc),
                              *((name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()),
                              (b"Content-Type", b"application/json")]
        self._chat_extensions = {"timeout": timeout.as_dict()}

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection, chat and probe pools both."""
        try:
            await self.transport.aclose()
        finally:
            await self._probes.aclose()

    async def list_models(self) -> list[str]:
        """The model ids ``GET /models`` lists, in order (on the probe pool, not the chat pool)."""
        with trio.move_on_after(MODELS_TIMEOUT) as scope, map_httpx_errors("listing models"):
            response = await self._probes.get("models", headers={"connection": "close"})
        if scope.cancelled_caught:
            raise UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, "engine did not list its models in time", retryable=True)
        if response.status_code != 200:
            raise _status_error(response.status_code, response.content, response.headers)
        try:
            data = response.json()["data"]
            return [encodable(str(m["id"])) for m in data]
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine sent an invalid model list") from None

    async def health(self) -> bool:
        """True when the engine lists its models within the timeout."""
        try:
            await self.list_models()
        except UpstreamError:
            return False
        return True

    def _chat_request(self, payload: dict[str, Any], started_at: float | None) -> httpx.Request:
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        extensions: dict[str, Any] = self._chat_extensions
        hook = self.on_request_start
        if started_at is not None and hook is not None:
            extensions = {**extensions, REQUEST_WRITTEN: lambda: hook(trio.current_time() - started_at)}
        content = dumps(body).encode()
        headers = [*self._chat_headers, (b"Content-Length", str(len(content)).encode("ascii"))]
        return httpx.Request("POST", self._chat_url, headers=headers, extensions=extensions,
                             stream=httpx.ByteStream(content))

    def send_chat_now(self, payload: dict[str, Any], *, started_at: float | None = None) -> SentRequest | None:
        """Write a streaming chat request at once on an idle pooled connection (see
        :meth:`H11Transport.send_now`), or None when that would wait; :meth:`stream_chat` with
        ``sent=`` reads its answer. The caller abandons what it does not read (``SentRequest.abandon``).
        """
        transport = self.transport
        if not self._sends_now or not isinstance(transport, H11Transport):
            return None
        return transport.send_now(self._chat_request(payload, started_at))

    @asynccontextmanager
    async def stream_chat(self, payload: dict[str, Any], *, started_at: float | None = None,
                          sent: SentRequest | None = None) -> AsyncIterator[ChatStream]:
        """POST a streaming chat completion; yield its chunks; close the response on exit.

        ``started_at`` (``trio.current_time()`` when the request was taken): once the request's
        bytes are written to the engine, :attr:`on_request_start` is told the seconds since.
        ``sent``: the request, already written by :meth:`send_chat_now` (``payload`` is then unused).

        The request goes straight to the transport (httpx's transport API) rather than through
        ``AsyncClient.send``: a chat request needs none of the client's layers (URL merging, auth
        flow, redirects, event hooks, a cookie jar, which for a gateway would even be shared by all
        its users), and they were about a fifth of the CPU of starting one (``docs/benchmarks.md``).
        """
        with trio.move_on_after(self.first_token_timeout) as scope, map_httpx_errors("sending the request"):
            if sent is not None:
                response = await sent.response()
            else:
                response = await self.transport.handle_async_request(self._chat_request(payload, started_at))
        if scope.cancelled_caught:
            raise UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, "engine did not answer in time", retryable=True)
        stream = ChatStream(response, SSEDecoder(self.max_line_bytes), self.first_token_timeout, self.token_timeout,
                            self.on_relay)
        try:
            if response.status_code != 200:
                error_body = await stream.read_rest(ERROR_BODY_LIMIT, MODELS_TIMEOUT)
                raise _status_error(response.status_code, error_body, response.headers)
            with stream.timer:
                yield stream
            if stream.timer.cancelled_caught:
                what = "first token" if stream.first else "next token"
                raise UpstreamError(
                    ErrorCode.UPSTREAM_TIMEOUT, f"engine sent no {what} in time", retryable=stream.first
                )
            if stream.done:  # read the body's end: the connection is reused, the next request skips a connect
                await stream.read_rest(FINISH_LIMIT, FINISH_TIMEOUT)
        finally:
            await stream.aclose()


def _status_error(status: int, body: bytes, headers: httpx.Headers) -> UpstreamError:
    message, param = _engine_message(body)
    if status in CLIENT_FAULT_STATUSES:
        return UpstreamError(
            ErrorCode.INVALID_REQUEST,
            message or f"engine rejected the request (HTTP {status})",
            status=status,
            param=param,
        )
    log.warning("engine answered HTTP %d: %s", status, (message or body[:500].decode("utf-8", "replace")))
    code, retryable = HTTP_STATUS_CODES.get(status, (ErrorCode.UPSTREAM_ERROR, False))
    if status in (401, 403):
        text = f"engine refused the gateway's credentials (HTTP {status})"
    elif status == 404:
        text = "engine has no such model or endpoint (HTTP 404)"
    else:
        text = f"engine answered HTTP {status}"
    return UpstreamError(code, text, retryable=retryable, status=status,
                         retry_after=parse_retry_after(headers.get("retry-after")))


def _engine_message(body: bytes) -> tuple[str | None, str | None]:
    """The human message and ``param`` of an OpenAI/vLLM/FastAPI error body, clipped."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        text = body.decode("utf-8", "replace").strip()
        return (text[:1000] or None), None
    detail = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(detail, dict):
        message = detail.get("message") or detail.get("detail")
        param = detail.get("param")
        return (
            (encodable(str(message)[:1000]) if message else None),
            (encodable(param) if isinstance(param, str) else None),
        )
    return encodable(str(detail)[:1000]), None


def parse_retry_after(value: str | None) -> float | None:
    """The seconds a ``Retry-After`` header value asks for, at most :data:`MAX_RETRY_AFTER`.

    None when there is none or it is not a plain non-negative number (the HTTP-date form is ignored).
    """
    if value is None or not _DELAY_SECONDS.fullmatch(value.strip()):
        return None
    return min(float(value), MAX_RETRY_AFTER)
