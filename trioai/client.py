"""A Trio client for trioai's WebSocket API: many generations at once on one connection.

    import trio
    import trioai.client

    async def main():
        async with trioai.client.connect("ws://127.0.0.1:8080/ws/chat", api_key=None) as conn:
            async with conn.generate([{"role": "user", "content": "Hello"}], max_tokens=64) as stream:
                async for text in stream:
                    print(text, end="", flush=True)
            print()
            print(stream.usage, stream.finish_reason, stream.ttft_ms)

    trio.run(main)

Chat-completion fields go through as keywords: ``conn.generate(messages, max_tokens=256,
tools=[...], tool_choice="auto", response_format={...}, logprobs=True)``. Iterating a stream gives
only answer text; the rest accumulates on it as it arrives: ``stream.reasoning`` (a reasoning
model's thinking), ``stream.tool_calls`` (``[{"call_id", "name", "arguments"}]``, assembled from
the ``tool_call`` fragments, then replaced by ``done``'s whole calls) and ``stream.logprobs``.
An app that wants everything in order reads typed events instead::

    async for event in stream.events():
        match event:
            case trioai.client.ReasoningDelta(text=text): ...
            case trioai.client.TextDelta(text=text): ...
            case trioai.client.ToolCallDelta(index=i, name=name, arguments=arguments): ...

Use one or the other on a stream: both consume the same events. Servers that never send
``reasoning`` or ``tool_call`` events just leave those empty.

One reader task per connection routes events to their stream by id. A stream never makes the
reader wait: events that arrive before they are read are joined in order, consecutive ones of the
same kind (as the server does for slow clients), so one slow consumer does not hold up the others.
``error`` events raise :class:`GenerationError` from the iteration; a ``cancel`` ends it quietly
with ``stream.cancelled`` set.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from .auth import SUBPROTOCOL

TERMINAL = frozenset({"done", "cancelled", "error"})
RESERVED_FIELDS = frozenset({"type", "id", "messages"})


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer (``token``); ``logprobs`` holds its entries when the request asked for them."""

    text: str
    logprobs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of a reasoning model's thinking (``reasoning``), apart from the answer."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of the function call at ``index`` (``tool_call``).

    The first fragment of a call carries ``call_id`` and ``name``; ``arguments`` is a piece of the
    JSON text of its arguments, to concatenate in order per ``index`` (``stream.tool_calls`` does).
    """

    index: int
    arguments: str
    call_id: str | None = None
    name: str | None = None


Event: TypeAlias = TextDelta | ReasoningDelta | ToolCallDelta


def _join(last: Event, new: Event) -> Event | None:
    """``last`` and ``new`` as one event, if they are consecutive pieces of the same thing."""
    if isinstance(last, TextDelta) and isinstance(new, TextDelta):
        return TextDelta(last.text + new.text, last.logprobs + new.logprobs)
    if isinstance(last, ReasoningDelta) and isinstance(new, ReasoningDelta):
        return ReasoningDelta(last.text + new.text)
    if (isinstance(last, ToolCallDelta) and isinstance(new, ToolCallDelta) and last.index == new.index
            and new.call_id is None and new.name is None):
        return ToolCallDelta(last.index, last.arguments + new.arguments, last.call_id, last.name)
    return None


def _parse(event: dict[str, Any]) -> Event | None:
    """The typed event of a ``token``, ``reasoning`` or ``tool_call`` frame (None for other kinds)."""
    kind = event.get("type")
    if kind == "token":
        logprobs = event.get("logprobs")
        entries = tuple(e for e in logprobs if isinstance(e, dict)) if isinstance(logprobs, list) else ()
        return TextDelta(str(event.get("content", "")), entries)
    if kind == "reasoning":
        return ReasoningDelta(str(event.get("content", "")))
    if kind == "tool_call":
        index = event.get("index")
        call_id, name = event.get("call_id"), event.get("name")
        return ToolCallDelta(
            index if isinstance(index, int) and not isinstance(index, bool) else 0,
            str(event.get("arguments") or ""),
            str(call_id) if call_id is not None else None,
            str(name) if name is not None else None,
        )
    return None


class ClientError(Exception):
    """Base class of the client's exceptions."""


