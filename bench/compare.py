"""trioai against the common FastAPI + OpenAI-client design, in one run: ``python -m bench.compare``.

Starts the fake engine, trioai (``trioai serve``) and the peer (``bench/peers/fastapi_openai.py``)
as separate processes on 127.0.0.1, drives both with the same WebSocket load generator, alternating
trioai and peer within each round, and prints each figure as the median over ``--rounds`` rounds
with the trioai/peer ratio. A direct httpx SSE reader of the engine is the ceiling.

``--gateway-code DIR`` (repeatable, as in ``bench.queue``) runs the trioai rows from another copy of
the ``trioai`` package (``DIR/trioai``, a column per copy labelled with DIR's last part) for an A/B
on the same machine: the copies alternate within each round, each run on a fresh gateway process,
and the ratio column compares each copy with the first.

    python -m bench.compare --paced-only --rounds 5 --gateway-code /tmp/old --gateway-code /tmp/new

Needs the bench extra: ``pip install -e '.[bench]'`` (fastapi, uvicorn, openai — bench only).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from bench.loadgen import percentile, sse_load, ws_cancel, ws_load
from bench.run import Process, fake_engine, row
from trioai.fake_upstream import FakeUpstream, Script

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[int, int]:
    """Busy and total CPU time of the whole machine so far, in clock ticks (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the machine's CPU time that was busy between two :func:`machine_cpu` readings."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total else float("nan")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def schedstat_seconds(pid: int) -> float:
    """Time process ``pid`` has been on a CPU, all its threads, in nanoseconds (``schedstat``): the
    100 Hz ticks of ``/proc/PID/stat`` are ~6% of a 4-stream paced run's gateway CPU; falls back to them."""
    total = 0
    try:
        for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            with open(path) as stat:
                total += int(stat.read().split()[0])
    except (OSError, ValueError):
        return process_cpu_seconds(pid)
    return total / 1e9 if total else process_cpu_seconds(pid)


#: Issue 19's histograms, read from a trioai server's /metrics around the paced load.
HISTOGRAMS = {"request start": "trioai_request_start_seconds", "relay": "trioai_relay_seconds"}


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """The cumulative ``(le, count)`` buckets of histogram ``name`` in a Prometheus text exposition."""
    buckets = []
    for found in re.finditer(rf'^{re.escape(name)}_bucket{{le="([^"]+)"}} ([0-9.e+]+)$', text, re.MULTILINE):
        buckets.append((float(found.group(1)), float(found.group(2))))
    return sorted(buckets)


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile (0..1) of the observations between two readings of one histogram, linearly
    interpolated within its bucket (as Prometheus' ``histogram_quantile``); NaN with none."""
    counts = dict(before)
    delta = [(le, count - counts.get(le, 0.0)) for le, count in after]
    if not delta or delta[-1][1] <= 0:
        return float("nan")
    rank = q * delta[-1][1]
    lower, below = 0.0, 0.0
    for le, count in delta:
        if count >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bound: say that bound
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


@dataclass(frozen=True)
class CpuUse:
    """CPU used so far by the machine, the engine, this process (the load generator) and the server."""

    machine: tuple[int, int]
    engine: float
    load_generator: float
    server: float | None

    @classmethod
    def now(cls, engine: Process, server: Server | None = None) -> CpuUse:
        """A reading of every counter."""
        return cls(machine_cpu(), process_cpu_seconds(engine.process.pid), time.process_time(),
                   None if server is None else server.cpu_seconds())

    def record_since(self, before: CpuUse, token_events: int, figures: Figures) -> None:
        """Add the CPU figures of the interval from ``before`` to this reading."""
        per_1000 = 1_000_000 / token_events  # seconds of CPU → ms per 1,000 token events
        figures.add("machine CPU busy %", busy_percent(before.machine, self.machine))
        figures.add("load generator CPU ms / 1000 token events",
                    (self.load_generator - before.load_generator) * per_1000)
        figures.add("engine CPU ms / 1000 token events", (self.engine - before.engine) * per_1000)
        if self.server is not None and before.server is not None:
            figures.add("CPU ms / 1000 token events", (self.server - before.server) * per_1000)


@dataclass
class Server:
    """A server process under test and its WebSocket URL."""

    name: str
    process: trio.Process
    url: str
    metrics_url: str | None = None  # trioai's /metrics

    def cpu_seconds(self) -> float:
        """CPU time of the process so far (``schedstat``)."""
        return schedstat_seconds(self.process.pid)

    async def metrics(self) -> str:
        """The server's /metrics text ("" without a metrics port)."""
        if self.metrics_url is None:
            return ""
        async with httpx.AsyncClient(timeout=10.0) as client:
            return (await client.get(self.metrics_url)).text

    def rss_kib(self) -> int:
        """Resident memory now."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def peer(upstream: str) -> AsyncIterator[Server]:
    """The FastAPI + OpenAI-client peer, once it accepts connections."""
    port = free_port()
    env = {**os.environ, "PEER_UPSTREAM": upstream}
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench.peers.fastapi_openai", "--port", str(port)],
            stdin=subprocess.DEVNULL, env=env,
        )
        try:
            with trio.fail_after(30):
                while True:
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.05)
            yield Server("peer", process, f"ws://127.0.0.1:{port}/ws/chat")
        finally:
            process.terminate()
            with trio.move_on_after(10) as scope:
                scope.shield = True
                await process.wait()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def trioai_server(upstream: str, code: str | None = None, name: str = "trioai") -> AsyncIterator[Server]:
    """``trioai serve`` in front of ``upstream``, from this tree or from ``code/trioai``."""
    # Imported here: bench.queue imports this module's CPU readers, so a top-level import is circular.
    from bench.queue import CURRENT, gateway_from

    http_port = free_port()
    options = ("--send-timeout", "60", "--max-connections", "20000", "--http-port", str(http_port))
    if code is not None:
        require_package(code)  # again at every start: a copy removed mid-run would run this tree instead
    async with gateway_from(code or CURRENT, upstream, options) as process:
        yield Server(name, process.process, process.address, f"http://127.0.0.1:{http_port}/metrics")


SERVERS: dict[str, Callable[[str], Any]] = {"trioai": trioai_server, "peer": peer}


def require_package(code: str) -> None:
    """Fail unless ``code/trioai`` is a package: ``PYTHONPATH`` would skip a missing one silently."""
    if not os.path.isfile(os.path.join(code, "trioai", "__init__.py")):
        raise SystemExit(f"--gateway-code {code}: no {os.path.join(code, 'trioai', '__init__.py')}")


def servers(codes: Sequence[str] | None) -> dict[str, Callable[[str], Any]]:
    """The servers under test by column name: :data:`SERVERS`, or a trioai per code copy and the peer."""
    if not codes:
        return SERVERS
    from bench.queue import label

    for code in codes:
        require_package(code)
    names = [f"trioai {label(code)}" for code in codes]
    if len(set(names)) != len(names):
        raise SystemExit(f"--gateway-code: the directories' last parts must differ ({', '.join(names)})")
    return {**{name: partial(trioai_server, code=code, name=name) for name, code in zip(names, codes, strict=True)},
            "peer": peer}


@dataclass
class Figures:
    """Every figure of one server (or the direct reader), one list entry per round."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        values = self.values.get(name)
        return statistics.median(values) if values else float("nan")


async def throughput(kind: str, engine_url: str, connections: int, max_tokens: int, duration: float,
                     figures: Figures, table: dict[str, Callable[[str], Any]] = SERVERS) -> None:
    async with table[kind](engine_url) as server:
        await ws_load(server.url, 1, 4, 0.0)  # warm up
        result = await ws_load(server.url, connections, max_tokens, duration)
        if not result.all_exact:
            raise RuntimeError(f"{kind}: text not exact at {connections} connections")
        figures.add(f"tok/s @{connections}", result.tokens_per_s)


async def paced(kind: str, engine: Process, streams: int, max_tokens: int, figures: Figures,
                table: dict[str, Callable[[str], Any]] = SERVERS) -> None:
    async with table[kind](engine.address) as server:
        await ws_load(server.url, 1, 4, 0.0)
        metrics_before = await server.metrics()
        before = CpuUse.now(engine, server)
        result = await ws_load(server.url, streams, max_tokens, 0.0)
        after = CpuUse.now(engine, server)
        if not result.all_exact:
            raise RuntimeError(f"{kind}: paced text not exact")
        if metrics_before:  # trioai's own clock: the burst's request starts and the sampled relays
            metrics_after = await server.metrics()
            for label, metric in HISTOGRAMS.items():
                old, new = histogram_buckets(metrics_before, metric), histogram_buckets(metrics_after, metric)
                for pct in (50, 99):
                    figures.add(f"{label} p{pct} µs (gateway)", bucket_quantile(old, new, pct / 100) * 1e6)
        frames = sum(s.frames for s in result.streams)
        after.record_since(before, frames, figures)
        figures.add("TTFT p50 ms", percentile(result.ttfts(), 50) * 1000)
        figures.add("TTFT p99 ms", percentile(result.ttfts(), 99) * 1000)
        figures.add("ITL p50 ms", percentile(result.gaps(), 50) * 1000)
        figures.add("ITL p99 ms", percentile(result.gaps(), 99) * 1000)
        figures.add("token events / delta", frames / result.tokens)


async def direct_paced(engine: Process, streams: int, max_tokens: int, figures: Figures) -> None:
    before = CpuUse.now(engine)
    result = await sse_load(engine.address, streams, max_tokens, 0.0)
    CpuUse.now(engine).record_since(before, sum(s.frames for s in result.streams), figures)
    figures.add("TTFT p50 ms", percentile(result.ttfts(), 50) * 1000)
    figures.add("TTFT p99 ms", percentile(result.ttfts(), 99) * 1000)
    figures.add("ITL p50 ms", percentile(result.gaps(), 50) * 1000)
    figures.add("ITL p99 ms", percentile(result.gaps(), 99) * 1000)


async def cancels(kind: str, samples: int, figures: Figures, table: dict[str, Callable[[str], Any]] = SERVERS) -> None:
    """Cancel after 5 tokens; a cancel not acknowledged within 2 s counts as 2 s ("never")."""
    engine = FakeUpstream(lambda body: Script(tokens=("x ",) * 2000, delay=0.005))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.serve)
        async with table[kind](engine.base_url) as server:
            for index in range(samples):
                async with open_websocket_url(server.url) as ws:
                    before = len(engine.requests)
                    ack = closed = 2.0
                    with trio.move_on_after(2.0 + 5 * 0.005 * 10):
                        sent, sample = await ws_cancel(ws, f"k{index}", after_tokens=5, max_tokens=2000)
                        if sample.outcome == "cancelled" and sample.to_ack < 2.0:
                            ack = sample.to_ack
                    record = engine.requests[before]
                    with trio.move_on_after(2.0):
                        await record.closed.wait()
                    if record.disconnected_at is not None and not record.completed:
                        closed = min(2.0, record.disconnected_at - sent)
                figures.add("cancel→ack", ack)
                figures.add("cancel→engine closed", closed)
        nursery.cancel_scope.cancel()


async def hold_idle(url: str, count: int) -> list[trio.SocketStream]:
    """``count`` idle WebSocket connections (raw sockets: the bench process stays light)."""
    host, _, rest = url.removeprefix("ws://").partition(":")
    port = int(rest.partition("/")[0])
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream(host, port)
        conn = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(conn.send(Request(host=host, target="/ws/chat")))
        while not any(isinstance(e, AcceptConnection) for e in conn.events()):
            conn.receive_data(await stream.receive_some(65536))
        streams.append(stream)
    return streams


async def idle_memory(kind: str, engine_url: str, counts: Sequence[int], figures: Figures,
                      table: dict[str, Callable[[str], Any]] = SERVERS) -> None:
    async with table[kind](engine_url) as server:
        await ws_load(server.url, 1, 4, 0.0)
        for count in counts:
            await trio.sleep(0.5)
            before = server.rss_kib()
            streams = await hold_idle(server.url, count)
            try:
                await trio.sleep(1.0)
                after = server.rss_kib()
                answered = (await ws_load(server.url, 1, 8, 0.0)).all_exact
            finally:
                for stream in streams:
                    await stream.aclose()
            figures.add(f"KiB / idle conn @{count}", (after - before) / count)
            figures.add(f"answers with {count} idle", 1.0 if answered else 0.0)


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}×" if theirs and theirs == theirs and ours == ours else "–"


