"""Server-sent events from an OpenAI-compatible engine, sans I/O.

Two pure layers, as in httpx-sse: :class:`SSEDecoder` turns the bytes of a ``text/event-stream``
into the ``data`` of each event (WHATWG rules: ``\\n``, ``\\r\\n`` or ``\\r`` line ends, comment
lines starting with ``:`` skipped, several ``data:`` lines joined with ``\\n``, an event dispatched
at a blank line), and :func:`parse_chunk` turns one event's data into a :class:`Chunk` of an OpenAI
``chat.completion.chunk`` (content delta, finish reason, usage), :data:`DONE` for ``[DONE]``, or
raises :class:`~trioai.errors.UpstreamError` for an in-stream error object or a malformed chunk.

Unlike httpx-sse, the decoder bounds its memory: an engine that sends a line longer than
``max_line_bytes``, or ``data:`` lines adding up to more than ``max_event_bytes`` without the blank
line that ends an event, gets an error instead of growing our memory without limit.

Every string taken from the engine is made encodable (:func:`encodable`): JSON can carry a lone
UTF-16 surrogate (``"\\ud83d"``), which UTF-8, and so a WebSocket text frame, cannot; it becomes
U+FFFD, as invalid UTF-8 bytes do.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from .errors import ErrorCode, UpstreamError

DEFAULT_MAX_LINE_BYTES: Final = 1 << 20
DEFAULT_MAX_EVENT_BYTES: Final = 1 << 20
# A token count beyond this (JavaScript's last exact integer) is no engine's: ignored, as it could
# make the decode rate overflow or infinite, which JSON cannot carry.
MAX_TOKEN_COUNT: Final = 2**53
# A logprobs entry is {token, logprob, bytes: [...], top_logprobs: [{token, logprob, bytes: [...]}]}.
MAX_LOGPROB_DEPTH: Final = 5
# What json.loads leaves of a surrogate escape that is not half of a pair (pairs become one character).
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so that it can be encoded as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder: feed bytes, get each event's data.

    An unfinished event's size is counted per :meth:`feed` (this is the per-token path), as all the
    bytes of each feed it spans: an over-estimate by at most what one feed also carried before it.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self._buffer = b""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Decode more bytes; return the data of every event they complete, in order."""
        buf = self._buffer + chunk if self._buffer else chunk
        held = b""
        if b"\r" in buf:
            # A trailing \r may be the first half of \r\n: hold it until the next chunk.
            if buf.endswith(b"\r"):
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buf.rfind(b"\n")
        if end < 0:
            self._buffer = buf + held
            self._check_length()
            return []
        self._buffer = buf[end + 1 :] + held
        self._check_length()
        # Only whole lines are decoded, so a multi-byte character is never split.
        text = buf[:end].decode("utf-8", "replace")
        events: list[str] = []
        data = self._data
        for line in text.split("\n"):
            if not line:
                if data:
                    events.append("\n".join(data))
                    data.clear()
            elif line[0] == ":":
                continue
            elif len(line) > self.max_line_bytes:
                # Complete in one read, so the buffer check never saw it whole.
                self._reset()
                raise _line_too_long(self.max_line_bytes)
            else:
                name, _, value = line.partition(":")
                if name == "data":
                    data.append(value[1:] if value[:1] == " " else value)
                # "event", "id" and "retry" carry nothing an OpenAI stream uses.
        if data:  # an event goes on into the next feed
            self._size = end + 1 + (0 if events else self._size)
            if self._size > self.max_event_bytes:
                self._reset()
                raise UpstreamError(ErrorCode.UPSTREAM_ERROR,
                                    f"engine sent a stream event larger than {self.max_event_bytes} bytes")
        elif self._size:
            self._size = 0
        return events

    def _reset(self) -> None:
        self._data.clear()
        self._size = 0

    def _check_length(self) -> None:
        if len(self._buffer) > self.max_line_bytes:
            self._buffer = b""
            raise _line_too_long(self.max_line_bytes)


