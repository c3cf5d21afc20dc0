"""The whole chat-completions stream through the gateway: reasoning, tool calls, logprobs.

The fake engine scripts what vLLM 0.32 (``delta.reasoning``) and llama.cpp / older vLLM
(``delta.reasoning_content``) stream; the client reads trioai's events and must get every kind in
the engine's order, each kind's text exactly, the assembled calls in ``done``, and the same
guarantees as plain text (cancel, a slow reader, exactly one terminal event).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Literal

import pytest
import trio

from trioai.fake_upstream import Delta, FakeUpstream, Script, ToolDelta
from trioai.sse import SSEDecoder, parse_chunk

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, connect, recv, send
from .test_slow_clients import _read_events, stalled_client

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]

# Reasoning, then an answer's first words, then two calls streamed in parallel (interleaved).
MIXED: tuple[Delta | ToolDelta, ...] = (
    Delta(reasoning="The user wants"),
    Delta(reasoning=" weather and time."),
    Delta(content="Let me check."),
    ToolDelta(index=0, call_id="call_a", name="get_weather"),
    ToolDelta(index=1, call_id="call_b", name="get_time"),
    ToolDelta(index=0, arguments='{"city": '),
    ToolDelta(index=1, arguments='{}'),
    ToolDelta(index=0, arguments='"Paris"}'),
)
EXPECTED_CALLS = [
    {"call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"call_id": "call_b", "name": "get_time", "arguments": "{}"},
]


def mixed_script(field: Literal["reasoning", "reasoning_content"] = "reasoning", delay: float = 0.0) -> Any:
    def script(body: dict[str, Any]) -> Script:
        return Script(deltas=MIXED, reasoning_field=field, finish_reason="tool_calls", delay=delay)
    return script


def runs(events: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    """The kinds of delta events in order, consecutive ones of a kind (and tool-call index) merged."""
    kinds = [(e["type"], e.get("index")) for e in events if e["type"] in ("token", "reasoning", "tool_call")]
    return [key for key, _ in itertools.groupby(kinds)]


def assembled(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls assembled from ``tool_call`` fragments by index, as a client would."""
    calls: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["type"] == "tool_call":
            call = calls.setdefault(e["index"], {"call_id": None, "name": None, "arguments": ""})
            call["call_id"] = e.get("call_id", call["call_id"])
            call["name"] = e.get("name", call["name"])
            call["arguments"] += e["arguments"]
    return [calls[i] for i in sorted(calls)]


def text_of(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["content"] for e in events if e["type"] == kind)


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_reasoning_answer_and_parallel_tool_calls_arrive_in_order(
    start_gateway: StartGateway, upstream: FakeUpstream, field: Literal["reasoning", "reasoning_content"]
) -> None:
    upstream.script = mixed_script(field, delay=0.01)  # paced: one event per delta
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("weather in Paris, and the time?", max_tokens=50, id="t", tools=TOOLS,
                            tool_choice="auto", parallel_tool_calls=True))
        events = (await collect_until_terminal(ws, {"t"}))["t"]
    body = upstream.requests[0].body
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    assert [e["type"] for e in events[:1]] == ["start"]
    assert runs(events) == [("reasoning", None), ("token", None), ("tool_call", 0), ("tool_call", 1),
                            ("tool_call", 0), ("tool_call", 1), ("tool_call", 0)]
    assert text_of(events, "reasoning") == "The user wants weather and time."
    assert text_of(events, "token") == "Let me check."
    first_fragments = [e for e in events if e["type"] == "tool_call" and "name" in e]
    assert [(e["index"], e["call_id"], e["name"]) for e in first_fragments] == [
        (0, "call_a", "get_weather"), (1, "call_b", "get_time")]
    assert assembled(events) == EXPECTED_CALLS
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "tool_calls"
    assert done["tool_calls"] == EXPECTED_CALLS
    assert done["usage"]["completion_tokens"] == len(MIXED)


async def test_a_plain_answer_has_no_new_fields(gateway: Any) -> None:
    """Old clients see exactly the old events: no tool_calls in done, no logprobs on tokens."""
    async with connect(gateway) as ws:
        await send(ws, chat("plain old text", max_tokens=3, id=1))
        events = (await collect_until_terminal(ws, {1}))[1]
    assert {e["type"] for e in events} == {"start", "token", "done"}
    assert all(set(e) == {"type", "id", "content"} for e in events if e["type"] == "token")
    assert "tool_calls" not in events[-1]


async def test_logprobs_ride_on_their_tokens(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("one two three four", max_tokens=6, id="lp", logprobs=True, top_logprobs=2))
        events = (await collect_until_terminal(ws, {"lp"}))["lp"]
    assert upstream.requests[0].body["logprobs"] is True and upstream.requests[0].body["top_logprobs"] == 2
    tokens = [e for e in events if e["type"] == "token"]
    entries = [entry for e in tokens for entry in e["logprobs"]]
    assert len(entries) == 6  # one per engine delta, however the deltas were joined into events
    assert "".join(entry["token"] for entry in entries) == text_of(events, "token")
    assert all(len(entry["top_logprobs"]) == 2 for entry in entries)


