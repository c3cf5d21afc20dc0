"""The benchmark's client side measures what it claims: exact-order checks, percentiles, cancel timing."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from bench.loadgen import expected_text, percentile, sse_load, ws_cancel, ws_load
from trioai.config import Settings
from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import RunningServer, serve

ROOT = Path(__file__).resolve().parent.parent


def numbered(body: dict[str, Any]) -> Script:
    return Script(tokens=tuple(f"w{i} " for i in range(body["max_tokens"])), batch=4, finish_reason="length")


def skips_a_token(body: dict[str, Any]) -> Script:
    tokens = [f"w{i} " for i in range(body["max_tokens"])]
    del tokens[3]
    return Script(tokens=tuple(tokens), finish_reason="length")


async def start(nursery: trio.Nursery, script: Any) -> tuple[FakeUpstream, RunningServer]:
    engine = FakeUpstream(script)
    await nursery.start(engine.serve)
    settings = Settings(host="127.0.0.1", port=0, upstream=engine.base_url, max_concurrency=64)
    server: RunningServer = await nursery.start(serve, settings)
    return engine, server


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert math.isnan(percentile([], 50))


def test_expected_text() -> None:
    assert expected_text(3) == "w0 w1 w2 "


async def test_ws_load_counts_and_checks_every_stream(nursery: trio.Nursery) -> None:
    _, server = await start(nursery, numbered)
    result = await ws_load(server.url, connections=3, max_tokens=40, duration=0.0)
    assert len(result.streams) == 3
    assert result.all_exact
    assert result.tokens == 120
    assert all(s.outcome == "done" and s.ttft is not None and s.ttft >= 0 for s in result.streams)
    assert result.tokens_per_s > 0


async def test_ws_load_notices_a_missing_token(nursery: trio.Nursery) -> None:
    _, server = await start(nursery, skips_a_token)
    result = await ws_load(server.url, connections=2, max_tokens=10, duration=0.0)
    assert [s.outcome for s in result.streams] == ["done", "done"]
    assert not result.all_exact


async def test_sse_load_reads_the_engine_directly(nursery: trio.Nursery) -> None:
    engine = FakeUpstream(numbered)
    await nursery.start(engine.serve)
    result = await sse_load(engine.base_url, connections=2, max_tokens=25, duration=0.0)
    assert result.all_exact
    assert result.tokens == 50
    assert len(engine.requests) == 2


async def test_ws_cancel_times_the_acknowledgement(nursery: trio.Nursery) -> None:
    engine, server = await start(nursery, lambda body: Script(tokens=("x ",) * 10_000, delay=0.001))
    async with open_websocket_url(server.url) as ws:
        sent, sample = await ws_cancel(ws, "k1", after_tokens=3)
    assert sample.outcome == "cancelled"
    assert 0 <= sample.to_ack < 5
    record = engine.requests[-1]
    with trio.fail_after(5):
        await record.closed.wait()
    assert record.disconnected_at is not None and record.disconnected_at >= sent
    assert not record.completed


async def test_ws_cancel_rejects_a_stream_that_ends_first(nursery: trio.Nursery) -> None:
    _, server = await start(nursery, lambda body: Script(tokens=("x ",), finish_reason="stop"))
    async with open_websocket_url(server.url) as ws:
        with pytest.raises(AssertionError, match="ended before the cancel"):
            await ws_cancel(ws, "k1", after_tokens=3)


async def test_queue_bench_counts_every_request_and_the_gateway_cpu() -> None:
    command = [sys.executable, "-W", "ignore", "-m", "bench.queue", "--queued", "20", "--rounds", "1"]
    with trio.fail_after(120):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    line = re.search(r"^\| current \| 20 \| ([0-9.]+) \| [0-9]+ \| ([0-9.]+) \| ([0-9.]+) \| ([0-9]+) \| ([0-9]+) \| "
                     r"([0-9]+) \|$", out, re.MULTILINE)
    assert line, out
    wall, cpu_ms, queued_mean, queued_max, deepest, not_done = line.groups()
    assert not_done == "0"  # every request ended done, with the exact text
    assert float(wall) > 0 and float(cpu_ms) > 0  # 20 requests cost the gateway more than one 10 ms clock tick
    assert 0 <= float(queued_mean) <= int(queued_max) <= int(deepest) <= 20


async def test_surfaces_bench_runs_both_comparisons_and_every_request_ends_normally() -> None:
    command = [sys.executable, "-W", "ignore", "-m", "bench.surfaces", "--rounds", "1",
               "--streams", "2", "--tokens", "5", "--long-streams", "2", "--long-tokens", "5",
               "--connections", "2", "--throughput-tokens", "5", "--duration", "0.2",
               "--memory-n", "2", "--memory-tokens", "5", "--detach-after", "2", "--profile", "0", "--quiet-below", "0"]
    with trio.fail_after(180):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert "requests not ended normally: 0" in out, out  # every stream ended normally, with the exact text
    number = r"([0-9][0-9.,]*)"
    for title, sides in (("Resume on vs off", "resume off | resume on"), ("/v1/responses vs /ws/chat",
                                                                          "/ws/chat | /v1/responses")):
        section = out[out.index(f"#### {title}"):]
        assert f"| figure (median of rounds) | {sides} |" in section
        for figure in ("paced 2×5: gateway CPU ms / 1000 token events", "paced 2×5: TTFT p50 ms",
                       "throughput @2: tok/s", "throughput @2: gateway CPU ms / 1000 tokens"):
            line = rf"^\| {re.escape(figure)} \| {number} \| {number} \| [0-9.]+× \| [0-9., ]+ \|$"
            found = re.search(line, section, re.MULTILINE)
            assert found, (figure, section)
            assert all(float(value.replace(",", "")) > 0 for value in found.groups()), found.group(0)
    # With resume on, the ended generations' logs are kept (and counted in /metrics); off, nothing is.
    kept = re.search(rf"^\| ended: log KiB / generation \| 0.00 \| {number} \|", out, re.MULTILINE)
    assert kept and float(kept.group(1)) > 0, out
