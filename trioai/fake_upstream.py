"""A scriptable OpenAI-compatible engine over real HTTP/1.1, for tests and benchmarks.

Not a mock: it listens on a TCP port and speaks HTTP with h11 (keep-alive included, since httpx
pools connections). Each chat-completion request is answered by a :class:`Script` chosen by a
callable, so a test can make the engine slow, fail with any status, stall, drop the connection,
send garbage or report an error mid-stream. Besides plain ``tokens`` a script can stream an ordered
mix of :class:`Delta` (content, reasoning under vLLM's or llama.cpp's field name, tool-call
fragments) and send logprobs when the request asks for them. Every request is recorded, including the moment the
engine saw the client hang up: a watcher task reads the socket while a response streams, so a
client that closes its stream is noticed at once, as vLLM notices it.

    python -m trioai.fake_upstream --port 8001 --tokens 256 --numbered   # for benchmarks
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import h11
import trio

MAX_BODY: Final = 16 * 1024 * 1024
RECEIVE_SIZE: Final = 65536
CHAT_PATH: Final = b"/v1/chat/completions"


@dataclass(frozen=True)
class ToolDelta:
    """One entry of a chunk's ``delta.tool_calls``: a fragment of the call at ``index``.

    The first fragment of a call gives ``call_id`` (``"type": "function"`` is then sent too) and
    ``name``; later ones only ``index`` and ``arguments``. ``arguments=None`` leaves the key out, as
    vLLM does on a call's first fragment (``{"name": ...}`` alone); llama.cpp sends ``""`` instead.
    """

    index: int = 0
    arguments: str | None = None
    call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One entry of ``logprobs.content``, for scripting exact values (non-finite ones included)."""

    token: str
    logprob: float = -0.1
    top_logprobs: tuple[tuple[str, float], ...] = ()
    token_bytes: tuple[int, ...] | None = None  # None: the token's UTF-8 bytes


@dataclass(frozen=True)
class Delta:
    """One streamed chunk's ``delta``: any mix of content, reasoning and tool-call fragments.

    ``logprobs=None`` means: generated for ``content`` when the request asks ``logprobs: true`` (one
    entry per delta, ``top_logprobs`` as many as asked), nothing otherwise; a tuple is sent as
    ``logprobs.content`` as is, on any delta, asked for or not.
    """

    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Script:
    """What the fake engine does for one chat-completion request.

    ``raw_lines`` go out before the first chunk; ``raw_body``, when set, is the whole streamed body
    instead (sent part by part, nothing added, not even ``[DONE]``). ``response_headers`` are added
    to the answer, error answers included.

    The stream is ``tokens`` (one content delta each) then ``deltas`` (a bare :class:`ToolDelta`
    is a delta with that one tool-call fragment); ``stall_after``, ``drop_after``,
    ``stream_error_after``, ``delay`` and ``batch`` count over both. With ``step`` the tokens after
    the first leave on a clock all requests share (each at the next multiple of ``delay``), as an
    engine that steps all its running sequences together (vLLM's continuous batching), rather than
    ``delay`` after the request's previous token. Reasoning goes out as
    ``delta.reasoning`` (vLLM 0.32) or, with ``reasoning_field="reasoning_content"``, as older vLLM
    and llama.cpp name it. A tool-calling script sets ``finish_reason="tool_calls"`` itself.
    """

    tokens: tuple[str, ...] = ()
    deltas: tuple[Delta | ToolDelta, ...] = ()
    reasoning_field: Literal["reasoning", "reasoning_content"] = "reasoning"
    first_delay: float = 0.0
    delay: float = 0.0
    step: bool = False
    finish_reason: str = "stop"
    status: int = 200
    error_message: str = "fake upstream error"
    error_param: str | None = None
    headers_delay: float = 0.0
    stall_after: int | None = None
    drop_after: int | None = None
    stream_error_after: int | None = None
    keepalive_comments: bool = False
    usage: bool = True
    send_done: bool = True
    raw_lines: tuple[bytes, ...] = ()
    raw_body: tuple[bytes, ...] | None = None
    batch: int = 1
    response_headers: tuple[tuple[str, str], ...] = ()


