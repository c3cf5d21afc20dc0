"""Client side of the benchmarks: WebSocket streams through trioai, and a direct SSE reader for comparison.

Everything here measures from the client's point of view with ``trio.current_time()``: when a
request was sent, when each ``token`` frame arrived, when ``cancelled`` came back. The fake engine
(``python -m trioai.fake_upstream --numbered``) answers ``w0 w1 w2 ...``, so every stream's text can
be checked for being complete, exact and in order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trioai.sse import DONE, SSEDecoder, parse_chunk

PROMPT = [{"role": "user", "content": "benchmark"}]


def expected_text(max_tokens: int) -> str:
    """What the numbered fake engine answers to a request for ``max_tokens`` tokens."""
    return "".join(f"w{i} " for i in range(max_tokens))


@dataclass
class StreamResult:
    """One generation as the client saw it."""

    sent_at: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    frames: int = 0
    text: str = ""
    outcome: str = ""
    exact: bool = False

    @property
    def ttft(self) -> float | None:
        """Seconds from sending the request to its first token."""
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    def on_token(self, content: str, now: float) -> None:
        """Record one token frame."""
        if self.last_token_at is not None:
            self.gaps.append(now - self.last_token_at)
        else:
            self.first_token_at = now
        self.last_token_at = now
        self.frames += 1
        self.text += content


@dataclass
class LoadResult:
    """Many streams over a measured interval."""

    streams: list[StreamResult]
    elapsed: float

    @property
    def tokens(self) -> int:
        """Tokens delivered (the numbered engine's tokens are space-terminated words)."""
        return sum(s.text.count(" ") for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        """Delivered tokens per second of wall time."""
        return self.tokens / self.elapsed if self.elapsed else 0.0

    @property
    def all_exact(self) -> bool:
        """Whether every stream ended ``done`` with exactly the expected text."""
        return bool(self.streams) and all(s.exact for s in self.streams)

    def ttfts(self) -> list[float]:
        """Time to first token of every stream that got one."""
        return [t for s in self.streams if (t := s.ttft) is not None]

    def gaps(self) -> list[float]:
        """Every inter-token gap of every stream."""
        return [g for s in self.streams for g in s.gaps]


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile (``pct`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def ws_generate(ws: WebSocketConnection, request_id: str, max_tokens: int) -> StreamResult:
    """Run one generation on an open socket and read it to its terminal event."""
    result = StreamResult(sent_at=trio.current_time())
    await ws.send_message(json.dumps({"type": "message", "id": request_id, "messages": PROMPT,
                                      "max_tokens": max_tokens}))
    while True:
        event: dict[str, Any] = json.loads(await ws.get_message())
        if "id" in event and event["id"] != request_id:  # plain-format servers send no ids
            raise AssertionError(f"event for another request: {event}")
        kind = event["type"]
        if kind == "token":
            result.on_token(event["content"], trio.current_time())
        elif kind in ("done", "cancelled", "error"):
            result.outcome = kind if kind != "error" else f"error:{event.get('code')}"
            result.exact = kind == "done" and result.text == expected_text(max_tokens)
            return result


async def ws_load(url: str, connections: int, max_tokens: int, duration: float,
                  generate: Callable[[WebSocketConnection, str, int], Awaitable[StreamResult]] | None = None,
                  ) -> LoadResult:
    """``connections`` sockets, each running generations back to back for ``duration`` seconds.

    Every connection runs at least one generation, so ``duration=0`` means exactly one each.
    ``generate`` runs one generation (default :func:`ws_generate`, ``/ws/chat``; another wire
    protocol passes its own).
    """
    one = generate or ws_generate
    streams: list[StreamResult] = []
    ready = trio.Event()
    opened = 0

    async def client(index: int) -> None:
        nonlocal opened
        async with open_websocket_url(url) as ws:
            opened += 1
            if opened == connections:
                ready.set()
            await ready.wait()
            count = 0
            while True:
                streams.append(await one(ws, f"c{index}-{count}", max_tokens))
                count += 1
                if trio.current_time() >= deadline:
                    return

    deadline = math.inf
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(client, index)
        await ready.wait()
        start = trio.current_time()
        deadline = start + duration
    return LoadResult(streams, trio.current_time() - start)


async def sse_generate(client: httpx.AsyncClient, base_url: str, max_tokens: int) -> StreamResult:
    """One generation read straight from the engine's SSE stream, no gateway in between."""
    result = StreamResult(sent_at=trio.current_time())
    body = {"model": "fake-model", "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    decoder = SSEDecoder()
    async with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.aiter_raw():
            now = trio.current_time()
            for data in decoder.feed(raw):
                chunk = parse_chunk(data)
                if chunk is DONE:
                    result.outcome = "done"
                    result.exact = result.text == expected_text(max_tokens)
                    return result
                if chunk.content:
                    result.on_token(chunk.content, now)
    result.outcome = "disconnected"
    return result


async def sse_load(base_url: str, connections: int, max_tokens: int, duration: float) -> LoadResult:
    """The same load as :func:`ws_load`, read directly from the engine with httpx."""
    streams: list[StreamResult] = []
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

        async def reader() -> None:
            while True:
                streams.append(await sse_generate(client, base_url, max_tokens))
                if trio.current_time() >= deadline:
                    return

        start = trio.current_time()
        deadline = start + duration
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(reader)
    return LoadResult(streams, trio.current_time() - start)


@dataclass
class CancelSample:
    """One cancel, timed from the client's ``cancel`` frame."""

    to_ack: float
    outcome: str


async def ws_cancel(
    ws: WebSocketConnection, request_id: str, after_tokens: int, max_tokens: int = 8000
) -> tuple[float, CancelSample]:
    """Start a long generation, cancel it after ``after_tokens`` token frames, time the ``cancelled``.

    Returns the moment the cancel was sent (to compare with the engine's view) and the sample.
    """
    await ws.send_message(json.dumps({"type": "message", "id": request_id, "messages": PROMPT,
                                      "max_tokens": max_tokens}))
    seen = 0
    while seen < after_tokens:
        event = json.loads(await ws.get_message())
        if event["type"] == "token":
            seen += 1
        elif event["type"] in ("done", "cancelled", "error"):
            raise AssertionError(f"stream ended before the cancel: {event}")
    sent = trio.current_time()
    await ws.send_message(json.dumps({"type": "cancel", "id": request_id}))
    while True:
        event = json.loads(await ws.get_message())
        if event["type"] in ("done", "cancelled", "error"):
            return sent, CancelSample(trio.current_time() - sent, event["type"])
