"""Cancel → engine abort through a real vLLM: ``python -m bench.vllm_cancel --upstream URL``.

For each sample: a long generation through trioai (its own process), ``cancel`` after a few tokens,
then vLLM's ``/metrics`` polled until ``vllm:num_requests_running`` is back to 0. Prints the time
from the client's ``cancel`` frame to ``cancelled``, and to the engine no longer running it (the
second includes one metrics scrape, polled every ``--poll`` seconds).
"""

from __future__ import annotations

import argparse
import re

import httpx
import trio
from trio_websocket import open_websocket_url

from bench.loadgen import percentile, ws_cancel
from bench.run import gateway, ms, row

RUNNING = re.compile(r"^vllm:num_requests_running(?:\{[^}]*\})? (\S+)$", re.MULTILINE)


SCRAPES: list[float] = []


async def running(client: httpx.AsyncClient, metrics_url: str) -> float:
    """Requests vLLM is running now, summed over its label sets (each scrape's duration is kept)."""
    start = trio.current_time()
    response = await client.get(metrics_url)
    response.raise_for_status()
    SCRAPES.append(trio.current_time() - start)
    return sum(float(v) for v in RUNNING.findall(response.text))


async def wait_idle(client: httpx.AsyncClient, metrics_url: str, poll: float) -> None:
    """Scrape vLLM's metrics every ``poll`` seconds until it runs no request."""
    with trio.fail_after(30):
        while True:
            if not await running(client, metrics_url):
                return
            await trio.sleep(poll)


async def measure(upstream: str, samples: int, poll: float) -> list[str]:
    """Run the samples and return a Markdown table."""
    metrics_url = upstream.rstrip("/").removesuffix("/v1") + "/metrics"
    to_ack: list[float] = []
    to_abort: list[float] = []
    async with (
        httpx.AsyncClient(timeout=10.0) as client,
        gateway(upstream) as server,
        open_websocket_url(server.address) as ws,
    ):
        for index in range(samples):
            await wait_idle(client, metrics_url, poll)
            sent, sample = await ws_cancel(ws, f"v{index}", after_tokens=3, max_tokens=1500)
            if sample.outcome != "cancelled":
                raise RuntimeError(f"sample {index} ended {sample.outcome}")
            await wait_idle(client, metrics_url, poll)
            to_ack.append(sample.to_ack)
            to_abort.append(trio.current_time() - sent)
    return [
        f"### Cancel → vLLM abort: {samples} cancels after 3 tokens (metrics polled every {poll * 1000:g} ms)",
        "",
        row("measured from the client's cancel frame", "p50 ms", "p99 ms", "max ms"),
        row(*["---"] * 4),
        row("→ `cancelled` at the client", ms(percentile(to_ack, 50)), ms(percentile(to_ack, 99)), ms(max(to_ack))),
        row("→ `vllm:num_requests_running` back to 0", ms(percentile(to_abort, 50)), ms(percentile(to_abort, 99)),
            ms(max(to_abort))),
        row("one `/metrics` scrape (measurement overhead)", ms(percentile(SCRAPES, 50)), ms(percentile(SCRAPES, 99)),
            ms(max(SCRAPES))),
    ]


def main() -> None:
    """``python -m bench.vllm_cancel``."""
    parser = argparse.ArgumentParser(description="cancel → vLLM abort latency through trioai")
    parser.add_argument("--upstream", required=True, help="vLLM's base URL, e.g. http://127.0.0.1:8020/v1")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between metrics scrapes")
    args = parser.parse_args()
    print("\n".join(trio.run(measure, args.upstream, args.samples, args.poll)))


if __name__ == "__main__":
    main()
