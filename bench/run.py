"""Benchmarks for trioai: ``python -m bench.run`` prints throughput, latency and cancel numbers.

Three processes, as in production: the fake engine (``trioai.fake_upstream``), the gateway
(``trioai serve``) and this load generator. Each scenario is also run straight against the engine
with an httpx SSE reader, the ceiling the gateway is compared with.

    python -m bench.run              # the full run recorded in docs/benchmarks.md (~2 minutes)
    python -m bench.run --quick      # a short smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import open_websocket_url

from bench.loadgen import LoadResult, percentile, sse_load, ws_cancel, ws_load
from trioai.fake_upstream import FakeUpstream, Script


@dataclass
class Process:
    """A child process and the address it announced."""

    process: trio.Process
    address: str

    def rss_mb(self) -> tuple[float, float]:
        """Current and peak resident memory in MiB (Linux)."""
        values: dict[str, float] = {}
        try:
            with open(f"/proc/{self.process.pid}/status") as status:
                for line in status:
                    key, _, rest = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        values[key] = int(rest.split()[0]) / 1024
        except OSError:
            pass
        return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


@asynccontextmanager
async def spawn(args: Sequence[str], announce: str, *, stream: str = "stdout") -> AsyncIterator[Process]:
    """Start ``python args...``, wait for a line matching ``announce`` (one group: the address)."""
    pattern = re.compile(announce)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stdout = subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL
    stderr = subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [sys.executable, *args], stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env
        )
        output = process.stdout if stream == "stdout" else process.stderr
        assert output is not None
        try:
            address = await _read_until(output, pattern, args)
            nursery.start_soon(_drain, output)
            yield Process(process, address)
        finally:
            process.terminate()
            with trio.move_on_after(10) as scope:
                scope.shield = True
                await process.wait()
            if process.returncode is None:
                process.kill()
            nursery.cancel_scope.cancel()


async def _read_until(output: trio.abc.ReceiveStream, pattern: re.Pattern[str], args: Sequence[str]) -> str:
    buffer = b""
    with trio.fail_after(60):
        while True:
            data = await output.receive_some(65536)
            if not data:
                raise RuntimeError(f"{' '.join(args)} exited before it was ready:\n{buffer.decode(errors='replace')}")
            buffer += data
            match = pattern.search(buffer.decode(errors="replace"))
            if match:
                return match.group(1)


async def _drain(output: trio.abc.ReceiveStream) -> None:
    while await output.receive_some(65536):
        pass


def fake_engine(*options: str) -> Any:
    """The fake engine in its own process; yields its OpenAI base URL."""
    return spawn(["-m", "trioai.fake_upstream", "--numbered", *options], r"listening on (http://\S+)")


def gateway(upstream: str, *options: str) -> Any:
    """``trioai serve`` in its own process in front of ``upstream``; yields its WebSocket URL."""
    args = ["-m", "trioai", "serve", "--port", "0", "--upstream", upstream, "--max-concurrency", "256",
            "--max-streams-per-connection", "64", *options]
    return spawn(args, r"listening on (ws://\S+)", stream="stderr")


def ms(seconds: float) -> str:
    """Seconds as milliseconds for the tables."""
    return f"{seconds * 1000:.2f}"


def row(*cells: object) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


async def throughput(connections: Sequence[int], max_tokens: int, duration: float) -> list[str]:
    """Unpaced engine: how many tokens per second the gateway relays, against reading the engine directly."""
    lines = [
        f"### Throughput: unpaced engine, {max_tokens}-token generations back to back, {duration:g} s each",
        "",
        row("connections", "direct SSE tok/s", "via trioai tok/s", "ratio", "frames/s", "streams",
            "exact & in order", "gateway RSS MiB (peak)"),
        row(*["---"] * 8),
    ]
    async with fake_engine() as engine, gateway(engine.address) as server:
        await _warm_up(server.address)
        for count in connections:
            direct = await sse_load(engine.address, count, max_tokens, duration)
            relayed = await ws_load(server.address, count, max_tokens, duration)
            frames = sum(s.frames for s in relayed.streams) / relayed.elapsed
            rss, peak = server.rss_mb()
            lines.append(row(count, f"{direct.tokens_per_s:,.0f}", f"{relayed.tokens_per_s:,.0f}",
                             f"{relayed.tokens_per_s / direct.tokens_per_s:.2f}", f"{frames:,.0f}",
                             len(relayed.streams), _exact(relayed, direct), f"{rss:.0f} ({peak:.0f})"))
    return lines


async def latency(connections: Sequence[int], max_tokens: int, delay: float) -> list[str]:
    """Paced engine (as a real one): what the gateway adds to time-to-first-token and inter-token latency."""
    lines = [
        f"### Latency: engine paced at {delay * 1000:g} ms/token, concurrent streams of {max_tokens} tokens",
        "",
        row("streams", "path", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "tok/s",
            "exact & in order"),
        row(*["---"] * 8),
    ]
    async with fake_engine("--delay", str(delay)) as engine, gateway(engine.address) as server:
        await _warm_up(server.address)
        for count in connections:
            direct = await sse_load(engine.address, count, max_tokens, 0.0)
            relayed = await ws_load(server.address, count, max_tokens, 0.0)
            for name, result in (("direct SSE", direct), ("via trioai", relayed)):
                ttft, gaps = result.ttfts(), result.gaps()
                lines.append(row(count, name, ms(percentile(ttft, 50)), ms(percentile(ttft, 99)),
                                 ms(percentile(gaps, 50)), ms(percentile(gaps, 99)), f"{result.tokens_per_s:,.0f}",
                                 _exact(result)))
    return lines


async def cancel(samples: int) -> list[str]:
    """Cancel mid-stream: client ``cancel`` → ``cancelled``, and → the engine seeing its stream closed.

    The fake engine runs in this process so its disconnect timestamps share the client's clock.
    """
    engine = FakeUpstream(lambda body: Script(tokens=("x ",) * 100_000, delay=0.005))
    to_ack: list[float] = []
    to_engine: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.serve)
        async with gateway(engine.base_url) as server, open_websocket_url(server.address) as ws:
            for index in range(samples):
                sent, sample = await ws_cancel(ws, f"k{index}", after_tokens=5)
                if sample.outcome != "cancelled":
                    raise AssertionError(f"cancel {index} ended {sample.outcome}")
                to_ack.append(sample.to_ack)
                record = engine.requests[-1]
                with trio.fail_after(5):
                    await record.closed.wait()
                assert record.disconnected_at is not None, "the engine never saw the stream closed"
                to_engine.append(record.disconnected_at - sent)
        nursery.cancel_scope.cancel()
    return [
        f"### Cancel: {samples} cancels mid-stream on one socket (engine paced at 5 ms/token)",
        "",
        row("measured from the client's cancel frame", "p50 ms", "p99 ms", "max ms"),
        row(*["---"] * 4),
        row("→ `cancelled` at the client", ms(percentile(to_ack, 50)), ms(percentile(to_ack, 99)), ms(max(to_ack))),
        row("→ engine sees its HTTP stream closed", ms(percentile(to_engine, 50)), ms(percentile(to_engine, 99)),
            ms(max(to_engine))),
    ]


async def _warm_up(url: str) -> None:
    """One generation first, so model discovery and the first upstream connection are not measured."""
    result = await ws_load(url, 1, 4, 0.0)
    if not result.all_exact:
        raise RuntimeError(f"warm-up failed: {result.streams}")


def _exact(*results: LoadResult) -> str:
    return "yes" if all(r.all_exact for r in results) else "NO"


async def main_async(args: argparse.Namespace) -> None:
    """Run the scenarios and print Markdown tables."""
    duration = 1.0 if args.quick else args.duration
    connections = (1, 16) if args.quick else (1, 16, 64)
    sections = [
        await throughput(connections, args.tokens, duration),
        await latency(connections, 50 if args.quick else 200, 0.02),
        await cancel(10 if args.quick else 100),
    ]
    for section in sections:
        print("\n".join(section), end="\n\n", flush=True)


def main() -> None:
    """``python -m bench.run``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput measurement")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per generation in the throughput runs")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs\n")
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
