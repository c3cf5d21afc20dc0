"""Several engines behind one gateway (issue 17): what routing costs, and what it does to relaying.
``python -m bench.engines``.

1. **Routing cost**, in this process: one routing decision (:func:`trioai.enginepool.choose`) among
   4 and 16 engines of one model, with the engines' own counts only and with engine-reported load
   (vLLM's ``/metrics``), and :meth:`EnginePool.engine_for` entered and left (the decision plus
   holding room on the engine, what each request pays). Engines have varied loads, requests prefer
   a connection's last engine; ``--decisions`` per run, the median of ``--repeats`` runs, in µs
   (``time.perf_counter_ns``).
2. **Relayed tokens/s**: a real ``trioai serve`` process in front of 1 fake engine and in front of
   ``--engines`` fake engines (``python -m trioai.fake_upstream --numbered``, each its own process,
   given as repeated ``--upstream``), driven by ``bench.loadgen.ws_load`` with the same
   ``--connections`` generations of ``--tokens`` tokens back to back for ``--duration`` s; the two
   sides alternate which goes first in each round, each on a fresh gateway, and each figure is the
   median of ``--rounds`` rounds. Also the gateway's CPU time (``/proc/PID/task/*/schedstat``) per
   1,000 relayed tokens and the share of a core it got, the engines' and the load generator's CPU
   per 1,000 tokens, every stream checked for the exact text, and the requests each engine got (the
   gateway's ``trioai_engine_requests``). The engine processes share the machine's cores with the
   gateway and the load generator: on a machine with few cores, more engine processes leave the
   gateway a smaller share of them, so compare the CPU per 1,000 tokens more than the tokens/s.

Before the routing cost and before each round the run waits until every core has been under
``--quiet-below`` % busy for ``--quiet-for`` s (at most ``--quiet-cap`` s, then it goes on and says
so), and prints how busy the machine was, and the share other processes took meanwhile.

    python -m bench.engines                       # ~1 minute on a quiet machine
    python -m bench.engines --rounds 1 --duration 0.3 --connections 4 --tokens 8 --decisions 2000 \\
        --repeats 3 --quiet-below 0              # a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import httpx
import trio

from bench.compare import add_quiet_arguments, busy_percent, free_port, machine_cpu
from bench.loadgen import ws_load
from bench.queue import CURRENT, gateway_from
from bench.run import Process, fake_engine, row
from bench.surfaces import Share, gateway_cpu_seconds, wait_quiet
from trioai.config import Settings
from trioai.enginepool import Engine, EngineLoad, EnginePool, choose
from trioai.enginespec import EngineSpec, default_name
from trioai.upstream import Upstream

MODEL = "fake-model"
CAPACITY = 16  # max_concurrency of each engine in the routing-cost runs


# --- routing cost ------------------------------------------------------------------------------------


def routing_engines(count: int, reported: bool, seed: int = 17) -> list[Engine]:
    """``count`` engines of :data:`MODEL` with varied loads (and engine-reported load if ``reported``)."""
    rng = random.Random(seed)
    engines = []
    for index in range(count):
        spec = EngineSpec(f"http://10.0.0.{index + 1}:8000/v1", f"gpu-{index}", models=(MODEL,),
                          max_concurrency=CAPACITY, weight=1.0 + index % 3)
        engine = Engine(spec, cast(Upstream, None))  # routing never touches the client
        engine.in_flight = rng.randrange(CAPACITY // 2)
        if reported:
            engine.reported = EngineLoad(running=float(engine.in_flight + rng.randrange(3)),
                                         waiting=float(rng.randrange(4)), kv_cache=rng.random())
        engines.append(engine)
    return engines


def time_choose(engines: Sequence[Engine], decisions: int) -> float:
    """Nanoseconds per :func:`choose` call, the preferred engine varying from call to call."""
    prefers = [engines[i % len(engines)].name for i in range(64)]
    start = time.perf_counter_ns()
    for index in range(decisions):
        choose(engines, prefers[index & 63])
    return (time.perf_counter_ns() - start) / decisions


async def time_engine_for(pool: EnginePool, decisions: int) -> float:
    """Nanoseconds per ``async with pool.engine_for(...)`` entered and left, no request in between."""
    prefers = [pool.engines[i % len(pool.engines)].name for i in range(64)]
    start = time.perf_counter_ns()
    for index in range(decisions):
        async with pool.engine_for(MODEL, prefers[index & 63]):
            pass
    return (time.perf_counter_ns() - start) / decisions


@dataclass
class RoutingCost:
    """µs per decision of one pool size: :func:`choose` with counts only, with reported load, ``engine_for``."""

    engines: int
    choose_us: float
    reported_us: float
    engine_for_us: float


def routing_cost(count: int, decisions: int, repeats: int) -> RoutingCost:
    """The median over ``repeats`` runs of ``decisions`` decisions each."""
    plain, reported = routing_engines(count, False), routing_engines(count, True)
    time_choose(plain, min(decisions, 1000))  # warm up
    choose_ns = statistics.median(time_choose(plain, decisions) for _ in range(repeats))
    reported_ns = statistics.median(time_choose(reported, decisions) for _ in range(repeats))

    async def pool_runs() -> list[float]:
        pool = EnginePool(routing_engines(count, True), Settings(max_concurrency=CAPACITY))
        await time_engine_for(pool, min(decisions, 1000))
        return [await time_engine_for(pool, decisions) for _ in range(repeats)]

    engine_for_ns = statistics.median(trio.run(pool_runs))
    return RoutingCost(count, choose_ns / 1000, reported_ns / 1000, engine_for_ns / 1000)


# --- relaying through a gateway -------------------------------------------------------------------


@dataclass
class Figures:
    """One side's figures, one list entry per round."""

    values: dict[str, list[float]] = field(default_factory=dict)
    spread: list[str] = field(default_factory=list)  # requests per engine, one entry per round

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        values = self.values.get(name)
        return statistics.median(values) if values else float("nan")