@dataclass
class RecordedRequest:
    """One chat-completion request as the fake engine saw it."""

    body: dict[str, Any]
    headers: dict[str, str]
    started_at: float
    chunks_sent: int = 0
    completed: bool = False
    disconnected_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)


def echo_script(body: dict[str, Any]) -> Script:
    """The default: the last user message's words, cycled, ``max_tokens`` of them (default 16)."""
    content = ""
    for message in body.get("messages", []):
        if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
            content = message["content"]
    words = content.split()
    count = body.get("max_tokens") or 16
    if words:
        tokens = tuple(f"{words[i % len(words)]} " for i in range(count))
    else:
        tokens = tuple(f"t{i} " for i in range(count))
    return Script(tokens=tokens, finish_reason="length")


def numbered_script(body: dict[str, Any]) -> Script:
    """``w0 w1 w2 …``, ``max_tokens`` of them (default 16), continuing the numbering after the words
    of a partial answer when the request asks ``continue_final_message``, as a greedy engine would."""
    start = len(continued_text(body).split())
    count = body.get("max_tokens") or 16
    return Script(tokens=tuple(f"w{i} " for i in range(start, start + count)), finish_reason="length")


def continued_text(body: dict[str, Any]) -> str:
    """The partial answer a ``continue_final_message`` request asks to continue ("" for none)."""
    messages = body.get("messages")
    if not body.get("continue_final_message") or not isinstance(messages, list) or not messages:
        return ""
    last = messages[-1]
    return str(last.get("content", "")) if isinstance(last, dict) else ""


def continuation_problem(body: dict[str, Any]) -> str | None:
    """What vLLM would answer 400 for in a continuation request (None: nothing)."""
    if not body.get("continue_final_message"):
        return None
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return "continue_final_message needs the last message to be the assistant's"
    if body.get("add_generation_prompt", True):
        return "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    return None


class _ClientGone(Exception):
    """The client closed the connection while we were answering."""


