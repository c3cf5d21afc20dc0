"""Server-sent events from an OpenAI-compatible engine, sans I/O.

Two pure layers, as in httpx-sse: :class:`SSEDecoder` turns the bytes of a ``text/event-stream``
into the ``data`` of each event (WHATWG rules: ``\\n``, ``\\r\\n`` or ``\\r`` line ends, comment
lines starting with ``:`` skipped, several ``data:`` lines joined with ``\\n``, an event dispatched
at a blank line), and :func:`parse_chunk` turns one event's data into a :class:`Chunk` of an OpenAI
``chat.completion.chunk`` (content delta, finish reason, usage), :data:`DONE` for ``[DONE]``, or
raises :class:`~trioai.errors.UpstreamError` for an in-stream error object or a malformed chunk.

Unlike httpx-sse, the decoder bounds its buffer: an engine that sends a line longer than
``max_line_bytes`` gets an error instead of growing our memory without limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from .errors import ErrorCode, UpstreamError

DEFAULT_MAX_LINE_BYTES: Final = 1 << 20


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder: feed bytes, get each event's data."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = b""
        self._data: list[str] = []

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
                self._data.clear()
                raise _line_too_long(self.max_line_bytes)
            else:
                name, _, value = line.partition(":")
                if name == "data":
                    data.append(value[1:] if value[:1] == " " else value)
                # "event", "id" and "retry" carry nothing an OpenAI stream uses.
        return events

    def _check_length(self) -> None:
        if len(self._buffer) > self.max_line_bytes:
            self._buffer = b""
            raise _line_too_long(self.max_line_bytes)


def _line_too_long(limit: int) -> UpstreamError:
    return UpstreamError(ErrorCode.UPSTREAM_ERROR, f"engine sent a stream line longer than {limit} bytes")


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one ``chat.completion.chunk`` carries that trioai relays."""

    content: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

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
    content = ""
    finish_reason = None
    choices = obj.get("choices")
    if choices:
        choice = choices[0] if isinstance(choices, list) else None
        if not isinstance(choice, dict):
            raise UpstreamError(ErrorCode.UPSTREAM_ERROR, "engine sent a malformed 'choices' entry")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str):
                content = text
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            finish_reason = reason
    prompt_tokens = completion_tokens = None
    usage = obj.get("usage")
    if isinstance(usage, dict):
        completion = usage.get("completion_tokens")
        if isinstance(completion, int) and not isinstance(completion, bool):
            completion_tokens = completion
            prompt = usage.get("prompt_tokens")
            prompt_tokens = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None
    return Chunk(content, finish_reason, prompt_tokens, completion_tokens)


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
    return text if len(text) <= limit else text[: limit - 1] + "…"