async def test_a_non_finite_logprob_becomes_null(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    from trioai.fake_upstream import TokenLogprob

    def script(body: dict[str, Any]) -> Script:
        return Script(deltas=(Delta(content="a", logprobs=(TokenLogprob("a", float("-inf")),)),
                              Delta(content="b", logprobs=(TokenLogprob("b", float("nan")),))))

    upstream.script = script
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("x", id="n", logprobs=True))
        await send(ws, chat("y", max_tokens=2, id="ok"))  # a healthy neighbour on the same socket
        events = await collect_until_terminal(ws, {"n", "ok"})
    entries = [entry for e in events["n"] if e["type"] == "token" for entry in e["logprobs"]]
    assert [entry["logprob"] for entry in entries] == [None, None]
    assert events["n"][-1]["type"] == "done" and events["ok"][-1]["type"] == "done"


async def test_cancel_in_the_middle_of_a_tool_call(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    def script(body: dict[str, Any]) -> Script:
        fragments = tuple(ToolDelta(index=0, arguments=f'"{i}",') for i in range(200))
        return Script(deltas=(ToolDelta(index=0, call_id="c", name="get_weather"), *fragments), delay=0.01,
                      finish_reason="tool_calls")

    upstream.script = script
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("x", max_tokens=500, id="c", tools=TOOLS))
        while (event := await recv(ws))["type"] != "tool_call" or "name" in event:
            pass  # until the first arguments fragment
        await send(ws, {"type": "cancel", "id": "c"})
        events = (await collect_until_terminal(ws, {"c"}))["c"]
    assert events[-1]["type"] == "cancelled"
    with trio.fail_after(5):
        await upstream.requests[0].closed.wait()
    assert not upstream.requests[0].completed


async def test_a_slow_reader_gets_joined_events_with_kinds_apart_and_in_order(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    """Nothing is read until the engine is done: consecutive deltas of a kind join, kinds never mix."""
    plan = [("reasoning", 40), ("content", 40), ("tool", 40), ("reasoning", 10), ("content", 10)]
    deltas: list[Delta | ToolDelta] = []
    for kind, count in plan:
        for i in range(count):
            if kind == "reasoning":
                deltas.append(Delta(reasoning=f"r{i} " + "x" * 200))
            elif kind == "content":
                deltas.append(Delta(content=f"c{i} " + "y" * 200))
            else:
                deltas.append(ToolDelta(index=0, arguments=f"a{i}" + "z" * 200,
                                        **({"call_id": "k", "name": "get_time"} if i == 0 else {})))

    def script(body: dict[str, Any]) -> Script:
        return Script(deltas=tuple(deltas), finish_reason="stop", batch=16)

    upstream.script = script
    server = await start_gateway(send_timeout=30)
    stalled = await stalled_client(server.host, server.port)  # asks (no id: r1), then reads nothing
    async with stalled:
        with trio.fail_after(10):
            while not (upstream.requests and upstream.requests[0].completed):
                await trio.sleep(0.02)
        events = (await _read_events(stalled, {"r1"}))["r1"]
    assert runs(events) == [("reasoning", None), ("token", None), ("tool_call", 0), ("reasoning", None),
                            ("token", None)]
    deltas_events = [e for e in events if e["type"] in ("token", "reasoning", "tool_call")]
    assert len(deltas_events) < sum(count for _, count in plan)  # some were joined
    expect_reasoning = "".join(d.reasoning or "" for d in deltas if isinstance(d, Delta))
    expect_content = "".join(d.content or "" for d in deltas if isinstance(d, Delta))
    assert text_of(events, "reasoning") == expect_reasoning
    assert text_of(events, "token") == expect_content
    assert assembled(events)[0]["arguments"] == "".join(d.arguments or "" for d in deltas if isinstance(d, ToolDelta))
    assert events[-1]["type"] == "done"


def sse_body(field: str) -> bytes:
    """A stream as vLLM writes it, mixing every kind, with multi-byte characters to split inside."""
    chunks = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {field: "Denke nach … 🤔"}}]},
        {"choices": [{"delta": {"content": "Grüße, "}, "logprobs": {"content": [
            {"token": "Grüße", "logprob": -0.25, "bytes": [71], "top_logprobs": []}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"id": "call_x", "type": "function", "index": 0,
                                                "function": {"name": "get_weather"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Zürich"}'}}]},
                      "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}},
    ]
    text = "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return text.encode()


def decode(parts: list[bytes]) -> list[Any]:
    decoder = SSEDecoder()
    return [parse_chunk(data) for part in parts for data in decoder.feed(part)]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_the_stream_decodes_the_same_split_at_every_byte_boundary(field: str) -> None:
    body = sse_body(field)
    whole = decode([body])
    assert [c.reasoning for c in whole if c.reasoning] == ["Denke nach … 🤔"]
    assert [c.tool_calls[0].name for c in whole if c.tool_calls][:1] == ["get_weather"]
    for cut in range(1, len(body)):
        assert decode([body[:cut], body[cut:]]) == whole, cut
    assert decode([body[i:i + 1] for i in range(len(body))]) == whole