async def main_async(args: argparse.Namespace) -> None:
    table = servers(args.gateway_code)
    kinds = tuple(table)  # the trioai column(s), then the peer
    ours = kinds[:-1]
    figures = {kind: Figures() for kind in (*kinds, "direct")}
    connections = (1, 16, 64)
    async with fake_engine() as unpaced, fake_engine("--delay", "0.02") as slow:
        for round_number in range(args.rounds):
            order = kinds if round_number % 2 == 0 else kinds[::-1]  # alternate who goes first
            if args.quiet_below:
                from bench.surfaces import wait_quiet  # bench.surfaces imports this module

                quiet = await wait_quiet(args.quiet_below, args.quiet_for, args.quiet_cap)
                print(f"round {round_number + 1}: {quiet}", file=sys.stderr, flush=True)
            for count in () if args.paced_only else connections:
                direct = await sse_load(unpaced.address, count, args.tokens, args.duration)
                figures["direct"].add(f"tok/s @{count}", direct.tokens_per_s)
                for kind in order:
                    await throughput(kind, unpaced.address, count, args.tokens, args.duration, figures[kind], table)
            await direct_paced(slow, args.streams, args.paced_tokens, figures["direct"])
            for kind in order:
                await paced(kind, slow, args.streams, args.paced_tokens, figures[kind], table)
                if not args.paced_only:
                    await cancels(kind, args.cancels, figures[kind], table)
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        for kind in () if args.paced_only else kinds:
            await idle_memory(kind, unpaced.address, args.idle, figures[kind], table)

    # The ratio column(s): trioai / peer, or with several code copies each copy / the first.
    pairs = [(ours[0], "peer")] if len(ours) == 1 else [(kind, ours[0]) for kind in ours[1:]]
    heads = ["trioai / peer"] if len(ours) == 1 else [f"{a} / {b}".replace("trioai ", "") for a, b in pairs]

    def ratios(values: dict[str, float]) -> list[str]:
        return [ratio(values[a], values[b]) for a, b in pairs]

    names = [f"tok/s @{c}" for c in connections] + [
        "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "CPU ms / 1000 token events",
        "token events / delta", "machine CPU busy %", "load generator CPU ms / 1000 token events",
        "engine CPU ms / 1000 token events", "request start p50 µs (gateway)", "request start p99 µs (gateway)",
        "relay p50 µs (gateway)", "relay p99 µs (gateway)",
    ]
    header = ["figure (median of rounds)", "direct SSE", *kinds, *heads]
    lines = [row(*header), row(*["---"] * len(header))]
    for name in (n for n in names if any(n in f.values for f in figures.values())):  # measured this run
        values = {kind: figures[kind].median(name) for kind in kinds}
        lines.append(row(name, fmt(figures["direct"].median(name)), *(fmt(values[k]) for k in kinds),
                         *ratios(values)))
    for name in ("cancel→ack", "cancel→engine closed"):
        for pct in (50, 99) if name in figures[ours[0]].values else ():
            values = {kind: percentile(figures[kind].values.get(name, []), pct) * 1000 for kind in kinds}
            shown = ["never (2 s cap)" if values[k] >= 2000 else fmt(values[k]) for k in kinds]
            lines.append(row(f"{name} p{pct} ms", "", *shown, *ratios(values)))
    for count in () if args.paced_only else args.idle:
        name = f"KiB / idle conn @{count}"
        values = {kind: figures[kind].median(name) for kind in kinds}
        lines.append(row(name, "", *(fmt(values[k]) for k in kinds), *ratios(values)))
        alive = f"answers with {count} idle"
        lines.append(row(f"still answering with {count:,} idle", "",
                         *("yes" if figures[k].median(alive) == 1 else "NO" for k in kinds), *[""] * len(heads)))
    print(f"### trioai vs FastAPI + openai (uvicorn): {args.rounds} rounds, {args.tokens}-token generations, "
          f"{args.duration:g} s per throughput run; paced: {args.streams} streams × {args.paced_tokens} tokens "
          "at 20 ms\n")
    print("\n".join(lines))
    if len(ours) > 1 or args.paced_only:  # an A/B: how much each round moved
        for name in ("CPU ms / 1000 token events", "TTFT p50 ms"):
            print(f"\n{name}, per round: " + "; ".join(
                f"{kind} " + ", ".join(fmt(value) for value in figures[kind].values.get(name, [])) for kind in kinds))