async def engine_requests(metrics_url: str) -> dict[str, int]:
    """``trioai_engine_requests`` per engine (both outcomes) from the gateway's ``/metrics``."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        text = (await client.get(metrics_url)).text
    counts: dict[str, int] = {}
    for engine, value in re.findall(r'^trioai_engine_requests_total\{engine="([^"]+)",outcome="[^"]+"\} ([0-9.e+]+)$',
                                    text, re.MULTILINE):
        counts[engine] = counts.get(engine, 0) + int(float(value))
    return counts


@asynccontextmanager
async def gateway_for(engines: Sequence[Process], http_port: int) -> AsyncIterator[Process]:
    """``trioai serve`` with one ``--upstream`` per engine and a metrics port."""
    options = ["--send-timeout", "60", "--max-connections", "20000", "--http-port", str(http_port)]
    for engine in engines[1:]:
        options += ["--upstream", engine.address]
    async with gateway_from(CURRENT, engines[0].address, options) as process:
        yield process


def engines_cpu_seconds(engines: Sequence[Process]) -> float:
    """CPU time of every engine process so far."""
    return sum(gateway_cpu_seconds(engine.process.pid) for engine in engines)


async def relay(engines: Sequence[Process], connections: int, tokens: int, duration: float,
                figures: Figures) -> None:
    """One run on a fresh gateway: tokens/s, gateway CPU per 1,000 tokens, exactness, requests per engine."""
    http_port = free_port()
    async with gateway_for(engines, http_port) as gateway:
        warm = await ws_load(gateway.address, 1, 4, 0.0)
        if not warm.all_exact:
            raise RuntimeError(f"{len(engines)} engine(s): the warm-up request failed: {warm.streams}")
        before = await engine_requests(f"http://127.0.0.1:{http_port}/metrics")
        cpu_before, machine_before = gateway_cpu_seconds(gateway.process.pid), machine_cpu()
        engines_before, load_before = engines_cpu_seconds(engines), time.process_time()
        result = await ws_load(gateway.address, connections, tokens, duration)
        cpu_after, machine_after = gateway_cpu_seconds(gateway.process.pid), machine_cpu()
        engines_after, load_after = engines_cpu_seconds(engines), time.process_time()
        after = await engine_requests(f"http://127.0.0.1:{http_port}/metrics")
    figures.add("relayed tok/s", result.tokens_per_s)
    per_1000 = 1000 / max(result.tokens, 1)
    figures.add("gateway CPU s / 1,000 tokens", (cpu_after - cpu_before) * per_1000)
    figures.add("gateway CPU cores used", (cpu_after - cpu_before) / result.elapsed if result.elapsed else 0.0)
    figures.add("engines' CPU s / 1,000 tokens (all engine processes)", (engines_after - engines_before) * per_1000)
    figures.add("load generator CPU s / 1,000 tokens", (load_after - load_before) * per_1000)
    figures.add("machine busy %", busy_percent(machine_before, machine_after))
    figures.add("streams", len(result.streams))
    figures.add("streams not exact", sum(1 for stream in result.streams if not stream.exact))
    names = [default_name(engine.address) for engine in engines]  # as the gateway names them
    figures.spread.append("/".join(str(after.get(name, 0) - before.get(name, 0)) for name in names))


def fmt(value: float) -> str:
    """A figure for the table."""
    if value != value:  # NaN
        return "–"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


async def relay_rounds(args: argparse.Namespace) -> tuple[dict[str, Figures], list[str], int]:
    """Every round of the relaying comparison; the figures per side, the machine's notes, rounds run."""
    one, many = "1 engine", f"{args.engines} engines"
    figures = {one: Figures(), many: Figures()}
    notes: list[str] = []
    async with AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(fake_engine("--delay", str(args.engine_delay)))
                   for _ in range(args.engines)]
        sides = {one: engines[:1], many: engines}
        run_start = Share.now(*engines)
        for round_number in range(args.rounds):
            calm = await wait_quiet(args.quiet_below, args.quiet_for, args.quiet_cap)
            notes.append(f"before round {round_number + 1}: {calm}" + ("" if calm.ok else " (measured anyway)"))
            round_start = Share.now(*engines)
            order = (one, many) if round_number % 2 == 0 else (many, one)  # alternate who goes first
            for side in order:
                with trio.fail_after(args.duration + 120):
                    await relay(sides[side], args.connections, args.tokens, args.duration, figures[side])
            notes.append(f"during round {round_number + 1}: {Share.now(*engines).since(round_start)}")
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        notes.append(f"the whole relaying run, waits included: {Share.now(*engines).since(run_start)}")
    return figures, notes, args.rounds


