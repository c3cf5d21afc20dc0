"""End to end against a real vLLM: the engine trioai is built for.

Run by ``scripts/test`` after it starts vLLM (CPU build, Gemma 3 270M) with ``scripts/vllm-cpu.sh``;
``TRIOAI_VLLM_URL`` names its base URL (``http://127.0.0.1:PORT/v1``). Without it these tests fail
rather than skip: a vLLM stage that silently tests nothing is worse than none.

The gateway runs in this process (a real trioai server on a real port); everything behind it is
vLLM. vLLM's own ``/metrics`` is the witness that a cancel or a disconnect really stopped the
generation in the engine, not only in trioai.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
from openai.types.responses import Response
from trio_websocket import open_websocket_url

from trioai.config import Settings
from trioai.enginespec import EngineSpec
from trioai.server import RunningServer, serve

from .helpers import (
    RESUME_TOKENS,
    chat,
    check_one_generation,
    collect_until_terminal,
    cut_and_resume,
    read_generation,
    recv,
    resumable,
    send,
    text_of,
)
from .proxy import CutProxy
from .redisserver import RedisServer
from .scaleout import TrioaiProcess, owner_of_the_running_generation, start_nginx_in_front, trioai_processes
from .test_nginx import nginx_binary  # noqa: F401 - the fixture
from .test_responses import ENGINE_LIMITS, ENGINE_TIMEOUT, sdk_connection, text_deltas, until_terminal

pytestmark = pytest.mark.vllm

PROMPT = "Write a long story about a lighthouse keeper and the sea."
CONTINUED_TOKENS = 64  # the answer cut and continued on another engine entry
CUT_AT = 12  # tokens relayed before the cut
LONG = 1500  # max_tokens that take vLLM on CPU well over a minute: only an abort ends them early


@pytest.fixture
def vllm_url() -> str:
    url = os.environ.get("TRIOAI_VLLM_URL")
    if not url:
        pytest.fail("TRIOAI_VLLM_URL is not set: start vLLM with `scripts/vllm-cpu.sh start` and export its URL")
    return url.rstrip("/")


@pytest.fixture
async def vllm_gateway(nursery: trio.Nursery, vllm_url: str) -> RunningServer:
    settings = Settings(host="127.0.0.1", port=0, upstream=vllm_url, max_concurrency=8)
    running: RunningServer = await nursery.start(serve, settings)
    return running


async def metrics_lines(vllm_url: str) -> list[str]:
    """vLLM's ``/metrics`` (Prometheus text), line by line."""
    metrics_url = vllm_url.removesuffix("/v1") + "/metrics"
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(metrics_url)
    response.raise_for_status()
    return response.text.splitlines()


async def engine_metrics(vllm_url: str) -> dict[str, float]:
    """vLLM's Prometheus gauges and counters we watch, summed over their labels."""
    totals: dict[str, float] = {}
    for line in await metrics_lines(vllm_url):
        m = re.match(r"(vllm:(?:num_requests_running|num_requests_waiting|generation_tokens_total))(?:\{.*\})? (\S+)$",
                     line)
        if m:
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    assert "vllm:num_requests_running" in totals, "vLLM's /metrics has no vllm:num_requests_running"
    return totals


async def wait_engine_idle(vllm_url: str, timeout: float = 10.0) -> float:
    """Poll vLLM's metrics until nothing runs or waits; returns the seconds it took."""
    start = trio.current_time()
    with trio.fail_after(timeout):
        while True:
            metrics = await engine_metrics(vllm_url)
            if metrics["vllm:num_requests_running"] == 0 and metrics.get("vllm:num_requests_waiting", 0) == 0:
                return trio.current_time() - start
            await trio.sleep(0.02)


async def assert_generation_stopped(vllm_url: str) -> None:
    """The engine's generated-token counter no longer moves."""
    before = (await engine_metrics(vllm_url))["vllm:generation_tokens_total"]
    await trio.sleep(1.0)
    after = (await engine_metrics(vllm_url))["vllm:generation_tokens_total"]
    assert after == before, f"vLLM generated {after - before} more tokens after the stream was closed"


async def wait_running(vllm_url: str) -> None:
    with trio.fail_after(30):
        while (await engine_metrics(vllm_url))["vllm:num_requests_running"] < 1:
            await trio.sleep(0.02)


