"""Worker processes against one: ``python -m bench.workers`` relays the same load through ``--workers 1`` and 2.

Three kinds of processes, as in ``bench.run``: the fake engine (``trioai.fake_upstream --numbered``,
unpaced), the gateway (``trioai serve --workers N``: for N > 1 a supervisor and N workers) and this
load generator (``bench.loadgen.ws_load``: every connection runs generations back to back). For each
connection count it prints, per worker count: relayed tokens per second, the gateway's CPU (the
supervisor and every worker: ``/proc`` utime + stime) per 1,000 tokens, how busy the whole machine
was, and whether every stream ended ``done`` with its exact text; then the ratio of 2 workers to 1.
The load generator shares the machine: when it is what limits tokens per second, more workers
cannot show, and the CPU figure is the one to read.

    python -m bench.workers                       # 16 and 256 connections, 5 s each, 3 rounds
    python -m bench.workers --connections 64 --duration 2 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.compare import busy_percent, machine_cpu, process_cpu_seconds
from bench.loadgen import ws_load
from bench.run import fake_engine, row, spawn


@dataclass(frozen=True)
class Sample:
    """One load through one gateway."""

    workers: int
    connections: int
    tokens_per_s: float
    cpu_ms_per_1000_tokens: float
    machine_busy: float
    exact: bool


def gateway_pids(pid: int) -> list[int]:
    """The gateway's processes: ``pid`` and its children (the workers, if any), from ``/proc``."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    children.append(int(entry.name))
    return [pid, *sorted(children)]


def gateway_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of every process in ``pids`` so far (one that is gone counts 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += process_cpu_seconds(pid)
    return total


def gateway_args(upstream: str, workers: int) -> list[str]:
    """``python`` arguments of the gateway: as ``bench.run``'s, with ``--workers``."""
    return ["-m", "trioai", "serve", "--port", "0", "--upstream", upstream, "--max-concurrency", "256",
            "--max-streams-per-connection", "64", "--max-connections", "20000", "--workers", str(workers)]


def announcement(workers: int) -> str:
    """The log line that says the gateway listens (every worker, with more than one)."""
    return r"listening on (ws://\S+)" if workers == 1 else rf"{workers} workers listening on (ws://\S+)"


async def measure(upstream: str, workers: int, connections: Sequence[int], max_tokens: int,
                  duration: float) -> list[Sample]:
    """One gateway with ``workers`` workers, one load per connection count."""
    samples = []
    async with spawn(gateway_args(upstream, workers), announcement(workers), stream="stderr") as server:
        warm = await ws_load(server.address, 2 * workers, 4, 0.0)  # model lookups, engine connections
        if not warm.all_exact:
            raise RuntimeError(f"--workers {workers}: the warm-up failed")
        pids = gateway_pids(server.process.pid)
        if len(pids) != (1 if workers == 1 else workers + 1):
            raise RuntimeError(f"--workers {workers}: found processes {pids}")
        for count in connections:
            cpu_before, machine_before = gateway_cpu_seconds(pids), machine_cpu()
            result = await ws_load(server.address, count, max_tokens, duration)
            cpu = gateway_cpu_seconds(pids) - cpu_before
            samples.append(Sample(workers, count, result.tokens_per_s, 1e6 * cpu / max(result.tokens, 1),
                                  busy_percent(machine_before, machine_cpu()), result.all_exact))
            print(f"--workers {workers}, {count} connections: {result.tokens_per_s:,.0f} tokens/s",
                  file=sys.stderr, flush=True)
    return samples


async def main_async(args: argparse.Namespace) -> None:
    """Alternate 1 and 2 workers for ``--rounds`` rounds; print the medians as a Markdown table."""
    results: dict[tuple[int, int], list[Sample]] = {}
    async with fake_engine() as engine:
        for round_number in range(args.rounds):
            order = (1, 2) if round_number % 2 == 0 else (2, 1)  # alternate who goes first
            for workers in order:
                for sample in await measure(engine.address, workers, args.connections, args.tokens, args.duration):
                    results.setdefault((workers, sample.connections), []).append(sample)
    print(f"### --workers 2 against 1: unpaced engine, {args.tokens}-token generations back to back, "
          f"{args.duration:g} s each, median of {args.rounds} round(s)\n")
    print(row("connections", "workers", "relayed tok/s", "gateway CPU ms / 1,000 tokens", "machine busy %",
              "exact & in order", "tok/s ratio 2:1"))
    print(row(*["---"] * 7))
    for count in args.connections:
        rates = {}
        for workers in (1, 2):
            samples = results[(workers, count)]
            rates[workers] = statistics.median(s.tokens_per_s for s in samples)
            ratio = f"{rates[2] / rates[1]:.2f}" if workers == 2 and rates[1] else ""
            print(row(count, workers, f"{rates[workers]:,.0f}",
                      f"{statistics.median(s.cpu_ms_per_1000_tokens for s in samples):.1f}",
                      f"{statistics.median(s.machine_busy for s in samples):.0f}",
                      "yes" if all(s.exact for s in samples) else "NO", ratio))


def main() -> None:
    """``python -m bench.workers``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=lambda s: [int(n) for n in s.split(",")], default=[16, 256],
                        help="comma-separated connection counts (default: 16,256)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs\n")
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