class GenerationError(ClientError):
    """The server ended a generation with an ``error`` event."""

    def __init__(self, code: str, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after


class ConnectFailed(ClientError):
    """The server could not be reached, or refused the handshake (``status``: 401, 403, 503...)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConnectionLost(ClientError):
    """The connection closed before the generation ended."""


class Stream:
    """One generation: iterate for text (or :meth:`events`); after the end, read ``usage``,
    ``finish_reason``, ``tool_calls`` and timings."""

    def __init__(self, conn: Connection, request_id: str) -> None:
        self.id = request_id
        self._conn = conn
        self._pending: list[Event] = []  # arrived, not yet read; consecutive pieces of a kind joined
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # index -> {"call_id", "name", "arguments": [pieces]}
        self._final_calls: list[dict[str, Any]] | None = None
        self.logprobs: list[dict[str, Any]] = []  # every token's logprobs entries so far (when asked)
        self._changed = trio.Event()
        self._end: dict[str, Any] | None = None
        self.model: str | None = None
        self.queue_position: int | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.ttft_ms: float | None = None
        self.tokens_per_s: float | None = None
        self.cancelled = False

    def _deliver(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        delta = _parse(event)
        if delta is not None:
            self._record(delta)
            joined = _join(self._pending[-1], delta) if self._pending else None
            if joined is None:
                self._pending.append(delta)
            else:
                self._pending[-1] = joined
        elif kind == "start":
            self.model = event.get("model")
            self.queue_position = None
        elif kind == "queued":
            self.queue_position = event.get("position")
        elif kind in TERMINAL:
            self._end = event
            if kind == "done":
                self.finish_reason = event.get("finish_reason")
                self.usage = event.get("usage")
                self.ttft_ms = event.get("ttft_ms")
                self.tokens_per_s = event.get("tokens_per_s")
                calls = event.get("tool_calls")
                if isinstance(calls, list):
                    self._final_calls = [
                        {"call_id": c.get("call_id"), "name": c.get("name"), "arguments": c.get("arguments", "")}
                        for c in calls if isinstance(c, dict)
                    ]
            self.cancelled = kind == "cancelled"
        self._changed.set()
        self._changed = trio.Event()

    def _record(self, delta: Event) -> None:
        """Add a delta to the stream's running state (read or not)."""
        if isinstance(delta, TextDelta):
            self.logprobs.extend(delta.logprobs)
        elif isinstance(delta, ReasoningDelta):
            self._reasoning.append(delta.text)
        else:
            call = self._calls.setdefault(delta.index, {"call_id": None, "name": None, "arguments": []})
            if delta.call_id is not None:
                call["call_id"] = delta.call_id
            if delta.name is not None:
                call["name"] = delta.name
            call["arguments"].append(delta.arguments)

    @property
    def reasoning(self) -> str:
        """The reasoning text received so far (empty from a model or server without it)."""
        if len(self._reasoning) > 1:
            self._reasoning[:] = ["".join(self._reasoning)]
        return self._reasoning[0] if self._reasoning else ""

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The function calls so far, ``[{"call_id", "name", "arguments"}]`` in index order.

        Assembled from the ``tool_call`` fragments while the answer streams (``arguments`` may be
        incomplete JSON then); once ``done`` arrives, its whole calls. Empty when the model called none.
        """
        if self._final_calls is not None:
            return [dict(call) for call in self._final_calls]
        return [{"call_id": call["call_id"], "name": call["name"], "arguments": "".join(call["arguments"])}
                for _, call in sorted(self._calls.items())]

    def _lost(self) -> None:
        if self._end is None:
            self._end = {"type": "lost"}
            self._changed.set()

    @property
    def finished(self) -> bool:
        """Whether the terminal event has arrived."""
        return self._end is not None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> str:
        """The answer text that arrived since the last call (reasoning and tool calls skipped)."""
        while True:
            texts = [delta.text for delta in self._pending if isinstance(delta, TextDelta)]
            self._pending.clear()
            if texts:
                return "".join(texts)
            if self._end is not None:
                self._finish(self._end)
                raise StopAsyncIteration
            await self._changed.wait()

    def events(self) -> AsyncIterator[Event]:
        """The generation's :class:`TextDelta`, :class:`ReasoningDelta` and :class:`ToolCallDelta`
        events, in the order the server sent them (consecutive ones of the same kind, and the same
        call, joined if they arrived before being read). Ends, or raises, as iterating the stream does.
        """
        return _Events(self)

    async def _next_event(self) -> Event:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._end is not None:
                self._finish(self._end)
                raise StopAsyncIteration
            await self._changed.wait()

    def _finish(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind in ("done", "cancelled"):
            return
        if kind == "error":
            raise GenerationError(str(event.get("code")), str(event.get("message")), param=event.get("param"),
                                  retry_after=event.get("retry_after"))
        else:
            raise ConnectionLost("the connection closed before the generation ended")

    async def text(self) -> str:
        """Read the whole answer."""
        return "".join([piece async for piece in self])

    async def cancel(self) -> None:
        """Ask the server to stop this generation; the iteration then ends with ``cancelled`` set."""
        if self._end is None:
            await self._conn._send({"type": "cancel", "id": self.id})


class _Events:
    """The iterator of :meth:`Stream.events` (a class, not an async generator: nothing to finalize)."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Event:
        return await self._stream._next_event()


class Connection:
    """An open connection to ``/ws/chat``; use :func:`connect`."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._streams: dict[str, Stream] = {}
        self._ids = itertools.count(1)
        self._send_lock = trio.Lock()
        self.errors: list[dict[str, Any]] = []  # connection-level errors (no id), newest last

    async def _send(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_message(json.dumps(event))

    @asynccontextmanager
    async def generate(
        self, messages: Sequence[dict[str, Any]], *, max_tokens: int | None = None, **fields: Any
    ) -> AsyncIterator[Stream]:
        """Start a generation; leaving the block early cancels it on the server.

        ``fields`` go into the ``message`` as they are: sampling (``temperature``, ``stop``, ``seed``,
        …) and chat fields (``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``,
        ``logprobs``, ``top_logprobs``, ``reasoning_effort``, …); the server checks them.
        """
        reserved = RESERVED_FIELDS.intersection(fields)
        if reserved:
            raise TypeError(f"generate() sets {', '.join(sorted(reserved))} itself")
        stream = Stream(self, f"c{next(self._ids)}")
        self._streams[stream.id] = stream
        event: dict[str, Any] = {"type": "message", "id": stream.id, "messages": list(messages), **fields}
        if max_tokens is not None:
            event["max_tokens"] = max_tokens
        try:
            await self._send(event)
            yield stream
        finally:
            if not stream.finished:
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    try:
                        await stream.cancel()
                        while not stream.finished:
                            await stream._changed.wait()
                    except ConnectionClosed:
                        pass
            del self._streams[stream.id]

    async def ping(self) -> None:
        """An application-level round trip (``ping`` → ``pong``)."""
        await self._send({"type": "ping"})

    async def _read(self) -> None:
        try:
            while True:
                event = json.loads(await self.ws.get_message())
                if not isinstance(event, dict):
                    continue
                request_id = event.get("id")
                stream = self._streams.get(request_id) if isinstance(request_id, str) else None
                if stream is not None:
                    stream._deliver(event)
                elif event.get("type") == "error":
                    self.errors.append(event)
        except ConnectionClosed:
            pass
        finally:
            for stream in self._streams.values():
                stream._lost()


@asynccontextmanager
async def connect(url: str, *, api_key: str | None = None, connect_timeout: float = 10.0) -> AsyncIterator[Connection]:
    """Open a connection (``api_key`` is sent as ``Authorization: Bearer``).

    Raises :class:`ConnectFailed` if the server cannot be reached or refuses; exceptions from the
    body (such as :class:`GenerationError`) come out as they are, not wrapped in a group.
    """
    headers = [(b"Authorization", f"Bearer {api_key}".encode())] if api_key else None
    try:
        async with open_websocket_url(url, subprotocols=[SUBPROTOCOL], extra_headers=headers,
                                      connect_timeout=connect_timeout) as ws, trio.open_nursery() as nursery:
            conn = Connection(ws)
            nursery.start_soon(conn._read)
            try:
                yield conn
            finally:
                nursery.cancel_scope.cancel()
    except ConnectionRejected as exc:
        raise ConnectFailed(f"the server refused the connection: HTTP {exc.status_code}", exc.status_code) from None
    except HandshakeError as exc:
        raise ConnectFailed(f"cannot connect to {url}: {exc.__cause__ or exc}") from None
    except BaseExceptionGroup as group:
        # The reader task never fails, so a group holds the body's one exception: raise it as is.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