async def test_plain_format_client_gets_tokens_and_vllm_usage(vllm_gateway: RunningServer) -> None:
    async with open_websocket_url(vllm_gateway.url) as ws:
        # Exactly what a client of the plain format sends: no id, no extras.
        await ws.send_message('{"type":"message","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}')
        events = (await collect_until_terminal(ws)).popitem()[1]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start"
    assert kinds[-1] == "done", events[-1]
    assert kinds.count("token") >= 1
    done = events[-1]
    usage = done["usage"]
    assert usage["source"] == "engine"  # counted by vLLM, not by trioai
    assert usage["prompt_tokens"] > 5  # the chat template alone is several tokens
    assert 1 <= usage["completion_tokens"] <= 16
    assert done["finish_reason"] in ("stop", "length")
    assert done["ttft_ms"] > 0
    assert text_of(events).strip()


async def test_three_multiplexed_streams_all_complete(vllm_gateway: RunningServer) -> None:
    prompts = {"a": "Name three colours.", "b": "Count from one to five.", "c": "Name a fruit."}
    async with open_websocket_url(vllm_gateway.url) as ws:
        for rid, prompt in prompts.items():
            await send(ws, chat(prompt, max_tokens=20, id=rid, temperature=0))
        events = await collect_until_terminal(ws, set(prompts))
    for rid in prompts:
        assert events[rid][0]["type"] == "start"
        assert events[rid][-1]["type"] == "done", events[rid][-1]
        assert events[rid][-1]["usage"]["completion_tokens"] >= 1
        assert text_of(events[rid]).strip()


async def test_sampling_fields_reach_vllm(vllm_gateway: RunningServer) -> None:
    """Greedy decoding twice gives the same text, and max_tokens is honoured exactly."""
    texts = []
    async with open_websocket_url(vllm_gateway.url) as ws:
        for rid in ("g1", "g2"):
            await send(ws, chat(PROMPT, max_tokens=12, id=rid, temperature=0, seed=7))
            events = (await collect_until_terminal(ws, {rid}))[rid]
            assert events[-1]["type"] == "done"
            assert events[-1]["usage"]["completion_tokens"] == 12
            assert events[-1]["finish_reason"] == "length"
            texts.append(text_of(events))
    assert texts[0] == texts[1]


async def test_too_long_prompt_is_invalid_request_with_vllms_message(vllm_gateway: RunningServer) -> None:
    async with open_websocket_url(vllm_gateway.url) as ws:
        await send(ws, chat("lighthouse " * 3000, max_tokens=16, id="big"))
        events = (await collect_until_terminal(ws, {"big"}))["big"]
        error = events[-1]
        assert error["type"] == "error"
        assert error["code"] == "invalid_request"
        assert "context length" in error["message"] or "2048" in error["message"], error["message"]
        # The connection is still usable.
        await send(ws, chat("Hi", max_tokens=4, id="after"))
        assert (await collect_until_terminal(ws, {"after"}))["after"][-1]["type"] == "done"


async def test_cancel_mid_stream_aborts_the_vllm_request(vllm_gateway: RunningServer, vllm_url: str) -> None:
    await wait_engine_idle(vllm_url)
    async with open_websocket_url(vllm_gateway.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=LONG, id="long"))
        tokens = 0
        while tokens < 3:
            event = await recv(ws, timeout=60)
            assert event["type"] in ("start", "token"), event
            tokens += event["type"] == "token"
        await wait_running(vllm_url)
        sent = trio.current_time()
        await send(ws, {"type": "cancel", "id": "long"})
        while (event := await recv(ws))["type"] == "token":
            pass
        acked = trio.current_time() - sent
        assert event == {"type": "cancelled", "id": "long"}
        assert acked < 1.0
        # vLLM itself stopped: nothing running, and no more tokens generated.
        await wait_engine_idle(vllm_url, timeout=5.0)
        await assert_generation_stopped(vllm_url)
        # The socket goes on working.
        await send(ws, chat("Hi", max_tokens=4, id="next"))
        assert (await collect_until_terminal(ws, {"next"}))["next"][-1]["type"] == "done"