class FakeUpstream:
    """Scriptable OpenAI-compatible engine on 127.0.0.1."""

    def __init__(self, script: Callable[[dict[str, Any]], Script] | None = None, *, model: str = "fake-model",
                 models: tuple[str, ...] | None = None, accepts_continue: bool = True) -> None:
        self.script: Callable[[dict[str, Any]], Script] = script or echo_script
        self.model = model
        self.models = models  # what GET /v1/models lists (None: ``model`` alone)
        self.accepts_continue = accepts_continue  # False: 400 for continue_final_message, as some engines
        # GET /metrics in vLLM's form when set (running: the requests streaming now; waiting: as set).
        self.publish_metrics = False
        self.waiting = 0
        self.kv_cache = 0.0
        self.peak_active = 0  # most chat requests streaming at once
        self.model_listings = 0  # GET /v1/models answered (health probes)
        self.refuse_models = False  # answer GET /v1/models with 503 (a failing health probe)
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.tcp_connections = 0  # TCP connections accepted so far
        # Those of them that carried a chat completion: keep-alive reuse shows here, not blurred by
        # the gateway's model-listing and health checks, which have a pool of their own.
        self.connections = 0
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def wait_idle(self) -> None:
        """Return once no chat-completion response is streaming."""
        while self.active:
            await self._idle.wait()
        await trio.lowlevel.checkpoint()

    async def serve(
        self, *, host: str = "127.0.0.1", port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``nursery.start(fake.serve)`` returns the bound port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
            task_status.started(self.port)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        self.tcp_connections += 1
        chat = False
        try:
            while True:
                request, body = await self._read_request(stream, conn)
                if request is None:
                    return
                if not chat and request.method == b"POST" and request.target.startswith(CHAT_PATH):
                    chat = True
                    self.connections += 1
                await self._respond(stream, conn, request, body)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (_ClientGone, h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    async def _read_request(self, stream: trio.SocketStream, conn: h11.Connection) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.IDLE:
                    raise _ClientGone
                if not data:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _ClientGone
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, *events: h11.Event) -> None:
        data = b"".join(conn.send(e) or b"" for e in events)
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ClientGone from None

    async def _send_json(self, stream: trio.SocketStream, conn: h11.Connection, status: int, obj: Any,
                         extra_headers: tuple[tuple[str, str], ...] = ()) -> None:
        payload = json.dumps(obj).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(payload))), *extra_headers]
        await self._send(
            stream, conn, h11.Response(status_code=status, headers=headers), h11.Data(data=payload), h11.EndOfMessage()
        )

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes
    ) -> None:
        path = request.target.decode().partition("?")[0]
        method = request.method.decode()
        if method == "GET" and path == "/v1/models":
            self.model_listings += 1
            if self.refuse_models:
                await self._send_json(stream, conn, 503, _error_body(503, "engine is unhealthy", None))
                return
            listed = self.models or (self.model,)
            models = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in listed]}
            await self._send_json(stream, conn, 200, models)
        elif method == "GET" and path == "/metrics" and self.publish_metrics:
            text = "".join(f'vllm:{name}{{model_name="{self.model}"}} {value}\n' for name, value in (
                ("num_requests_running", self.active), ("num_requests_waiting", self.waiting),
                ("kv_cache_usage_perc", self.kv_cache)))
            await self._send(stream, conn, h11.Response(status_code=200, headers=[
                ("content-type", "text/plain; version=0.0.4"), ("content-length", str(len(text)))]),
                h11.Data(data=text.encode()), h11.EndOfMessage())
        elif method == "GET" and path == "/health":
            await self._send(stream, conn, h11.Response(status_code=200, headers=[("content-length", "0")]),
                             h11.EndOfMessage())
        elif method == "POST" and path == "/v1/chat/completions":
            await self._chat(stream, conn, request, body)
        else:
            await self._send_json(stream, conn, 404, _error_body(404, f"no route {method} {path}", None))

    async def _chat(self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, raw: bytes) -> None:
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError as exc:
            await self._send_json(stream, conn, 400, _error_body(400, f"invalid JSON body: {exc}", None))
            return
        problem = continuation_problem(body)
        if problem is None and body.get("continue_final_message") and not self.accepts_continue:
            problem = "unknown field: continue_final_message"
        if problem is not None:
            await self._send_json(stream, conn, 400, _error_body(400, problem, "continue_final_message"))
            return
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        record = RecordedRequest(body, headers, trio.current_time())
        self.requests.append(record)
        script = self.script(body)
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        self._idle = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, stream, conn, record, nursery.cancel_scope)
                await self._answer(stream, conn, body, script, record)
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()
            record.closed.set()
        if record.disconnected_at is not None:
            raise _ClientGone
        if not record.completed:
            raise _ClientGone  # dropped or cut short on purpose: close the connection

    async def _watch_disconnect(self, stream: trio.SocketStream, conn: h11.Connection, record: RecordedRequest,
                                scope: trio.CancelScope) -> None:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            record.disconnected_at = trio.current_time()
            scope.cancel()
        else:
            # The next request on this keep-alive connection, sent as soon as the client read the
            # end of this response (before this task was cancelled): h11 keeps it for the next cycle.
            conn.receive_data(data)

    async def _answer(self, stream: trio.SocketStream, conn: h11.Connection, body: dict[str, Any], script: Script,
                      record: RecordedRequest) -> None:
        try:
            await self._stream_answer(stream, conn, body, script, record)
        except _ClientGone:
            if record.disconnected_at is None:
                record.disconnected_at = trio.current_time()

    async def _stream_answer(self, stream: trio.SocketStream, conn: h11.Connection, body: dict[str, Any],
                             script: Script, record: RecordedRequest) -> None:
        if script.headers_delay:
            await trio.sleep(script.headers_delay)
        if script.status != 200:
            await self._send_json(stream, conn, script.status,
                                  _error_body(script.status, script.error_message, script.error_param),
                                  script.response_headers)
            record.completed = True
            return
        if not body.get("stream"):
            await self._send_json(stream, conn, 200, _completion(self.model, script, body))
            record.completed = True
            return
        chunk_id = f"chatcmpl-{next(self._ids)}"
        created = int(time.time())
        prefix = (
            f'data: {{"id":"{chunk_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(self.model)},"choices":'
        ).encode()
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache"), *script.response_headers]
        if script.raw_body is not None:
            await self._send(stream, conn, h11.Response(status_code=200, headers=headers))
            for part in script.raw_body:
                await self._send(stream, conn, h11.Data(data=part))
            await self._send(stream, conn, h11.EndOfMessage())
            record.completed = True
            return
        first = prefix + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
        await self._send(stream, conn, h11.Response(status_code=200, headers=headers),
                         h11.Data(data=b"".join(script.raw_lines) + first))
        if script.first_delay:
            await trio.sleep(script.first_delay)
        pending: list[bytes] = []
        tokens = script.tokens
        count = len(tokens)
        top = _requested_top_logprobs(body)
        for index in range(count + len(script.deltas)):
            if index == script.stall_after:
                await self._flush(stream, conn, pending)
                await trio.sleep_forever()
            if index == script.drop_after:
                await self._flush(stream, conn, pending)
                await stream.aclose()  # abrupt: no terminator, no [DONE]
                return
            if index == script.stream_error_after:
                pending.append(b"data: " + json.dumps(_error_body(500, script.error_message, None)).encode()
                               + b"\n\ndata: [DONE]\n\n")
                await self._flush(stream, conn, pending)
                await self._send(stream, conn, h11.EndOfMessage())
                record.completed = True
                return
            if index and script.delay:
                await self._flush(stream, conn, pending)
                if script.step:
                    await trio.sleep_until((math.floor(trio.current_time() / script.delay) + 1) * script.delay)
                else:
                    await trio.sleep(script.delay)
            if script.keepalive_comments:
                pending.append(b": keep-alive\n\n")
            if index < count and top is None:
                pending.append(prefix + b'[{"index":0,"delta":{"content":' + json.dumps(tokens[index]).encode()
                               + b'},"finish_reason":null}]}\n\n')
            else:
                item = Delta(content=tokens[index]) if index < count else script.deltas[index - count]
                pending.append(prefix + _delta_choices(item, script.reasoning_field, top) + b"}\n\n")
            record.chunks_sent += 1
            if script.delay or len(pending) >= script.batch:
                await self._flush(stream, conn, pending)
        pending.append(prefix + b'[{"index":0,"delta":{},"finish_reason":' + json.dumps(script.finish_reason).encode()
                       + b"}]}\n\n")
        options = body.get("stream_options")
        if script.usage and isinstance(options, dict) and options.get("include_usage"):
            messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
            prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
            completion = len(script.tokens) + len(script.deltas)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            pending.append(prefix + b"[],\"usage\":" + json.dumps(usage).encode() + b"}\n\n")
        if script.send_done:
            pending.append(b"data: [DONE]\n\n")
        await self._flush(stream, conn, pending)
        await self._send(stream, conn, h11.EndOfMessage())
        record.completed = True

    async def _flush(self, stream: trio.SocketStream, conn: h11.Connection, pending: list[bytes]) -> None:
        if pending:
            data = b"".join(pending)
            pending.clear()
            await self._send(stream, conn, h11.Data(data=data))


