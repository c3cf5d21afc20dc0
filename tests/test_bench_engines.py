"""bench.engines runs end to end (a short run): routing cost per decision, 1 engine vs several relayed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from bench.engines import routing_cost, routing_engines, time_choose
from trioai.enginepool import choose

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"([0-9][0-9.,]*)"


def test_routing_engines_are_varied_and_routable() -> None:
    engines = routing_engines(16, reported=True)
    assert len({e.name for e in engines}) == 16
    assert all(e.reported is not None and e.has_room for e in engines)
    best = choose(engines)
    assert best is not None and best.load == min(e.load for e in engines)
    assert time_choose(engines, 10) > 0


def test_routing_cost_measures_every_column() -> None:
    cost = routing_cost(4, decisions=200, repeats=3)
    assert cost.engines == 4
    assert cost.choose_us > 0 and cost.reported_us > 0 and cost.engine_for_us > 0


async def test_engines_bench_prints_both_tables() -> None:
    command = [sys.executable, "-W", "ignore", "-m", "bench.engines", "--rounds", "1", "--duration", "0.3",
               "--connections", "4", "--tokens", "8", "--decisions", "2000", "--repeats", "3", "--quiet-below", "0"]
    with trio.fail_after(180):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    for engines in (4, 16):
        line = re.search(rf"^\| {engines} \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$", out, re.MULTILINE)
        assert line, out
        assert all(float(value.replace(",", "")) > 0 for value in line.groups()), line.group(0)
    assert "| figure (median of rounds) | 1 engine | 4 engines | 4 / 1 |" in out
    for figure in ("relayed tok/s @4", "gateway CPU s / 1,000 tokens", "gateway CPU cores used", "streams"):
        line = re.search(rf"^\| {re.escape(figure)} \| {NUMBER} \| {NUMBER} \| ([0-9.]+)× \|$", out, re.MULTILINE)
        assert line, (figure, out)
        assert all(float(value.replace(",", "")) > 0 for value in line.groups()), line.group(0)
    assert re.search(r"^\| streams not exact \| 0 \| 0 \| – \|$", out, re.MULTILINE), out
    # Every stream went to some engine: one count for the single engine, four for the four.
    spread = re.search(r"^\| requests per engine, each round \| ([0-9]+) \| ([0-9]+)/([0-9]+)/([0-9]+)/([0-9]+) \|",
                       out, re.MULTILINE)
    streams = re.search(rf"^\| streams \| {NUMBER} \| {NUMBER} \|", out, re.MULTILINE)
    assert spread and streams, out
    assert int(spread.group(1)) == int(streams.group(1).replace(",", ""))
    assert sum(int(n) for n in spread.groups()[1:]) == int(streams.group(2).replace(",", ""))
    assert "- during round 1: this run " in out
