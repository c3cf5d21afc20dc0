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

``connect(url, resume=True)`` makes generations survive a lost connection (a reset, a proxy or
server-side cut): every ``message`` says ``"resumable": true``; when the connection drops while
streams are open, the client reconnects (first at once, then after 0.1 s, doubling up to 2 s, for
at most ``resume_timeout`` seconds, 30 by default) and sends ``resume`` for each open stream with the
token its ``start`` gave and the last ``seq`` it got, so the iteration yields the whole text exactly
once (an event whose ``seq`` it already has is dropped). ``stream.resumes`` counts the reconnections
a stream went through. A stream finished before the drop is not resumed; one whose ``start`` had not
arrived cannot be (it fails with :class:`ConnectionLost`), nor can any once reconnecting gives up.
A server that no longer has the generation (restarted, or ``--resume-window`` passed) ends it with
:class:`GenerationError` ``resume_not_found``; another connection that resumed it ends it here with
:class:`ResumedElsewhere`. A drop with no stream open is repaired by the next ``generate()``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from .auth import SUBPROTOCOL

TERMINAL = frozenset({"done", "cancelled", "error"})
RESERVED_FIELDS = frozenset({"type", "id", "messages"})
RECONNECT_FIRST_DELAY: Final = 0.1  # seconds before the second attempt (the first is at once), doubling...
RECONNECT_MAX_DELAY: Final = 2.0  # ...up to this
REFUSALS_FOR_GOOD: Final = frozenset({400, 401, 403, 404})  # handshake answers not worth retrying


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
    """The connection closed before the generation ended (with ``resume=True``: and could not be resumed)."""


class ResumedElsewhere(GenerationError):
    """Another connection resumed this generation (``resumed_elsewhere``): the rest of it goes there."""


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
        self.resume_token: str | None = None  # from ``start``, when the generation is resumable
        self.resumes = 0  # reconnections this stream went through (``resume`` sent for it)
        self.failovers: list[tuple[str, str]] = []  # (from, to) engines, when another engine continued the answer
        self._last_seq = 0  # the highest ``seq`` received
        self._sent = False  # its ``message`` went out
        self._cancel_wanted = False

    def _deliver(self, event: dict[str, Any]) -> None:
        if self._end is not None:
            return  # nothing of a generation follows its terminal event
        seq = event.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= self._last_seq:
                return  # already had it (replayed by a resume)
            self._last_seq = seq
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
            token = event.get("resume_token")
            if isinstance(token, str) and token:
                self.resume_token = token
        elif kind == "queued":
            self.queue_position = event.get("position")
        elif kind == "failover":
            self.failovers.append((str(event.get("from")), str(event.get("to"))))
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

    def _lost(self, reason: str = "the connection closed before the generation ended") -> None:
        if self._end is None:
            self._end = {"type": "lost", "message": reason}
            self._changed.set()
            self._changed = trio.Event()

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
            code = str(event.get("code"))
            error = ResumedElsewhere if code == "resumed_elsewhere" else GenerationError
            raise error(code, str(event.get("message")), param=event.get("param"),
                        retry_after=event.get("retry_after"))
        raise ConnectionLost(str(event.get("message")))

    async def text(self) -> str:
        """Read the whole answer."""
        return "".join([piece async for piece in self])

    async def cancel(self) -> None:
        """Ask the server to stop this generation; the iteration then ends with ``cancelled`` set.

        With ``resume=True``, a cancel while the connection is being restored goes out after the resume.
        """
        if self._end is None:
            self._cancel_wanted = True
            await self._conn._send_cancel(self)


