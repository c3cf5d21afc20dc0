"""Issue 19's histograms, end to end: a request's start (taken → engine request written) and the relay
latency of sampled engine reads (read → frame handed to the kernel), through a real server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from trioai.outbox import Outbox, take_relay_sample
from trioai.server import RunningServer
from trioai.sse import SSEDecoder
from trioai.upstream import RELAY_SAMPLE_EVERY, ChatStream

from .helpers import chat, collect_until_terminal, connect, echo_tokens, send, text_of


def sample_count(server: RunningServer, name: str) -> float:
    return server.gateway.metrics.registry.get_sample_value(f"{name}_count") or 0.0


def sample_sum(server: RunningServer, name: str) -> float:
    return server.gateway.metrics.registry.get_sample_value(f"{name}_sum") or 0.0


async def test_each_request_start_and_sampled_relays_are_observed(gateway: RunningServer) -> None:
    reads = 2 * RELAY_SAMPLE_EVERY + 1  # the fake engine writes one delta per read here: see below
    async with connect(gateway) as ws:
        for rid in ("a", "b"):
            await send(ws, {**chat("one two three", reads), "id": rid})
            events = (await collect_until_terminal(ws, {rid}))[rid]
            assert events[-1]["type"] == "done"
            assert text_of(events) == "".join(echo_tokens("one two three", reads))
    assert sample_count(gateway, "trioai_request_start_seconds") == 2
    assert 0 < sample_sum(gateway, "trioai_request_start_seconds") < 10
    # The first read of each stream is sampled, then one in RELAY_SAMPLE_EVERY; reads that carry no
    # delta (the engine's usage chunk, [DONE]) take none. At least the first read of each stream counts.
    relays = sample_count(gateway, "trioai_relay_seconds")
    assert 2 <= relays <= 2 * (reads // RELAY_SAMPLE_EVERY + 2)
    assert 0 < sample_sum(gateway, "trioai_relay_seconds") < 10


class Reads(httpx.AsyncByteStream):
    """A response body arriving as these reads, one by one."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


async def test_the_first_engine_read_then_one_in_n_is_timed_to_its_write() -> None:
    tokens = 3 * RELAY_SAMPLE_EVERY
    parts = [b'data: {"choices":[{"index":0,"delta":{"content":"w%d "}}]}\n\n' % i for i in range(tokens)]
    parts.append(b"data: [DONE]\n\n")
    seen: list[float] = []
    stream = ChatStream(httpx.Response(200, stream=Reads(parts)), SSEDecoder(), 10.0, 10.0, seen.append)
    outbox = Outbox()
    sender = outbox.stream("a")
    text = []
    async for chunk in stream:
        assert chunk.content
        sender.put_token(chunk.content)
        frame = outbox.pop()  # what the writer does, then it writes and tells the sample
        assert isinstance(frame, str)
        text.append(json.loads(frame)["content"])
        sample = take_relay_sample()
        if sample is not None:
            sample.written()
    assert "".join(text) == "".join(f"w{i} " for i in range(tokens))
    assert len(seen) == 3  # reads 1, N + 1 and 2N + 1
    assert all(0 <= seconds < 10 for seconds in seen)


async def test_a_sampled_read_without_a_delta_passes_the_sample_to_the_next_read() -> None:
    """The engine's first read is often a role-only chunk: the first read with a delta is timed instead."""
    parts = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n']
    parts += [b'data: {"choices":[{"index":0,"delta":{"content":"w%d "}}]}\n\n' % i for i in range(4)]
    parts.append(b"data: [DONE]\n\n")
    seen: list[float] = []
    stream = ChatStream(httpx.Response(200, stream=Reads(parts)), SSEDecoder(), 10.0, 10.0, seen.append)
    outbox = Outbox()
    sender = outbox.stream("a")
    async for chunk in stream:
        if chunk.content:
            sender.put_token(chunk.content)
            outbox.pop()
            sample = take_relay_sample()
            if sample is not None:
                sample.written()
    assert len(seen) == 1  # the second read's (its first delta), and none of the next three