def _line_too_long(limit: int) -> UpstreamError:
    return UpstreamError(ErrorCode.UPSTREAM_ERROR, f"engine sent a stream line longer than {limit} bytes")


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One entry of a delta's ``tool_calls``: a fragment of the call at ``index``."""

    index: int
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one ``chat.completion.chunk`` carries that trioai relays."""

    content: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[Any, ...] | None = None  # choices[0].logprobs.content, made plain JSON

    @property
    def has_usage(self) -> bool:
        """True when the chunk reported token usage."""
        return self.completion_tokens is not None


DONE: Final = Chunk(finish_reason="[DONE]")
"""The ``data: [DONE]`` sentinel that ends every complete OpenAI stream."""


def parse_chunk(data: str) -> Chunk:
    """Interpret the data of one SSE event of an OpenAI chat-completion stream."""
    if data == "[DONE]":
        return DONE
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine sent a stream chunk that is not JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine sent a stream chunk that is not an object")
    if "error" in obj or obj.get("object") == "error":
        raise stream_error(obj)
    # Only a \uD800-\uDFFF escape can put a surrogate in a str (bytes are decoded with "replace"),
    # so the common chunk pays one substring search, not a scan of every string.
    check = "\\u" in data and ("\\ud" in data or "\\uD" in data)
    content = reasoning = ""
    finish_reason = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs = None
    choices = obj.get("choices")
    if choices:
        choice = choices[0] if isinstance(choices, list) else None
        if not isinstance(choice, dict):
            raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine sent a malformed 'choices' entry")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str):
                content = encodable(text) if check else text
            if text is None or len(delta) > 1:  # more than a content delta: reasoning, tool calls, role
                thought = delta.get("reasoning")
                if not isinstance(thought, str):
                    thought = delta.get("reasoning_content")  # older vLLM, llama.cpp
                if isinstance(thought, str):
                    reasoning = encodable(thought) if check else thought
                calls = delta.get("tool_calls")
                if calls:
                    tool_calls = _tool_call_deltas(calls)
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            finish_reason = encodable(reason) if check else reason
        entries = choice.get("logprobs")
        if entries:
            logprobs = _logprob_entries(entries)
    prompt_tokens = completion_tokens = None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        completion = usage.get("completion_tokens")
        if _is_count(completion):
            completion_tokens = completion
            prompt = usage.get("prompt_tokens")
            prompt_tokens = prompt if _is_count(prompt) else None
    return Chunk(content, finish_reason, prompt_tokens, completion_tokens, reasoning, tool_calls, logprobs)


def _tool_call_deltas(calls: Any) -> tuple[ToolCallDelta, ...]:
    if not isinstance(calls, list):
        raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine sent a malformed 'tool_calls' delta")
    out = []
    for position, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if function is None:
            function = {}
        index = call.get("index", position) if isinstance(call, dict) else None
        call_id = call.get("id") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if (not isinstance(call, dict) or not isinstance(function, dict) or not _is_count(index)
                or not isinstance(call_id, str | None) or not isinstance(name, str | None)
                or not isinstance(arguments, str | None)):
            raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine sent a malformed 'tool_calls' delta")
        out.append(ToolCallDelta(
            index, None if call_id is None else encodable(call_id), None if name is None else encodable(name),
            encodable(arguments or ""),
        ))
    return tuple(out)


def _logprob_entries(logprobs: Any) -> tuple[Any, ...] | None:
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(entries, list):
        return None
    return tuple(plain_json(entry, MAX_LOGPROB_DEPTH) for entry in entries)


def plain_json(value: Any, depth: int) -> Any:
    """``value`` as JSON a WebSocket frame can carry: non-finite numbers become None, strings
    encodable; deeper than ``depth`` levels, None."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int):
        return value
    if depth <= 0:
        return None
    if isinstance(value, list):
        return [plain_json(item, depth - 1) for item in value]
    if isinstance(value, dict):
        return {encodable(str(key)): plain_json(item, depth - 1) for key, item in value.items()}
    return None


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT


def stream_error(obj: dict[str, Any]) -> UpstreamError:
    """The error an in-stream ``{"error": {...}}`` object (or vLLM's flat ``ErrorResponse``) means."""
    detail = obj.get("error", obj)
    if not isinstance(detail, dict):
        detail = {"message": str(detail)}
    message = detail.get("message")
    text = message if isinstance(message, str) and message else "engine reported an error mid-stream"
    code = detail.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    if status is not None and 400 <= status < 500 and status != 429:
        return UpstreamError(ErrorCode.INVALID_REQUEST, _clip(text), status=status)
    return UpstreamError(ErrorCode.UPSTREAM_ERROR, _clip(text), status=status)


def _clip(text: str, limit: int = 1000) -> str:
    text = encodable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