class _Events:
    """The iterator of :meth:`Stream.events` (a class, not an async generator: nothing to finalize)."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Event:
        return await self._stream._next_event()


class _Dialer:
    """Opens the connection's WebSockets: each is held open by a task in the connection's nursery until
    released (then closed with the normal handshake, when the server is still there)."""

    def __init__(self, nursery: trio.Nursery, url: str, headers: list[tuple[bytes, bytes]] | None,
                 connect_timeout: float) -> None:
        self._nursery = nursery
        self.url = url
        self._headers = headers
        self.connect_timeout = connect_timeout
        self._leave: trio.Event | None = None  # releases the WebSocket opened last

    async def open(self, seconds: float) -> WebSocketConnection:
        """A new WebSocket, its handshake done within ``seconds``; raises :class:`HandshakeError`
        (:class:`ConnectionRejected`, ...) if none."""
        ws: WebSocketConnection = await self._nursery.start(self._hold, seconds)
        return ws

    async def _hold(self, seconds: float, *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
        started = False
        try:
            async with open_websocket_url(self.url, subprotocols=[SUBPROTOCOL], extra_headers=self._headers,
                                          connect_timeout=seconds) as ws:
                leave = self._leave = trio.Event()
                started = True
                task_status.started(ws)
                await leave.wait()
        except (HandshakeError, ConnectionClosed, trio.BrokenResourceError, OSError):
            if not started:
                raise  # to open()'s caller
            # Closing a WebSocket that failed (a reset, a close that timed out): nothing left to do.

    def release(self) -> None:
        """Close the WebSocket opened last (it may be closed already)."""
        if self._leave is not None:
            self._leave.set()


class Connection:
    """An open connection to ``/ws/chat``; use :func:`connect`."""

    def __init__(self, ws: WebSocketConnection, *, dialer: _Dialer | None = None, resume: bool = False,
                 resume_timeout: float = 30.0) -> None:
        self.ws = ws  # the current WebSocket (a new one after each reconnection)
        self._streams: dict[str, Stream] = {}
        self._ids = itertools.count(1)
        self.errors: list[dict[str, Any]] = []  # connection-level errors (no id), newest last
        self.reconnects = 0  # WebSockets opened again after a drop (``resume=True``)
        self._dialer = dialer
        self._resume = resume and dialer is not None
        self._resume_timeout = resume_timeout
        # With resume: set while ``ws`` is thought usable; a new Event (unset) from a drop to the
        # reconnection. Senders wait on it; the reader task alone reconnects.
        self._up = trio.Event()
        self._up.set()
        self._wanted = trio.Event()  # a sender waits for a connection (a drop with no stream open)
        self._closed = False  # no more reconnections: given up, or the connection's block is left
        self._drops = 0  # drops the reader task has dealt with
        self._give_up_at: float | None = None  # reconnecting since a drop with no event received since
        self._delay = 0.0  # before the next attempt
        self._lost_reason = "the connection closed before the generation ended"
        self._reader_scope = trio.CancelScope()

    async def _current(self) -> WebSocketConnection:
        """The WebSocket to send on: with resume, once a reconnection (if any) is done."""
        if self._resume:
            while not self._up.is_set():
                self._wanted.set()
                await self._up.wait()
            if self._closed:
                raise ConnectionLost(self._lost_reason)
        return self.ws

    def _down(self, ws: WebSocketConnection) -> None:
        """``ws`` is closed: senders wait for the next one."""
        if ws is self.ws and self._up.is_set() and not self._closed:
            self._up = trio.Event()

    async def _send(self, event: dict[str, Any]) -> int:
        """Send ``event``; with resume, on the next WebSocket if the current one is down (a frame that
        failed to go out was not received whole, so it is sent again). Returns the drop count before it.

        No lock of ours is held while sending: trio-websocket orders the frames of one WebSocket.
        """
        frame = json.dumps(event)
        while True:
            ws = await self._current()
            drops = self._drops
            try:
                await ws.send_message(frame)
                return drops
            except ConnectionClosed:
                if not self._resume:
                    raise
                self._down(ws)

    async def _send_cancel(self, stream: Stream) -> None:
        event = {"type": "cancel", "id": stream.id}
        if not self._resume:
            await self._send(event)
            return
        if not self._up.is_set() or self._closed:
            return  # the reconnection sends it after the stream's resume (or there is nothing to cancel)
        ws = self.ws
        try:
            await ws.send_message(json.dumps(event))
        except ConnectionClosed:
            self._down(ws)  # as above

    @asynccontextmanager
    async def generate(
        self, messages: Sequence[dict[str, Any]], *, max_tokens: int | None = None, **fields: Any
    ) -> AsyncIterator[Stream]:
        """Start a generation; leaving the block early cancels it on the server.

        ``fields`` go into the ``message`` as they are: sampling (``temperature``, ``stop``, ``seed``,
        …) and chat fields (``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``,
        ``logprobs``, ``top_logprobs``, ``reasoning_effort``, …); the server checks them. On a
        connection opened with ``resume=True`` the message also says ``"resumable": true``.
        """
        reserved = RESERVED_FIELDS.intersection(fields)
        if reserved:
            raise TypeError(f"generate() sets {', '.join(sorted(reserved))} itself")
        stream = Stream(self, f"c{next(self._ids)}")
        self._streams[stream.id] = stream
        event: dict[str, Any] = {"type": "message", "id": stream.id, "messages": list(messages), **fields}
        if max_tokens is not None:
            event["max_tokens"] = max_tokens
        if self._resume:
            event.setdefault("resumable", True)
        try:
            try:
                drops = await self._send(event)
            except (ConnectionClosed, ConnectionLost):
                stream._lost()
                raise
            stream._sent = True
            if self._drops != drops:
                # The WebSocket it went out on dropped, and the reader task has dealt with that
                # already: with no start, it cannot be resumed.
                stream._lost("the connection closed before the generation started: it cannot be resumed")
            yield stream
        finally:
            if not stream.finished:
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    try:
                        await stream.cancel()
                        while not stream.finished:
                            await stream._changed.wait()
                    except (ConnectionClosed, ConnectionLost):
                        pass
            del self._streams[stream.id]

    async def ping(self) -> None:
        """An application-level round trip (``ping`` → ``pong``)."""
        await self._send({"type": "ping"})

    async def _run(self) -> None:
        """The reader task: routes events to their streams; with resume, reconnects after a drop."""
        try:
            with self._reader_scope:
                while True:
                    ws = self.ws
                    await self._read(ws)
                    if not self._resume:
                        return
                    assert self._dialer is not None
                    self._down(ws)
                    self._dialer.release()
                    self._drops += 1
                    for stream in list(self._streams.values()):
                        if stream._sent and stream.resume_token is None:
                            stream._lost("the connection closed before the generation started: it cannot be resumed")
                    if not any(not stream.finished for stream in self._streams.values()):
                        # Nothing to resume: reconnect when a new generation needs it.
                        await self._wanted.wait()
                        self._give_up_at = None
                    if not await self._reconnect():
                        return
        finally:
            self._closed = True
            self._up.set()  # wakes senders waiting for a reconnection: they raise ConnectionLost
            for stream in self._streams.values():
                stream._lost(self._lost_reason)

    async def _read(self, ws: WebSocketConnection) -> None:
        """Route the events of ``ws`` until it closes."""
        try:
            while True:
                event = json.loads(await ws.get_message())
                self._give_up_at = None  # the server answers: a later drop gets the whole time again
                if not isinstance(event, dict):
                    continue
                request_id = event.get("id")
                stream = self._streams.get(request_id) if isinstance(request_id, str) else None
                if stream is not None:
                    stream._deliver(event)
                elif event.get("type") == "error":
                    self.errors.append(event)
        except ConnectionClosed:
            return

    async def _reconnect(self) -> bool:
        """Open a new WebSocket and resume the open streams on it; False once that is given up."""
        assert self._dialer is not None
        if self._give_up_at is None:
            self._give_up_at = trio.current_time() + self._resume_timeout
            self._delay = 0.0
        while True:
            if self._delay:
                await trio.sleep(max(0.0, min(self._delay, self._give_up_at - trio.current_time())))
            self._delay = min(max(self._delay * 2, RECONNECT_FIRST_DELAY), RECONNECT_MAX_DELAY)
            remaining = self._give_up_at - trio.current_time()
            if remaining <= 0:
                self._lost_reason += f"; gave up after {self._resume_timeout:g} s"
                return False
            try:
                ws = await self._dialer.open(min(self._dialer.connect_timeout, remaining))
            except ConnectionRejected as exc:
                self._lost_reason = f"the connection was lost, and the server refused a new one: HTTP {exc.status_code}"
                if exc.status_code in REFUSALS_FOR_GOOD:
                    return False
                continue
            except HandshakeError as exc:
                self._lost_reason = f"the connection was lost, and reconnecting failed: {_why(exc)}"
                continue
            self.ws = ws
            self.reconnects += 1
            await self._resume_streams(ws)
            self._wanted = trio.Event()
            self._up.set()
            return True

    async def _resume_streams(self, ws: WebSocketConnection) -> None:
        """``resume`` every open stream on ``ws`` (then its ``cancel``, if one was asked meanwhile)."""
        for stream in list(self._streams.values()):
            if stream.finished or not stream._sent or stream.resume_token is None:
                continue
            stream.resumes += 1
            try:
                await ws.send_message(json.dumps({"type": "resume", "id": stream.id,
                                                  "resume_token": stream.resume_token, "after": stream._last_seq}))
                if stream._cancel_wanted:
                    await ws.send_message(json.dumps({"type": "cancel", "id": stream.id}))
            except ConnectionClosed:
                return  # dropped again: the reader task sees it at once

    def _shut(self) -> None:
        """The connection's block is left: stop reading and reconnecting, close the WebSocket."""
        self._reader_scope.cancel()
        self._closed = True
        self._up.set()
        if self._dialer is not None:
            self._dialer.release()