def print_relay(args: argparse.Namespace, figures: dict[str, Figures], rounds: int) -> None:
    one, many = figures
    print(f"### Relayed through one gateway: 1 engine vs {args.engines} engines, {args.connections} connections, "
          f"{args.tokens}-token generations back to back for {args.duration:g} s, median of {rounds} round(s)\n")
    print(row("figure (median of rounds)", one, many, f"{args.engines} / 1"))
    print(row(*["---"] * 4))
    for name in ("relayed tok/s", "gateway CPU s / 1,000 tokens", "gateway CPU cores used",
                 "engines' CPU s / 1,000 tokens (all engine processes)", "load generator CPU s / 1,000 tokens",
                 "machine busy %", "streams", "streams not exact"):
        a, b = figures[one].median(name), figures[many].median(name)
        label = f"relayed tok/s @{args.connections}" if name == "relayed tok/s" else name
        ratio = f"{b / a:.2f}×" if a and a == a and b == b and name not in ("streams not exact",) else "–"
        print(row(label, fmt(a), fmt(b), ratio))
    print(row("requests per engine, each round", ", ".join(figures[one].spread), ", ".join(figures[many].spread), ""))
    print()


def print_routing(costs: Sequence[RoutingCost], decisions: int, repeats: int) -> None:
    print(f"### Routing cost per request: {decisions:,} decisions per run, median of {repeats} runs, "
          f"engines of one model with varied loads, max_concurrency {CAPACITY} each\n")
    print(row("engines", "choose() µs", "choose() µs, engine-reported load", "engine_for() enter + exit µs"))
    print(row(*["---"] * 4))
    for cost in costs:
        print(row(cost.engines, f"{cost.choose_us:.2f}", f"{cost.reported_us:.2f}", f"{cost.engine_for_us:.2f}"))
    print()


def main() -> None:
    """``python -m bench.engines``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pool-sizes", type=lambda s: [int(n) for n in s.split(",")], default=[4, 16],
                        help="engine counts of the routing-cost runs (default: 4,16)")
    parser.add_argument("--decisions", type=int, default=200_000, help="routing decisions per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is printed")
    parser.add_argument("--engines", type=int, default=4, help="fake engines of the several-engine side")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the relaying comparison")
    parser.add_argument("--connections", type=int, default=16, help="WebSocket connections, both sides")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of each relaying run")
    parser.add_argument("--engine-delay", type=float, default=0.0, help="the fake engines' seconds between tokens")
    add_quiet_arguments(parser, below=15.0, window=10.0, cap=300.0)
    args = parser.parse_args()
    if args.engines < 2:
        parser.error("--engines must be at least 2")
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs\n")
    calm = trio.run(wait_quiet, args.quiet_below, args.quiet_for, args.quiet_cap)
    start = Share.now()
    costs = [routing_cost(count, args.decisions, args.repeats) for count in args.pool_sizes]
    routing_notes = [f"before the routing cost: {calm}" + ("" if calm.ok else " (measured anyway)"),
                     f"during the routing cost: {Share.now().since(start)}"]
    print_routing(costs, args.decisions, args.repeats)
    figures, notes, rounds = trio.run(relay_rounds, args)
    print_relay(args, figures, rounds)
    print("### The machine (busy: user + nice + system + irq + softirq; steal is not counted)\n")
    for note in routing_notes + notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