async def test_client_disconnect_mid_stream_aborts_the_vllm_request(
    vllm_gateway: RunningServer, vllm_url: str
) -> None:
    await wait_engine_idle(vllm_url)
    async with open_websocket_url(vllm_gateway.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=LONG, id="a"))
        await send(ws, chat(PROMPT, max_tokens=LONG, id="b"))
        seen: set[str] = set()
        while seen != {"a", "b"}:
            event = await recv(ws, timeout=60)
            if event["type"] == "token":
                seen.add(event["id"])
    # The socket is closed: both generations must end in the engine.
    await wait_engine_idle(vllm_url, timeout=5.0)
    await assert_generation_stopped(vllm_url)


# --- The chat-completions surface: structured output, logprobs, tool calls --------------------------
#
# A base model follows no format of its own accord; these prompts ask for the very text the grammar
# allows, so greedy decoding ends well inside max_tokens (~20-30 tokens) instead of wandering.

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]
TOOL_PROMPT = ('Reply with exactly this JSON: [{"name": "get_weather", "parameters": '
               '{"city": "Paris", "unit": "celsius"}}]')
# vLLM ends a call forced by name with "stop" (as OpenAI does), a "required" one with "tool_calls".
TOOL_CHOICES = {
    "named": ({"type": "function", "function": {"name": "get_weather"}}, "stop"),
    "required": ("required", "tool_calls"),
}


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the few JSON Schema keywords these tests use)."""
    types: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = kind is None or isinstance(value, types[kind])
    if not ok:
        return [f"{path}: {value!r} is not of type {kind}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{path}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{path}.{key}")
    return errors


async def served_model(vllm_url: str) -> str:
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(vllm_url + "/models")
    response.raise_for_status()
    model: str = response.json()["data"][0]["id"]
    return model


async def vllm_stream(vllm_url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat completion read straight from vLLM: content, tool calls by index, finish."""
    request = {"model": await served_model(vllm_url), **body, "stream": True,
               "stream_options": {"include_usage": True}}
    content, finish_reason, usage = "", None, None
    calls: dict[int, dict[str, str]] = {}
    async with (
        httpx.AsyncClient(timeout=120.0) as client,
        client.stream("POST", vllm_url + "/chat/completions", json=request) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            pytest.fail(f"vLLM answered {response.status_code}: {response.text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                content += delta.get("content") or ""
                for fragment in delta.get("tool_calls") or []:
                    call = calls.setdefault(fragment["index"], {"call_id": "", "name": "", "arguments": ""})
                    call["call_id"] += fragment.get("id") or ""
                    function = fragment.get("function") or {}
                    call["name"] += function.get("name") or ""
                    call["arguments"] += function.get("arguments") or ""
                finish_reason = choice.get("finish_reason") or finish_reason
    return {"content": content, "calls": calls, "finish_reason": finish_reason, "usage": usage}


def finite_or_null(logprob: Any) -> bool:
    return logprob is None or (isinstance(logprob, float) and math.isfinite(logprob))


async def test_response_format_json_schema_gives_json_of_the_schema(vllm_gateway: RunningServer) -> None:
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    async with open_websocket_url(vllm_gateway.url) as ws:
        await send(ws, chat('Reply with exactly this JSON: {"name": "Ada", "age": 36}', max_tokens=48, id="json",
                            temperature=0, seed=7, response_format=response_format))
        events = (await collect_until_terminal(ws, {"json"}))["json"]
    done = events[-1]
    assert done["type"] == "done", done
    assert done["finish_reason"] == "stop", done  # the grammar closed the object: not cut off
    text = text_of(events)
    value = json.loads(text)
    assert schema_errors(value, PERSON_SCHEMA) == [], text


async def test_logprobs_on_every_token_event_one_entry_per_token(vllm_gateway: RunningServer) -> None:
    async with open_websocket_url(vllm_gateway.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=12, id="lp", temperature=0, seed=7, logprobs=True, top_logprobs=2))
        events = (await collect_until_terminal(ws, {"lp"}))["lp"]
    done = events[-1]
    assert done["type"] == "done", done
    tokens = [e for e in events if e["type"] == "token"]
    assert tokens
    entries = []
    for event in tokens:
        assert isinstance(event.get("logprobs"), list), event
        entries += event["logprobs"]
    assert len(entries) == done["usage"]["completion_tokens"], (len(entries), done["usage"])
    for entry in entries:
        assert isinstance(entry["token"], str), entry
        assert finite_or_null(entry["logprob"]), entry
        assert 1 <= len(entry["top_logprobs"]) <= 2, entry
        for alternative in entry["top_logprobs"]:
            assert finite_or_null(alternative["logprob"]), alternative
    # The entries' bytes spell exactly the streamed text.
    assert b"".join(bytes(entry["bytes"] or b"") for entry in entries).decode() == text_of(events)


@pytest.mark.parametrize("choice", sorted(TOOL_CHOICES))
async def test_tool_calls_through_trioai_match_vllm_itself(
    vllm_gateway: RunningServer, vllm_url: str, choice: str
) -> None:
    tool_choice, expected_finish = TOOL_CHOICES[choice]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": TOOL_PROMPT}], "max_tokens": 48,
                            "temperature": 0, "seed": 7, "tools": TOOLS, "tool_choice": tool_choice}
    # vLLM itself: the reference.
    direct = await vllm_stream(vllm_url, body)
    assert direct["finish_reason"] == expected_finish, direct
    assert [call["name"] for call in direct["calls"].values()] == ["get_weather"], direct
    # The server's tool-call parser (scripts/vllm-cpu.sh) makes vLLM hold the arguments to the schema.
    arguments = json.loads(direct["calls"][0]["arguments"])
    assert schema_errors(arguments, WEATHER_PARAMETERS) == [], direct

    # The same request through trioai.
    async with open_websocket_url(vllm_gateway.url) as ws:
        await send(ws, {"type": "message", "id": "tc", **body})
        events = (await collect_until_terminal(ws, {"tc"}))["tc"]
    done = events[-1]
    assert done["type"] == "done", done
    streamed: dict[int, dict[str, str]] = {}
    for event in events:
        if event["type"] != "tool_call":
            continue
        index = event["index"]
        if index not in streamed:
            assert event.get("call_id") and event.get("name"), f"a call's first fragment lacks id or name: {event}"
            streamed[index] = {"call_id": event["call_id"], "name": event["name"], "arguments": ""}
        else:
            assert "name" not in event and "call_id" not in event, f"a later fragment repeats id or name: {event}"
        streamed[index]["arguments"] += event.get("arguments", "")
    whole = done.get("tool_calls")
    assert isinstance(whole, list), done

    def shape(calls: list[dict[str, str]]) -> list[tuple[str, str]]:
        return [(call["name"], call["arguments"]) for call in calls]

    by_index = [streamed[i] for i in sorted(streamed)]
    assert sorted(streamed) == list(range(len(streamed))), sorted(streamed)
    # The two views trioai gives agree, call ids included ...
    assert [call["call_id"] for call in whole] == [call["call_id"] for call in by_index]
    assert shape(whole) == shape(by_index)
    # ... and match what vLLM streamed (ids are vLLM's random ones: compared by name and arguments).
    assert shape(by_index) == shape([direct["calls"][i] for i in sorted(direct["calls"])])
    assert text_of(events) == direct["content"]
    assert done["finish_reason"] == direct["finish_reason"]