def _error_body(status: int, message: str, param: str | None) -> dict[str, Any]:
    kind = "BadRequestError" if 400 <= status < 500 else "InternalServerError"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _requested_top_logprobs(body: dict[str, Any]) -> int | None:
    """None when the request does not ask ``logprobs: true``, else how many ``top_logprobs``."""
    if body.get("logprobs") is not True:
        return None
    top = body.get("top_logprobs")
    return top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0


def _logprob_entry(token: str, logprob: float, top: tuple[tuple[str, float], ...],
                   token_bytes: tuple[int, ...] | None = None) -> dict[str, Any]:
    raw = list(token_bytes) if token_bytes is not None else list(token.encode("utf-8", "surrogatepass"))
    return {"token": token, "logprob": logprob, "bytes": raw,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "surrogatepass"))}
                             for t, lp in top]}  # fmt: skip


def _delta_choices(item: Delta | ToolDelta, reasoning_field: str, top: int | None) -> bytes:
    """The ``[choice]`` of one chunk (vLLM's key order), without the chunk's closing brace."""
    delta = Delta(tool_calls=(item,)) if isinstance(item, ToolDelta) else item
    out: dict[str, Any] = {}
    if delta.content is not None:
        out["content"] = delta.content
    if delta.reasoning is not None:
        out[reasoning_field] = delta.reasoning
    if delta.tool_calls:
        calls: list[dict[str, Any]] = []
        for call in delta.tool_calls:
            entry: dict[str, Any] = {}
            if call.call_id is not None:
                entry["id"] = call.call_id
                entry["type"] = "function"
            entry["index"] = call.index
            function: dict[str, str] = {}
            if call.name is not None:
                function["name"] = call.name
            if call.arguments is not None:
                function["arguments"] = call.arguments
            entry["function"] = function
            calls.append(entry)
        out["tool_calls"] = calls
    choice: dict[str, Any] = {"index": 0, "delta": out}
    if delta.logprobs is not None:
        choice["logprobs"] = {"content": [_logprob_entry(e.token, e.logprob, e.top_logprobs, e.token_bytes)
                                          for e in delta.logprobs]}
    elif top is not None and delta.content is not None:
        # The sampled token first, then made-up runners-up: alt1 at -2.0, alt2 at -3.0, ...
        ranked = ((delta.content, -0.1), *((f"alt{i}", -1.0 - i) for i in range(1, top)))
        choice["logprobs"] = {"content": [_logprob_entry(delta.content, -0.1, ranked[:top])]}
    choice["finish_reason"] = None
    return json.dumps([choice], separators=(",", ":")).encode()


