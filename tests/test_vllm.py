"""End to end against a real vLLM: the engine trioai is built for.

Run by ``scripts/test`` after it starts vLLM (CPU build, Gemma 3 270M) with ``scripts/vllm-cpu.sh``;
``TRIOAI_VLLM_URL`` names its base URL (``http://127.0.0.1:PORT/v1``). Without it these tests fail
rather than skip: a vLLM stage that silently tests nothing is worse than none.

The gateway runs in this process (a real trioai server on a real port); everything behind it is
vLLM. vLLM's own ``/metrics`` is the witness that a cancel or a disconnect really stopped the
generation in the engine, not only in trioai.
"""

from __future__ import annotations

import os
import re
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from trioai.config import Settings
from trioai.server import RunningServer, serve

from .helpers import chat, collect_until_terminal, recv, send

pytestmark = pytest.mark.vllm

PROMPT = "Write a long story about a lighthouse keeper and the sea."
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


async def engine_metrics(vllm_url: str) -> dict[str, float]:
    """vLLM's Prometheus gauges and counters we watch, summed over their labels."""
    metrics_url = vllm_url.removesuffix("/v1") + "/metrics"
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(metrics_url)
    response.raise_for_status()
    totals: dict[str, float] = {}
    for line in response.text.splitlines():
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


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["content"] for e in events if e["type"] == "token")


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
