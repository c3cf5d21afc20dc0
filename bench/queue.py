"""What one request costs the gateway in CPU when many wait in its queue: ``python -m bench.queue``.

Starts the fake engine (``trioai.fake_upstream --numbered``, a few tokens per answer, no delay) and
``trioai serve --max-concurrency 4 --max-queue 100000`` as separate processes (``bench.run``'s
helpers). For each N of ``--queued`` it opens N / ``--streams-per-connection`` WebSocket
connections, then sends N requests at once, so all but 4 wait in line, and reads every stream to
its terminal event. Per N it prints, as the median over ``--rounds`` rounds: the wall time, how busy
the whole machine was meanwhile (other processes slow the wall time, not the CPU figure), the
trioai process's CPU (``/proc/PID/stat`` utime + stime, from the moment every connection is open to
the moment every request has ended, so connection opens and closes are not counted) per request,
the ``queued`` events each request received (mean and max), the deepest position any request was
told (how long the line really got), and every request that did not end ``done`` with the exact text.

``--gateway-code DIR`` (repeatable) runs the gateway from another copy of the ``trioai`` package
(``DIR/trioai``, labelled with DIR's last part) for an A/B on the same machine; the codes alternate
within each round, each round on a fresh gateway process.

    python -m bench.queue --rounds 3
    python -m bench.queue --gateway-code /tmp/trioai-old --gateway-code /tmp/trioai-new
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import trio
from trio_websocket import open_websocket_url

from bench.compare import busy_percent, machine_cpu, process_cpu_seconds
from bench.loadgen import PROMPT, expected_text, ws_load
from bench.run import Process, fake_engine, gateway, row

CURRENT = "current"  # label of the gateway run from this tree's trioai package


@dataclass
class Request:
    """One request as the client saw it."""

    queued: int = 0  # ``queued`` events received
    first_position: int = 0  # the position it was told on joining the line
    text: str = ""
    outcome: str = ""


@dataclass
class Burst:
    """One burst of N requests."""

    requests: dict[str, Request]
    wall: float
    cpu_seconds: float
    machine_busy: float  # % of the machine's CPU time that was busy meanwhile (all processes)
    max_tokens: int

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / len(self.requests)

    def failures(self) -> list[str]:
        """``id: outcome`` of every request that did not end ``done`` with the exact text."""
        expected = expected_text(self.max_tokens)
        return [f"{rid}: {r.outcome or 'no terminal event'}" + (" (text not exact)" if r.outcome == "done" else "")
                for rid, r in self.requests.items() if r.outcome != "done" or r.text != expected]


def raise_fd_limit(needed: int) -> None:
    """Raise the soft limit on open files towards ``needed`` (inherited by the processes started later)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def burst(server: Process, count: int, per_connection: int, max_tokens: int) -> Burst:
    """Open the connections, send ``count`` requests at once, read every one to its end."""
    requests: dict[str, Request] = {}
    connections = -(-count // per_connection)
    opened = trio.Event()
    ended = trio.Event()
    release = trio.Event()
    open_count = 0
    end_count = 0

    async def connection(index: int) -> None:
        nonlocal open_count, end_count
        ids = [f"q{index}-{k}" for k in range(min(per_connection, count - index * per_connection))]
        async with open_websocket_url(server.address) as ws:
            open_count += 1
            if open_count == connections:
                opened.set()
            await opened.wait()
            for rid in ids:
                requests[rid] = Request()
                await ws.send_message(json.dumps({"type": "message", "id": rid, "messages": PROMPT,
                                                  "max_tokens": max_tokens}))
            left = len(ids)
            while left:
                event = json.loads(await ws.get_message())
                request = requests[event["id"]]
                kind = event["type"]
                if kind == "queued":
                    request.queued += 1
                    request.first_position = request.first_position or event["position"]
                elif kind == "token":
                    request.text += event["content"]
                elif kind in ("done", "cancelled", "error"):
                    request.outcome = kind if kind != "error" else f"error:{event.get('code')}"
                    left -= 1
            end_count += len(ids)
            if end_count == count:
                ended.set()
            await release.wait()  # keep the connection open until the CPU reading

    pid = server.process.pid
    async with trio.open_nursery() as nursery:
        for index in range(connections):
            nursery.start_soon(connection, index)
        await opened.wait()
        cpu_before, machine_before, start = process_cpu_seconds(pid), machine_cpu(), trio.current_time()
        await ended.wait()
        cpu_after, machine_after, wall = process_cpu_seconds(pid), machine_cpu(), trio.current_time() - start
        release.set()
    return Burst(requests, wall, cpu_after - cpu_before, busy_percent(machine_before, machine_after), max_tokens)


def label(code: str) -> str:
    """A gateway code's name in the table: the directory's last part."""
    return code if code == CURRENT else os.path.basename(os.path.normpath(code))


@contextmanager
def code_path(code: str) -> Iterator[None]:
    """Make the next ``python -m trioai`` import ``code/trioai`` (nothing for :data:`CURRENT`).

    ``PYTHONSAFEPATH`` keeps ``python -m`` from putting the working directory (this tree) ahead of
    ``PYTHONPATH``; ``bench.run.spawn`` passes this process's environment on.
    """
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if code != CURRENT:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (code, saved["PYTHONPATH"]) if p)
        os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@asynccontextmanager