# --- Resume: a generation outlives a connection cut mid-answer ---------------------------------------

async def finished_requests(vllm_url: str) -> dict[str, float]:
    """vLLM's ``vllm:request_success_total`` by ``finished_reason`` (summed over other labels)."""
    counts: dict[str, float] = {}
    for line in await metrics_lines(vllm_url):
        if m := re.match(r"vllm:request_success_total\{(.*)\} (\S+)$", line):
            reason = re.search(r'finished_reason="([^"]*)"', m.group(1))
            assert reason, line
            counts[reason.group(1)] = counts.get(reason.group(1), 0.0) + float(m.group(2))
    assert counts, "vLLM's /metrics has no vllm:request_success_total"
    return counts


async def test_a_cut_mid_answer_resumes_and_vllm_runs_it_once(
    vllm_gateway: RunningServer, vllm_url: str, nursery: trio.Nursery
) -> None:
    proxy = CutProxy(vllm_gateway.host, vllm_gateway.port)
    await nursery.start(proxy.serve)
    # The reference: the same request, uninterrupted.
    async with open_websocket_url(vllm_gateway.url) as ws:
        await send(ws, resumable(PROMPT, "whole"))
        whole = await read_generation(ws, "whole")
    check_one_generation(whole)
    assert whole[-1]["finish_reason"] == "length" and whole[-1]["usage"]["completion_tokens"] == RESUME_TOKENS

    await wait_engine_idle(vllm_url)
    finished_before = await finished_requests(vllm_url)
    generated_before = (await engine_metrics(vllm_url))["vllm:generation_tokens_total"]
    # Cut a few tokens in, resumed on a direct connection: exactly the uninterrupted text.
    events = await cut_and_resume(proxy, vllm_gateway.url, PROMPT, whole)
    done = events[-1]
    assert done["usage"]["source"] == "engine" and done["usage"]["completion_tokens"] == RESUME_TOKENS, done

    # vLLM's witness: one request more, finished by length (not aborted, not run again), 48 tokens.
    await wait_engine_idle(vllm_url)
    with trio.fail_after(10):
        while (finished_after := await finished_requests(vllm_url)) == finished_before:
            await trio.sleep(0.05)
    ran = {reason: count - finished_before.get(reason, 0.0) for reason, count in finished_after.items()}
    assert {reason: count for reason, count in ran.items() if count} == {"length": 1.0}, ran
    generated = (await engine_metrics(vllm_url))["vllm:generation_tokens_total"] - generated_before
    assert generated == RESUME_TOKENS


