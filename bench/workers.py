"""Worker processes against one: ``python -m bench.workers`` relays the same load through ``--workers 1`` and 2.

Three kinds of processes, as in ``bench.run``: the fake engine (``trioai.fake_upstream --numbered``,
unpaced), the gateway (``trioai serve --workers N``: for N > 1 a supervisor and N workers) and this
load generator (``bench.loadgen.ws_load``: every connection runs generations back to back). For each
connection count it prints, per worker count: relayed tokens per second, the gateway's CPU (the
supervisor and every worker: ``/proc`` utime + stime) per 1,000 tokens, how busy the whole machine
was, and whether every stream ended ``done`` with its exact text; then the ratio of 2 workers to 1.
The load generator shares the machine: when it is what limits tokens per second, more workers
cannot show, and the CPU figure is the one to read.

    python -m bench.workers                       # 16 and 256 connections, 5 s each, 3 rounds, 10,000 idle
    python -m bench.workers --connections 64 --duration 2 --rounds 1 --idle 0
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

from bench.compare import busy_percent, hold_idle, machine_cpu, process_cpu_seconds
from bench.loadgen import ws_load
from bench.queue import raise_fd_limit
from bench.run import fake_engine, row, spawn


@dataclass(frozen=True)
class Held:
    """Idle connections held by one gateway: its memory for them, and whether it still answered."""

    workers: int
    idle: int
    kib_per_connection: float
    answered: bool


def rss_kib(pids: Sequence[int]) -> int:
    """Resident memory of every process in ``pids`` together (one that is gone counts 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def hold(address: str, pids: Sequence[int], workers: int, idle: int) -> Held:
    """Open ``idle`` WebSocket connections that send nothing, then ask for one answer."""
    before = rss_kib(pids)
    streams = await hold_idle(address, idle)
    try:
        await trio.sleep(1.0)
        after = rss_kib(pids)
        answered = (await ws_load(address, 1, 8, 0.0)).all_exact
    finally:
        for stream in streams:
            await stream.aclose()
    return Held(workers, idle, (after - before) / max(idle, 1), answered)


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
                  duration: float, idle: int = 0, held: list[Held] | None = None) -> list[Sample]:
    """One gateway with ``workers`` workers, one load per connection count; then, with ``idle``,
    the idle connections it holds (into ``held``)."""
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
        if idle and held is not None:
            held.append(await hold(server.address, pids, workers, idle))
    return samples


async def main_async(args: argparse.Namespace) -> None:
    """Alternate 1 and 2 workers for ``--rounds`` rounds; print the medians as a Markdown table."""
    results: dict[tuple[int, int], list[Sample]] = {}
    held: list[Held] = []
    if args.idle:
        raise_fd_limit(args.idle + 1024)
    async with fake_engine() as engine:
        for round_number in range(args.rounds):
            order = (1, 2) if round_number % 2 == 0 else (2, 1)  # alternate who goes first
            for workers in order:
                for sample in await measure(engine.address, workers, args.connections, args.tokens, args.duration,
                                            args.idle, held):
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
    if held:
        print(f"\n### Connections held: {args.idle:,} idle WebSocket connections, then one request\n")
        print(row("workers", "KiB per idle connection (all processes)", "answered while holding them"))
        print(row(*["---"] * 3))
        for workers in (1, 2):
            mine = [h for h in held if h.workers == workers]
            print(row(workers, f"{statistics.median(h.kib_per_connection for h in mine):.1f}",
                      "yes" if all(h.answered for h in mine) else "NO"))


def main() -> None:
    """``python -m bench.workers``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=lambda s: [int(n) for n in s.split(",")], default=[16, 256],
                        help="comma-separated connection counts (default: 16,256)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median")
    parser.add_argument("--idle", type=int, default=10000,
                        help="idle connections each gateway holds after its loads (0: skip)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs\n")
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
