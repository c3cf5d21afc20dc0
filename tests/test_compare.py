"""bench.compare runs end to end (a short run): trioai and the FastAPI + openai peer side by side."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from bench.compare import bucket_quantile, histogram_buckets

ROOT = Path(__file__).resolve().parent.parent


async def test_compare_prints_every_figure_with_a_ratio() -> None:
    command = [sys.executable, "-W", "ignore", "-m", "bench.compare", "--rounds", "1", "--duration", "0.5",
               "--streams", "8", "--cancels", "2", "--idle", "50"]
    with trio.fail_after(240):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    for figure in ("tok/s @1", "tok/s @16", "tok/s @64", "TTFT p50 ms", "ITL p99 ms", "CPU ms / 1000 token events",
                   "machine CPU busy %", "cancel→ack p99 ms", "cancel→engine closed p50 ms", "KiB / idle conn @50"):
        assert re.search(rf"^\| {re.escape(figure)} \|", out, re.MULTILINE), figure
    busy = re.search(r"^\| machine CPU busy % \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", out, re.MULTILINE)
    assert busy and all(0 < float(share) <= 100 for share in busy.groups()), busy
    # trioai relays faster than the peer, and only trioai acknowledges a cancel mid-stream.
    ratio = float(re.search(r"^\| tok/s @16 \|[^|]*\|[^|]*\|[^|]*\| ([0-9.]+)×", out, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert ratio > 1.0
    assert re.search(r"^\| cancel→ack p50 ms \|\s*\| [0-9.]+ \| never \(2 s cap\)", out, re.MULTILINE)
    assert out.count("| yes |") >= 1


async def test_paced_only_prints_the_paced_figures_and_nothing_else() -> None:
    command = [sys.executable, "-W", "ignore", "-m", "bench.compare", "--paced-only", "--rounds", "1",
               "--streams", "4", "--paced-tokens", "5"]
    with trio.fail_after(120):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    rows = re.findall(r"^\| ([^|]+?) \|", out, re.MULTILINE)
    assert rows[2:] == ["TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "CPU ms / 1000 token events",
                        "token events / delta", "machine CPU busy %", "load generator CPU ms / 1000 token events",
                        "engine CPU ms / 1000 token events", "request start p50 µs (gateway)",
                        "request start p99 µs (gateway)", "relay p50 µs (gateway)", "relay p99 µs (gateway)"], rows
    # The gateway's own clock (its /metrics histograms): every request started, a relay sampled.
    for name in ("request start p50 µs (gateway)", "relay p99 µs (gateway)"):
        found = re.search(rf"^\| {re.escape(name)} \| – \| ([0-9.,]+) \| – \|", out, re.MULTILINE)
        assert found and float(found.group(1).replace(",", "")) > 0, name
    cpu: dict[str, list[float]] = {}
    for name in ("load generator CPU ms / 1000 token events", "engine CPU ms / 1000 token events"):
        found = re.search(rf"^\| {name} \| ([0-9.,]+) \| ([0-9.,]+) \| ([0-9.,]+) \|", out, re.MULTILINE)
        assert found, name
        cpu[name] = [float(value.replace(",", "")) for value in found.groups()]
    # The engine's and load generator's CPU time comes in 10 ms clock ticks: the engine's share of
    # 20 events may round to 0, the load generator's three runs together cannot.
    assert all(value >= 0 for values in cpu.values() for value in values), cpu
    assert sum(cpu["load generator CPU ms / 1000 token events"]) > 0, cpu


async def test_gateway_code_runs_a_trioai_column_per_copy(tmp_path: Path) -> None:
    for name in ("old", "new"):  # two "copies" of the package: links to this tree's
        (tmp_path / name).mkdir()
        (tmp_path / name / "trioai").symlink_to(ROOT / "trioai")
    command = [sys.executable, "-W", "ignore", "-m", "bench.compare", "--paced-only", "--rounds", "2",
               "--streams", "4", "--paced-tokens", "5",
               "--gateway-code", str(tmp_path / "old"), "--gateway-code", str(tmp_path / "new")]
    with trio.fail_after(180):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert f"gateway code: {tmp_path / 'old' / 'trioai'}" in out
    assert "| figure (median of rounds) | direct SSE | trioai old | trioai new | peer | new / old |" in out
    cpu = re.search(r"^\| CPU ms / 1000 token events \| – \| ([0-9.,]+) \| ([0-9.,]+) \| ([0-9.,]+) \| "
                    r"([0-9.]+×|–) \|$", out, re.MULTILINE)
    assert cpu, out
    assert re.search(r"^\| ITL p50 ms \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+× \|$", out, re.MULTILINE)
    assert result.stderr.decode().count("done") == 2  # one line per round


async def test_gateway_code_labels_must_differ(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name / "same").mkdir(parents=True)
        (tmp_path / name / "same" / "trioai").symlink_to(ROOT / "trioai")
    command = [sys.executable, "-m", "bench.compare", "--paced-only", "--rounds", "1",
               "--gateway-code", str(tmp_path / "a" / "same"), "--gateway-code", str(tmp_path / "b" / "same")]
    with trio.fail_after(60):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode != 0
    assert "last parts must differ" in result.stderr.decode()


async def test_gateway_code_without_a_package_fails(tmp_path: Path) -> None:
    # PYTHONPATH skips a directory without trioai/, so the gateway would silently run this tree.
    command = [sys.executable, "-m", "bench.compare", "--paced-only", "--rounds", "1",
               "--gateway-code", str(tmp_path / "gone")]
    with trio.fail_after(60):
        result = await trio.run_process(command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode != 0
    assert f"--gateway-code {tmp_path / 'gone'}: no " in result.stderr.decode()


EXPOSITION = """# HELP trioai_relay_seconds x
trioai_relay_seconds_bucket{le="0.001"} %d
trioai_relay_seconds_bucket{le="0.002"} %d
trioai_relay_seconds_bucket{le="+Inf"} %d
trioai_relay_seconds_count %d
trioai_other_bucket{le="0.001"} 99.0
"""


def test_histogram_quantiles_come_from_the_buckets_of_the_interval() -> None:
    before = histogram_buckets(EXPOSITION % (10, 10, 10, 10), "trioai_relay_seconds")
    assert before == [(0.001, 10.0), (0.002, 10.0), (float("inf"), 10.0)]
    # In the interval: 50 observations up to 1 ms, 50 more up to 2 ms.
    after = histogram_buckets(EXPOSITION % (60, 110, 110, 110), "trioai_relay_seconds")
    assert bucket_quantile(before, after, 0.5) == 0.001
    assert abs(bucket_quantile(before, after, 0.99) - 0.00198) < 1e-9  # interpolated within (1, 2] ms
    assert abs(bucket_quantile(before, after, 0.25) - 0.0005) < 1e-9  # within (0, 1] ms
    assert bucket_quantile(before, before, 0.5) != bucket_quantile(before, before, 0.5)  # none: NaN
    beyond = histogram_buckets(EXPOSITION % (60, 110, 120, 120), "trioai_relay_seconds")
    assert bucket_quantile(before, beyond, 0.99) == 0.002  # past the last bound: that bound