# --- OpenAI's SDK, in Responses WebSocket mode (/v1/responses) -------------------------------------


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
async def test_openai_sdk_responses_websocket_text_and_json_schema(vllm_gateway: RunningServer) -> None:
    """The official SDK's sync client (in a worker thread), one connection, two responses: plain text whose
    final output_text is exactly its streamed deltas, then a json_schema ``text.format`` answer."""
    person_format = {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}

    def run() -> list[tuple[str, Response]]:
        answers: list[tuple[str, Response]] = []
        with sdk_connection(vllm_gateway.openai_base_url, ENGINE_LIMITS) as session:
            lane = session.lane("main")
            creates: list[Any] = [
                {"type": "response.create", "input": "Say hello.", "max_output_tokens": 16},
                {"type": "response.create", "input": 'Reply with exactly this JSON: {"name": "Ada", "age": 36}',
                 "max_output_tokens": 48, "temperature": 0, "text": {"format": person_format}},
            ]
            for create in creates:
                lane.send(create)
                events = until_terminal(lane, timeout=ENGINE_TIMEOUT)
                answers.append((text_deltas(events), lane.get_final_response(timeout=10)))
        return answers

    with trio.fail_after(240):
        (deltas, text), (json_deltas, structured) = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    assert text.status in ("completed", "incomplete"), text
    assert text.output_text.strip()
    assert text.output_text == deltas
    assert text.usage is not None and text.usage.input_tokens > 5 and 1 <= text.usage.output_tokens <= 16

    assert structured.status == "completed", structured  # the grammar closed the object: not cut off
    assert structured.text is not None and structured.text.format is not None
    assert structured.text.format.type == "json_schema"
    assert structured.output_text == json_deltas
    value = json.loads(structured.output_text)
    assert schema_errors(value, PERSON_SCHEMA) == [], structured.output_text


@pytest.mark.parametrize("choice", ["named", "required"])
async def test_openai_sdk_function_calls_match_vllms_own_chat_stream(
    vllm_gateway: RunningServer, vllm_url: str, choice: str
) -> None:
    """Differential, as for /ws/chat: the same greedy request straight from vLLM's chat stream and
    through /v1/responses with the official SDK gives the same calls (name, arguments) and text."""
    tool_choice, _ = TOOL_CHOICES[choice]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": TOOL_PROMPT}], "max_tokens": 48,
                            "temperature": 0, "tools": TOOLS, "tool_choice": tool_choice}
    direct = await vllm_stream(vllm_url, body)
    functions: list[dict[str, Any]] = [cast(dict[str, Any], t["function"]) for t in TOOLS]
    tools = [{"type": "function", **function} for function in functions]
    named: dict[str, Any] = tool_choice if isinstance(tool_choice, dict) else {}
    responses_choice = tool_choice if isinstance(tool_choice, str) else {
        "type": "function", "name": named["function"]["name"]}
    create: Any = {"type": "response.create", "input": TOOL_PROMPT, "max_output_tokens": 48, "temperature": 0,
              "tools": tools, "tool_choice": responses_choice}

    def run() -> tuple[list[Any], Response]:
        with sdk_connection(vllm_gateway.openai_base_url, ENGINE_LIMITS) as session:
            lane = session.lane("tools")
            lane.send(create)
            events = until_terminal(lane, timeout=ENGINE_TIMEOUT)
            return events, lane.get_final_response(timeout=10)

    with trio.fail_after(240):
        events, final = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    calls = [item for item in final.output if item.type == "function_call"]
    streamed: dict[str, str] = {}
    for event in events:
        if event.type == "response.function_call_arguments.delta":
            streamed[event.item_id] = streamed.get(event.item_id, "") + event.delta
    # The SDK's view: each call's argument deltas add up to its final arguments ...
    assert {call.id: call.arguments for call in calls} == streamed
    # ... and the calls are vLLM's own, in order (ids are vLLM's random ones: compared by name and arguments).
    assert [(call.name, call.arguments) for call in calls] == [
        (direct["calls"][i]["name"], direct["calls"][i]["arguments"]) for i in sorted(direct["calls"])]
    assert final.output_text == direct["content"]