def _why(exc: HandshakeError) -> str:
    """What went wrong in a handshake, in words."""
    if isinstance(exc, ConnectionTimeout):
        return "the handshake timed out"
    return str(exc.__cause__ or exc) or type(exc).__name__


@asynccontextmanager
async def connect(url: str, *, api_key: str | None = None, connect_timeout: float = 10.0, resume: bool = False,
                  resume_timeout: float = 30.0) -> AsyncIterator[Connection]:
    """Open a connection (``api_key`` is sent as ``Authorization: Bearer``).

    With ``resume=True``, generations are resumable and survive a lost connection: the client
    reconnects (for up to ``resume_timeout`` seconds) and resumes them (see the module's doc).

    Raises :class:`ConnectFailed` if the server cannot be reached or refuses; exceptions from the
    body (such as :class:`GenerationError`) come out as they are, not wrapped in a group.
    """
    headers = [(b"Authorization", f"Bearer {api_key}".encode())] if api_key else None
    try:
        async with trio.open_nursery() as nursery:
            dialer = _Dialer(nursery, url, headers, connect_timeout)
            try:
                ws = await dialer.open(connect_timeout)
            except ConnectionRejected as exc:
                raise ConnectFailed(f"the server refused the connection: HTTP {exc.status_code}",
                                    exc.status_code) from None
            except HandshakeError as exc:
                raise ConnectFailed(f"cannot connect to {url}: {_why(exc)}") from None
            conn = Connection(ws, dialer=dialer, resume=resume, resume_timeout=resume_timeout)
            nursery.start_soon(conn._run)
            try:
                yield conn
            finally:
                conn._shut()
    except BaseExceptionGroup as group:
        # The reader and WebSocket tasks never fail, so a group holds the body's one exception: raise it as is.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