async def gateway_from(code: str, upstream: str, options: Sequence[str]) -> AsyncIterator[Process]:
    """``trioai serve`` from this tree or from ``code/trioai``; the environment is put back once it runs."""
    async with AsyncExitStack() as stack:
        with code_path(code):
            process: Process = await stack.enter_async_context(gateway(upstream, *options))
        yield process


@dataclass
class Figures:
    """Every round's burst per (code, N)."""

    bursts: dict[tuple[str, int], list[Burst]] = field(default_factory=dict)

    def add(self, code: str, count: int, result: Burst) -> None:
        self.bursts.setdefault((code, count), []).append(result)

    def line(self, code: str, count: int) -> str:
        results = self.bursts[(code, count)]
        queued = [r.queued for b in results for r in b.requests.values()]
        failures = [f for b in results for f in b.failures()]
        return row(label(code), f"{count:,}", f"{statistics.median(b.wall for b in results):.2f}",
                   f"{statistics.median(b.machine_busy for b in results):.0f}",
                   f"{statistics.median(b.cpu_ms_per_request for b in results):.2f}",
                   f"{statistics.median(statistics.fmean(r.queued for r in b.requests.values()) for b in results):.1f}",
                   max(queued), max(r.first_position for b in results for r in b.requests.values()),
                   len(failures))


async def main_async(args: argparse.Namespace) -> None:
    codes: list[str] = args.gateway_code or [CURRENT]
    options = ["--max-concurrency", str(args.max_concurrency), "--max-queue", "100000",
               "--max-streams-per-connection", str(args.streams_per_connection),
               "--max-connections", "20000", "--send-timeout", "120"]
    figures = Figures()
    async with fake_engine() as engine:
        for round_number in range(args.rounds):
            order = codes if round_number % 2 == 0 else codes[::-1]  # alternate who goes first
            for code in order:
                async with gateway_from(code, engine.address, options) as server:
                    if not (await ws_load(server.address, 1, args.tokens, 0.0)).all_exact:  # warm up
                        raise RuntimeError(f"{code}: the warm-up request failed")
                    for count in args.queued:
                        with trio.fail_after(args.timeout):
                            result = await burst(server, count, args.streams_per_connection, args.tokens)
                        figures.add(code, count, result)
                        for failure in result.failures()[:10]:
                            print(f"FAILED ({code}, N={count}) {failure}", file=sys.stderr)
                        print(f"round {round_number + 1}/{args.rounds} {label(code)} N={count}: {result.wall:.2f} s, "
                              f"{result.cpu_ms_per_request:.2f} ms CPU/request", file=sys.stderr, flush=True)
    print(f"### Queue cost: N requests sent at once, --max-concurrency {args.max_concurrency}, "
          f"{args.streams_per_connection} streams per connection, {args.tokens}-token answers (unpaced engine), "
          f"median of {args.rounds} round(s)\n")
    print(row("gateway code", "N queued at once", "wall s", "machine busy %", "trioai CPU ms / request",
              "queued events / request (mean)", "queued events / request (max)", "deepest position told",
              "not done"))
    print(row(*["---"] * 9))
    for count in args.queued:
        for code in codes:
            print(figures.line(code, count))


def main() -> None:
    """``python -m bench.queue``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--queued", type=lambda s: [int(n) for n in s.split(",")], default=[32, 200, 800, 2000],
                        help="comma-separated request counts sent at once (default: 32,200,800,2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median")
    parser.add_argument("--tokens", type=int, default=4, help="tokens per answer")
    parser.add_argument("--max-concurrency", type=int, default=4, help="the gateway's engine slots")
    parser.add_argument("--streams-per-connection", type=int, default=8,
                        help="requests per WebSocket connection (the gateway's --max-streams-per-connection too)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one burst may take")
    parser.add_argument("--gateway-code", action="append", metavar="DIR",
                        help="run the gateway from DIR/trioai instead of this tree (repeatable: an A/B)")
    args = parser.parse_args()
    raise_fd_limit(2 * max(args.queued) + 1024)
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs\n")
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