# --- several engines (issue 17) -----------------------------------------------------------------


async def test_an_answer_cut_on_one_engine_entry_continues_on_the_other_to_the_greedy_text(
    vllm_url: str, nursery: trio.Nursery
) -> None:
    """Two entries for the same vLLM: one through a TCP proxy the test cuts mid-answer, one direct.

    With temperature 0 the continued answer must be the uninterrupted greedy answer: the partial
    text goes back as the assistant's message with ``continue_final_message`` and vLLM writes on.
    """
    host, port = httpx.URL(vllm_url).host, httpx.URL(vllm_url).port
    assert port is not None
    proxy = CutProxy(host, port)
    await nursery.start(proxy.serve)
    specs = (EngineSpec(f"http://127.0.0.1:{proxy.port}/v1", "proxied", weight=2.0),  # chosen first
             EngineSpec(vllm_url, "direct"))
    settings = Settings(host="127.0.0.1", port=0, engines=specs, max_concurrency=4, probe_interval=600.0,
                        engine_metrics_interval=0)
    server: RunningServer = await nursery.start(serve, settings)
    request = chat(PROMPT, max_tokens=CONTINUED_TOKENS, temperature=0)

    async with open_websocket_url(server.url) as ws:
        await send(ws, {**request, "id": "whole"})
        whole = await read_generation(ws, "whole")
    check_one_generation(whole)
    reference = text_of(whole)
    assert [e for e in whole if e["type"] == "failover"] == []

    async with open_websocket_url(server.url) as ws:
        await send(ws, {**request, "id": "cut"})
        events: list[dict[str, Any]] = []
        with trio.fail_after(ENGINE_TIMEOUT):
            while True:
                event = json.loads(await ws.get_message())
                events.append(event)
                if event["type"] == "token" and len([e for e in events if e["type"] == "token"]) == CUT_AT:
                    proxy.cut()  # the engine connection of the "proxied" entry breaks mid-answer
                if event["type"] in ("done", "error"):
                    break
    check_one_generation(events)
    (failover,) = [e for e in events if e["type"] == "failover"]
    assert (failover["from"], failover["to"]) == ("proxied", "direct")
    before = text_of([e for e in events if e["seq"] < failover["seq"]])
    continued = text_of(events)
    assert reference.startswith(before) and len(before) > 0
    # The cut falls between two of vLLM's detokenized deltas, so the prefix re-tokenizes to the
    # same tokens and greedy decoding goes on as it would have: the same text.
    assert continued == reference, f"cut after {before!r}:\n{continued!r}\n!=\n{reference!r}"
    done = events[-1]
    assert done["usage"]["completion_tokens"] == whole[-1]["usage"]["completion_tokens"], done


