"""The fake engine's chat-completions stream surface, read with httpx directly (no trioai in between).

Shapes follow vLLM 0.32's serializer (``DeltaMessage``/``DeltaToolCall`` dumped with
``exclude_unset``) and llama.cpp's server where they differ.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx

from trioai.fake_upstream import Delta, FakeUpstream, Script, TokenLogprob, ToolDelta

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


async def stream(upstream: FakeUpstream, **fields: Any) -> tuple[list[dict[str, Any]], bytes]:
    """POST a streaming chat completion; the chunks parsed (``[DONE]`` left out) and the raw body."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True, **fields}
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(f"{upstream.base_url}/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    chunks = []
    for line in response.content.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(json.loads(line[len(b"data: "):]))
    assert response.content.endswith(b"data: [DONE]\n\n")
    return chunks, response.content


def choices(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each chunk's single choice (the usage chunk, with none, left out)."""
    out = []
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        if chunk["choices"]:
            assert len(chunk["choices"]) == 1
            out.append(chunk["choices"][0])
    return out


async def test_tokens_path_unchanged(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("a ", "b"))
    chunks, raw = await stream(upstream)
    assert [c["delta"] for c in choices(chunks)] == [{"role": "assistant", "content": ""}, {"content": "a "},
                                                     {"content": "b"}, {}]  # fmt: skip
    assert choices(chunks)[-1]["finish_reason"] == "stop"
    assert b'"choices":[{"index":0,"delta":{"content":"a "},"finish_reason":null}]}\n\n' in raw
    assert b"logprobs" not in raw


async def test_reasoning_field_vllm_and_llama_cpp(upstream: FakeUpstream) -> None:
    deltas = (Delta(reasoning="Let me"), Delta(reasoning=" think"), Delta(content="Hi"))
    upstream.script = lambda body: Script(deltas=deltas)
    chunks, _ = await stream(upstream)
    assert [c["delta"] for c in choices(chunks)[1:]] == [{"reasoning": "Let me"}, {"reasoning": " think"},
                                                         {"content": "Hi"}, {}]  # fmt: skip
    assert all(c["finish_reason"] is None for c in choices(chunks)[:-1])

    upstream.script = lambda body: Script(deltas=deltas, reasoning_field="reasoning_content")
    chunks, _ = await stream(upstream)
    assert [c["delta"] for c in choices(chunks)[1:]] == [{"reasoning_content": "Let me"},
                                                         {"reasoning_content": " think"}, {"content": "Hi"}, {}]


async def test_tool_call_fragments_like_vllm(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(
        deltas=(
            ToolDelta(index=0, call_id="chatcmpl-tool-1", name="get_weather"),
            ToolDelta(index=0, arguments='{"city": '),
            ToolDelta(index=0, arguments='"Paris"}'),
        ),
        finish_reason="tool_calls",
    )
    chunks, raw = await stream(upstream, tools=[WEATHER_TOOL])
    body = choices(chunks)[1:]
    assert [c["delta"] for c in body] == [
        {"tool_calls": [{"id": "chatcmpl-tool-1", "type": "function", "index": 0,
                         "function": {"name": "get_weather"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {},
    ]
    assert body[-1]["finish_reason"] == "tool_calls"
    # vLLM's key order in a tool-call entry: id, type, index, function.
    assert b'{"id":"chatcmpl-tool-1","type":"function","index":0,"function":{"name":"get_weather"}}' in raw


async def test_tool_call_first_fragment_with_arguments_like_llama_cpp(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(
        deltas=(ToolDelta(0, arguments="", call_id="call_0", name="f"), ToolDelta(0, arguments='{"a"'),
                ToolDelta(0, arguments=": 1}")),
        finish_reason="tool_calls",
    )  # fmt: skip
    chunks, _ = await stream(upstream)
    calls = [c["delta"]["tool_calls"] for c in choices(chunks)[1:-1]]
    assert calls[0] == [{"id": "call_0", "type": "function", "index": 0, "function": {"name": "f", "arguments": ""}}]
    assert "".join(c[0]["function"]["arguments"] for c in calls) == '{"a": 1}'


async def test_parallel_tool_calls_interleaved(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(
        deltas=(
            Delta(tool_calls=(ToolDelta(0, call_id="call_a", name="f"), ToolDelta(1, call_id="call_b", name="g"))),
            ToolDelta(1, arguments='{"y":'),
            ToolDelta(0, arguments='{"x":'),
            Delta(tool_calls=(ToolDelta(0, arguments="1}"), ToolDelta(1, arguments="2}"))),
        ),
        finish_reason="tool_calls",
    )
    chunks, _ = await stream(upstream, parallel_tool_calls=True)
    deltas = [c["delta"] for c in choices(chunks)[1:-1]]
    assert deltas[0]["tool_calls"] == [
        {"id": "call_a", "type": "function", "index": 0, "function": {"name": "f"}},
        {"id": "call_b", "type": "function", "index": 1, "function": {"name": "g"}},
    ]
    assert [[e["index"] for e in d["tool_calls"]] for d in deltas] == [[0, 1], [1], [0], [0, 1]]
    arguments = {0: "", 1: ""}
    for delta in deltas[1:]:
        for entry in delta["tool_calls"]:
            assert set(entry) == {"index", "function"}
            arguments[entry["index"]] += entry["function"]["arguments"]
    assert arguments == {0: '{"x":1}', 1: '{"y":2}'}
    assert choices(chunks)[-1]["finish_reason"] == "tool_calls"


async def test_mixed_script_in_order_with_usage(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(
        tokens=("Sure",),
        deltas=(Delta(reasoning="hmm"), Delta(content=", "), ToolDelta(0, "{}", "call_0", "f"),
                Delta(content="done", reasoning="ok")),
        finish_reason="tool_calls",
    )  # fmt: skip
    chunks, _ = await stream(upstream, stream_options={"include_usage": True})
    assert [c["delta"] for c in choices(chunks)[1:]] == [
        {"content": "Sure"},
        {"reasoning": "hmm"},
        {"content": ", "},
        {"tool_calls": [{"id": "call_0", "type": "function", "index": 0,
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"content": "done", "reasoning": "ok"},
        {},
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert upstream.requests[-1].chunks_sent == 5


async def test_logprobs_when_asked(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("Hé",), deltas=(Delta(reasoning="r"), Delta(content="!")))
    chunks, _ = await stream(upstream, logprobs=True, top_logprobs=3)
    body = choices(chunks)[1:]
    first = body[0]["logprobs"]["content"]
    assert first == [{"token": "Hé", "logprob": -0.1, "bytes": [72, 195, 169], "top_logprobs": [
        {"token": "Hé", "logprob": -0.1, "bytes": [72, 195, 169]},
        {"token": "alt1", "logprob": -2.0, "bytes": list(b"alt1")},
        {"token": "alt2", "logprob": -3.0, "bytes": list(b"alt2")},
    ]}]  # fmt: skip
    assert "logprobs" not in body[1]  # reasoning: none unless scripted
    assert body[2]["logprobs"]["content"][0]["token"] == "!"
    assert len(body[2]["logprobs"]["content"][0]["top_logprobs"]) == 3
    assert "logprobs" not in body[3]  # the finish chunk

    chunks, _ = await stream(upstream, logprobs=True)  # no top_logprobs: an empty list, as vLLM sends
    assert choices(chunks)[1]["logprobs"]["content"][0]["top_logprobs"] == []

    chunks, raw = await stream(upstream)
    assert b"logprobs" not in raw


async def test_scripted_logprobs_sent_as_is(upstream: FakeUpstream) -> None:
    scripted = (TokenLogprob("a", -1.5, (("a", -1.5), ("b", -2.5))), TokenLogprob("\ufffd", -math.inf, (),
                                                                                   (0xE2,)))  # fmt: skip
    upstream.script = lambda body: Script(deltas=(Delta(content="a\ufffd", logprobs=scripted),
                                                  Delta(reasoning="r", logprobs=(TokenLogprob("r"),))))
    chunks, raw = await stream(upstream)
    body = choices(chunks)[1:]
    assert body[0]["logprobs"]["content"] == [
        {"token": "a", "logprob": -1.5, "bytes": [97], "top_logprobs": [
            {"token": "a", "logprob": -1.5, "bytes": [97]}, {"token": "b", "logprob": -2.5, "bytes": [98]}]},
        {"token": "\ufffd", "logprob": -math.inf, "bytes": [0xE2], "top_logprobs": []},
    ]  # fmt: skip
    assert b'"logprob":-Infinity' in raw  # not JSON: what a careless engine would send
    assert body[1]["logprobs"]["content"] == [{"token": "r", "logprob": -0.1, "bytes": [114], "top_logprobs": []}]


async def test_knobs_count_over_tokens_and_deltas(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("a",), deltas=(Delta(reasoning="r"), Delta(content="c")),
                                          stream_error_after=2, error_message="boom")  # fmt: skip
    chunks, _ = await stream(upstream)
    assert [c["choices"][0]["delta"] for c in chunks[1:3]] == [{"content": "a"}, {"reasoning": "r"}]
    assert chunks[-1]["error"]["message"] == "boom"


async def test_request_fields_recorded(upstream: FakeUpstream) -> None:
    fields: dict[str, Any] = {
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 2,
        "reasoning_effort": "low",
    }
    await stream(upstream, **fields)
    recorded = upstream.requests[-1].body
    assert {k: recorded[k] for k in fields} == fields


async def test_non_streaming_answer_assembles_calls(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(
        deltas=(Delta(reasoning="think"), ToolDelta(0, None, "call_0", "f"), ToolDelta(0, '{"a": 1}')),
        finish_reason="tool_calls",
    )
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(f"{upstream.base_url}/chat/completions", json=body)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant", "content": None, "reasoning": "think",
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }  # fmt: skip


async def test_a_stepping_engine_sends_every_requests_tokens_on_one_clock(upstream: FakeUpstream) -> None:
    """``step``: two requests started 30 ms apart get their later tokens on one clock (each at a
    multiple of ``delay``), as an engine stepping its batch does; without it, each 30 ms apart."""
    import trio

    client = httpx.AsyncClient(timeout=5)  # made once: making one takes tens of ms (its TLS context)

    async def token_times(delay_start: float, script: Script) -> list[float]:
        await trio.sleep(delay_start)
        times = []
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream("POST", f"{upstream.base_url}/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if '"content":"a "' in line:
                    times.append(trio.current_time())
        return times

    async with client:
        for step, apart in ((True, 0.0), (False, 0.03)):  # apart: only without step
            script = Script(tokens=("a ",) * 4, delay=0.1, step=step)

            def scripted(body: dict[str, Any], script: Script = script) -> Script:
                return script

            upstream.script = scripted
            results: dict[float, list[float]] = {}

            async def run(start: float, results: dict[float, list[float]] = results, script: Script = script) -> None:
                results[start] = await token_times(start, script)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, 0.0)
                nursery.start_soon(run, 0.03)
            first, second = results[0.0], results[0.03]
            assert len(first) == len(second) == 4
            if step:  # after the first (at once), every token of both leaves at a multiple of the delay
                late = [(t / 0.1 - math.floor(t / 0.1)) * 0.1 for t in first[1:] + second[1:]]
                assert max(late) < 0.015, (first, second)
            else:  # each on its own timer: the second's tokens 30 ms after the first's
                for a, b in zip(first, second, strict=True):
                    assert abs((b - a) - apart) < 0.015, (first, second)
