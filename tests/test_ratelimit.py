"""Per-client rate limits: token buckets (sans I/O) and the rate_limited error on a real socket."""

from __future__ import annotations

import pytest

from trioai.fake_upstream import FakeUpstream, Script
from trioai.ratelimit import MAX_TRACKED_CLIENTS, RateLimiter

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, connect, recv, send


def test_unlimited_by_default() -> None:
    limiter = RateLimiter(None, None)
    assert not limiter.enabled
    assert all(limiter.admit("c", 0.0) == 0.0 for _ in range(1000))


def test_requests_per_minute() -> None:
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=None)
    assert [limiter.admit("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("a", 0.0) == pytest.approx(20.0)  # one request every 20 s
    assert limiter.admit("b", 0.0) == 0.0  # clients are independent
    assert limiter.admit("a", 10.0) == pytest.approx(10.0)
    assert limiter.admit("a", 20.0) == 0.0
    assert limiter.admit("a", 20.0) == pytest.approx(20.0)


def test_tokens_per_minute_debt_blocks_until_repaid() -> None:
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600)  # 10 tokens/s
    assert limiter.admit("a", 0.0) == 0.0
    limiter.debit_tokens("a", 700, 1.0)  # overdrawn: 600 (full, capped) - 700 = -100
    assert limiter.admit("a", 1.0) == pytest.approx(10.0, rel=1e-6)
    assert limiter.admit("a", 6.0) == pytest.approx(5.0, rel=1e-6)
    assert limiter.admit("a", 11.1) == 0.0


def test_rested_clients_are_forgotten_when_too_many_are_tracked() -> None:
    limiter = RateLimiter(requests_per_minute=10, tokens_per_minute=None)
    for i in range(MAX_TRACKED_CLIENTS):
        limiter._clients[f"c{i}"] = limiter._state(f"c{i}", 0.0)
    limiter.admit("busy", 0.0)
    assert len(limiter._clients) <= 2  # everyone else had full buckets


async def test_rate_limited_error_on_the_socket(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("t ",) * 5)
    server = await start_gateway(rate_limit_requests=2)
    async with connect(server) as ws:
        for rid in ("a", "b"):
            await send(ws, chat("x", id=rid))
            assert (await collect_until_terminal(ws, {rid}))[rid][-1]["type"] == "done"
        await send(ws, chat("x", id="c"))
        event = await recv(ws)
        assert event["type"] == "error" and event["id"] == "c" and event["code"] == "rate_limited"
        assert 25 < event["retry_after"] <= 31
    # A new connection from the same client is limited just the same.
    async with connect(server) as ws:
        await send(ws, chat("x", id="d"))
        assert (await recv(ws))["code"] == "rate_limited"
    assert len(upstream.requests) == 2