def add_quiet_arguments(parser: argparse.ArgumentParser, *, below: float, window: float, cap: float,
                        at_cap: str = "go on") -> None:
    """``--quiet-below``, ``--quiet-for`` and ``--quiet-cap`` (see ``bench.surfaces.wait_quiet``), with
    this bench's defaults; ``at_cap``: what it does when the machine stays busy."""
    parser.add_argument("--quiet-below", type=float, default=below,
                        help="wait until every core is under this %% busy before each round (0: do not wait)")
    parser.add_argument("--quiet-for", type=float, default=window, help="seconds the cores must stay under it")
    parser.add_argument("--quiet-cap", type=float, default=cap, help=f"seconds to wait at most, then {at_cap}")


def main() -> None:
    """``python -m bench.compare``."""
    parser = argparse.ArgumentParser(description="trioai vs the FastAPI + OpenAI-client design")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--paced-tokens", type=int, default=50,
                        help="tokens per paced stream (more: per-request costs weigh less in CPU per token)")
    parser.add_argument("--cancels", type=int, default=10)
    parser.add_argument("--idle", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--paced-only", action="store_true",
                        help="only the paced load (e.g. to compare --streams 16, 32, 64): no throughput, cancel "
                             "or idle runs")
    add_quiet_arguments(parser, below=0.0, window=10.0, cap=120.0)
    parser.add_argument("--gateway-code", action="append", metavar="DIR",
                        help="run trioai from DIR/trioai instead of this tree (repeatable: an A/B, a column per "
                             "copy, alternating within each round)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs\n")
    for code in args.gateway_code or ():
        print(f"gateway code: {os.path.join(os.path.abspath(code), 'trioai')}")
    if args.gateway_code:
        print()
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
