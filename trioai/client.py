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

One reader task per connection routes events to their stream by id. A stream never makes the
reader wait: text that arrives before it is read is joined in order (as the server does for slow
clients), so one slow consumer does not hold up the others. ``error`` events raise
:class:`GenerationError` from the iteration; a ``cancel`` ends it quietly with
``stream.cancelled`` set.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

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
    """One generation: iterate for text; after the end, read ``usage``, ``finish_reason`` and timings."""

    def __init__(self, conn: Connection, request_id: str) -> None:
        self.id = request_id
        self._conn = conn
        self._text: list[str] = []
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
        if kind == "token":
            self._text.append(str(event.get("content", "")))
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
            self.cancelled = kind == "cancelled"
        self._changed.set()
        self._changed = trio.Event()

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
        while True:
            if self._text:
                text = "".join(self._text)
                self._text.clear()
                return text
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
        self, messages: Sequence[dict[str, Any]], *, max_tokens: int | None = None, **sampling: Any
    ) -> AsyncIterator[Stream]:
        """Start a generation; leaving the block early cancels it on the server."""
        stream = Stream(self, f"c{next(self._ids)}")
        self._streams[stream.id] = stream
        event: dict[str, Any] = {"type": "message", "id": stream.id, "messages": list(messages), **sampling}
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
