"""bench.redisresume runs end to end (a short run against a real redis-server): resume off, local, Redis."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from bench.redisresume import CONFIGS, package_of, parse_commandstats, parse_loads

from .redisserver import redis_binary

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"([0-9][0-9.,]*)"
CELL = r"([0-9][0-9.,]*|–)"


def value(text: str) -> float:
    return float(text.replace(",", ""))


def test_parsers() -> None:
    assert parse_loads("4x50, 16x200") == [(4, 50), (16, 200)]
    stats = parse_commandstats("# Commandstats\r\ncmdstat_evalsha:calls=12,usec=3,usec_per_call=0.25\r\n"
                               "cmdstat_script|load:calls=2,usec=1\r\n")
    assert stats == {"evalsha": 12, "script|load": 2}
    assert package_of("coredis/pool/_basic.py") == "coredis"
    assert package_of("/venv/lib/python3.11/site-packages/anyio/_backends/_trio.py") == "anyio"
    assert package_of("trioai/sharedgen.py") == "trioai/sharedgen.py"
    assert package_of("contextlib.py") == "contextlib"


async def test_redisresume_bench_prints_every_table() -> None:
    command = [sys.executable, "-W", "ignore", "-m", "bench.redisresume", "--rounds", "1", "--loads", "2x6",
               "--connections", "2", "--throughput-tokens", "8", "--duration", "0.3", "--profile", "0",
               "--quiet-below", "0", "--redis-server", redis_binary()]
    with trio.fail_after(180):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    header = f"| figure (median of rounds) | {' | '.join(CONFIGS)} | Redis / local | Redis / local, per round |"
    assert out.count(header) == 2, out  # the paced load and the throughput run

    def figure(name: str) -> list[list[str]]:
        rows = re.findall(rf"^\| {re.escape(name)} \| {CELL} \| {CELL} \| {CELL} \| ([0-9.]+×|–) \| ([0-9.]*|–) \|$",
                          out, re.MULTILINE)
        assert len(rows) == 2, (name, out)
        return [list(found) for found in rows]

    for cells in figure("gateway CPU ms / 1,000 token events"):
        assert all(value(cell) > 0 for cell in cells[:3]), cells
    for cells in figure("redis-server CPU ms / 1,000 token events"):
        assert value(cells[2]) > 0, cells
    for cells in figure("relayed tok/s"):
        assert all(value(cell) > 0 for cell in cells[:3]), cells
    # Only the Redis configuration talks to Redis; each generation's frames are appended before they are sent.
    paced_trips, _ = figure("Redis round trips (log appends) / generation")
    assert value(paced_trips[0]) == 0 and value(paced_trips[1]) == 0, paced_trips
    assert value(paced_trips[2]) >= 2, paced_trips  # at least one token frame and the done
    for name in ("Redis commands / generation (commandstats)", "Redis script calls (EVALSHA) / generation"):
        for cells in figure(name):
            assert value(cells[0]) == 0 and value(cells[2]) >= 1, (name, cells)
    assert re.findall(r"^\| streams not exact \(all rounds\) \| 0 \| 0 \| 0 \| – \| – \|$", out, re.MULTILINE) \
        == ["| streams not exact (all rounds) | 0 | 0 | 0 | – | – |"] * 2, out
    assert "streams not exact, all configurations and rounds: 0" in out
    for label in ("paced 2×6", "throughput @2"):
        line = re.search(rf"^\| {re.escape(label)} \| {NUMBER} \| {NUMBER} \| ([0-9.]+)× \| ([0-9.]+) \| "
                         r"([0-9.]+)× \| (yes|no: .*) \|$", out, re.MULTILINE)
        assert line, (label, out)
    assert "- during round 1: this run " in out