def _completion(model: str, script: Script, body: dict[str, Any]) -> dict[str, Any]:
    content = "".join(script.tokens)
    reasoning = ""
    calls: dict[int, dict[str, Any]] = {}
    for item in script.deltas:
        delta = Delta(tool_calls=(item,)) if isinstance(item, ToolDelta) else item
        content += delta.content or ""
        reasoning += delta.reasoning or ""
        for part in delta.tool_calls:
            fresh = {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            call = calls.setdefault(part.index, fresh)
            call["id"] = part.call_id or call["id"]
            call["function"]["name"] = part.name or call["function"]["name"]
            call["function"]["arguments"] += part.arguments or ""
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
    if reasoning:
        message[script.reasoning_field] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    completion = len(script.tokens) + len(script.deltas)
    return {
        "id": "chatcmpl-0", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": script.finish_reason}],
        "usage": {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion},
    }  # fmt: skip


def main() -> None:
    """``python -m trioai.fake_upstream``: serve a fixed script for benchmarks."""
    parser = argparse.ArgumentParser(description="A fast fake OpenAI-compatible engine on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=256, help="tokens when the request gives no max_tokens")
    parser.add_argument("--token-text", default="hi ")
    parser.add_argument("--numbered", action="store_true", help="w0 , w1 , ... instead of --token-text")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--batch", type=int, default=16, help="chunks per write when --delay is 0")
    parser.add_argument("--step", action="store_true",
                        help="tokens leave every --delay on one clock for all requests, as an engine's steps do")
    args = parser.parse_args()

    def script(body: dict[str, Any]) -> Script:
        count = body.get("max_tokens") or args.tokens
        start = len(continued_text(body).split())
        tokens = tuple(f"w{i} " for i in range(start, start + count)) if args.numbered else (args.token_text,) * count
        return Script(tokens=tokens, delay=args.delay, step=args.step, batch=args.batch, finish_reason="length")

    async def run() -> None:
        fake = FakeUpstream(script)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: fake.serve(port=args.port, task_status=task_status))
            print(f"listening on {fake.base_url}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