async def test_llama_cpp_and_vllm_as_two_models_behind_one_gateway(vllm_url: str, nursery: trio.Nursery) -> None:
    """The embedded llama.cpp engine and vLLM as two models: each request goes to its model's engine."""
    from trioai.engine import LocalEngine, bundled_model_path, free_port

    llama_model = "gemma3-270m-llama.cpp"  # vLLM serves the same weights as gemma3-270m: two names, two models
    llama = LocalEngine(bundled_model_path(), alias=llama_model, port=free_port(), threads=1, ctx=1024)
    llama_url = await nursery.start(llama.supervise)
    specs = (EngineSpec(llama_url, "llama"), EngineSpec(vllm_url, "vllm"))
    settings = Settings(host="127.0.0.1", port=0, engines=specs, max_concurrency=2, engine_metrics_interval=0)
    server: RunningServer = await nursery.start(serve, settings)
    async with open_websocket_url(server.url) as ws:
        await send(ws, {"type": "models", "id": "m"})
        listing = json.loads(await ws.get_message())
    served = {m["id"]: m["engines"] for m in listing["data"]}
    assert served[llama_model] == ["llama"]
    (vllm_model,) = [model for model, engines in served.items() if engines == ["vllm"]]

    finished_before = sum((await finished_requests(vllm_url)).values())
    for model, engine in ((vllm_model, "vllm"), (llama_model, "llama"), (vllm_model, "vllm")):
        async with open_websocket_url(server.url) as ws:
            await send(ws, chat("The sea is", max_tokens=6, id=1, model=model))
            events = await read_generation(ws, 1)
        assert events[0]["model"] == model and events[-1]["type"] == "done", events[-1]
        assert text_of(events)
        # llama.cpp sends no usage: the gateway counts; vLLM reports its own.
        assert events[-1]["usage"]["source"] == ("engine" if engine == "vllm" else "gateway")
    await wait_engine_idle(vllm_url)
    assert sum((await finished_requests(vllm_url)).values()) - finished_before == 2  # vLLM ran its two only
    requests = server.gateway.metrics.render().decode()
    assert 'trioai_engine_requests_total{engine="llama",outcome="ok"} 1.0' in requests
    assert 'trioai_engine_requests_total{engine="vllm",outcome="ok"} 2.0' in requests


# --- several instances sharing Redis (issue 18) ---------------------------------------------------


async def test_a_greedy_answer_survives_the_kill_of_its_instance(
    vllm_url: str, nursery: trio.Nursery, tmp_path: Path, nginx_binary: str  # noqa: F811
) -> None:
    """Two trioai processes in front of vLLM behind a real Nginx, sharing a real redis-server: the
    instance streaming a greedy answer is killed with SIGKILL; the client reconnects through Nginx,
    and the other instance continues the answer from the logged text on vLLM. The text the client
    ends with equals the uninterrupted greedy answer."""
    from trioai.client import connect as client_connect

    redis = RedisServer(nursery, tmp_path)
    await redis.start()
    options = ("--upstream", vllm_url, "--redis", redis.url, "--lease-seconds", "1", "--max-concurrency", "4")
    messages = [{"role": "user", "content": PROMPT}]
    async with trioai_processes(tmp_path, 2, *options) as instances:
        async with client_connect(f"ws://127.0.0.1:{instances[0].port}/ws/chat") as conn, conn.generate(
                messages, max_tokens=CONTINUED_TOKENS, temperature=0) as whole:
            reference = await whole.text()
        url = await start_nginx_in_front(nursery, nginx_binary, tmp_path, [i.port for i in instances])
        received: list[str] = []
        killed: TrioaiProcess | None = None
        async with client_connect(url, resume=True, resume_timeout=60) as conn, conn.generate(
                messages, max_tokens=CONTINUED_TOKENS, temperature=0) as stream:
            async for text in stream:
                received.append(text)
                if killed is None and len(received) >= CUT_AT:
                    killed = await owner_of_the_running_generation(instances)
                    killed.kill()
    assert killed is not None and stream.resumes >= 1
    assert "".join(received) == reference, f"{''.join(received)!r}\n!=\n{reference!r}"


async def test_routing_reads_vllms_own_queue_from_its_metrics(vllm_url: str) -> None:
    """What the engine pool scrapes for routing: vLLM's running and waiting requests and KV-cache use."""
    from trioai.enginepool import metrics_url, parse_engine_metrics

    async with httpx.AsyncClient(timeout=10.0) as client:
        text = (await client.get(metrics_url(vllm_url))).text
    load = parse_engine_metrics(text)
    assert load is not None, "vLLM's /metrics has none of the gauges routing reads"
    assert load.running >= 0 and load.waiting >= 0 and 0.0 <= load.kv_cache <= 1.0
