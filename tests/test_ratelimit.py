"""Per-client rate limits: token buckets in process, shared by instances through a real Redis,
falling back to local counting while Redis is away; and the rate_limited error on a real socket."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioai.fake_upstream import FakeUpstream, Script
from trioai.ratelimit import MAX_TRACKED_CLIENTS, RateLimiter
from trioai.redisstate import RedisState
from trioai.state import LocalState

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, connect, recv, send
from .redisserver import RedisServer


async def test_unlimited_by_default() -> None:
    limiter = RateLimiter(None, None)
    assert not limiter.enabled
    assert all([await limiter.admit("c", 0.0) == 0.0 for _ in range(1000)])


async def test_requests_per_minute() -> None:
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=None)
    assert [await limiter.admit("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await limiter.admit("a", 0.0) == pytest.approx(20.0)  # one request every 20 s
    assert await limiter.admit("b", 0.0) == 0.0  # clients are independent
    assert await limiter.admit("a", 10.0) == pytest.approx(10.0)
    assert await limiter.admit("a", 20.0) == 0.0
    assert await limiter.admit("a", 20.0) == pytest.approx(20.0)


async def test_tokens_per_minute_debt_blocks_until_repaid() -> None:
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600)  # 10 tokens/s
    assert await limiter.admit("a", 0.0) == 0.0
    limiter.debit_tokens("a", 700, 1.0)  # overdrawn: 600 (full, capped) - 700 = -100
    assert await limiter.admit("a", 1.0) == pytest.approx(10.0, rel=1e-6)
    assert await limiter.admit("a", 6.0) == pytest.approx(5.0, rel=1e-6)
    assert await limiter.admit("a", 11.1) == 0.0


async def test_rested_clients_are_forgotten_when_too_many_are_tracked() -> None:
    limiter = RateLimiter(requests_per_minute=10, tokens_per_minute=None)
    for i in range(MAX_TRACKED_CLIENTS * 2):
        await limiter.admit(f"c{i}", 0.0)
    assert await limiter.admit("busy", 60.0) == 0.0
    assert len(limiter._local.buckets) <= 2  # everyone else had refilled


async def test_a_debit_through_a_state_counts_once_run_sends_it() -> None:
    state = LocalState()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600, state=state)
    other = RateLimiter(requests_per_minute=None, tokens_per_minute=600, state=state)  # another instance
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        limiter.debit_tokens("a", 700, trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert await other.admit("a", trio.current_time()) == pytest.approx(10.0, abs=0.1)
        nursery.cancel_scope.cancel()


async def test_a_queued_debit_goes_with_the_next_request_without_run() -> None:
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600, state=LocalState())
    limiter.debit_tokens("a", 700, trio.current_time())
    assert await limiter.admit("a", trio.current_time()) == pytest.approx(10.0, abs=0.1)


# -- shared through a real Redis -----------------------------------------------------------------


async def instance(nursery: trio.Nursery, url: str, rpm: int | None, tpm: int | None) -> RateLimiter:
    """The rate limiter of one trioai instance: its own Redis client and debit sender."""
    state = RedisState(url, timeout=2.0, retry_interval=0.2)
    await nursery.start(state.run)
    limiter = RateLimiter(rpm, tpm, state=state)
    await nursery.start(limiter.run)
    return limiter


async def test_two_instances_share_the_request_limit(nursery: trio.Nursery, redis_server: RedisServer) -> None:
    one = await instance(nursery, redis_server.url, 3, None)
    two = await instance(nursery, redis_server.url, 3, None)
    now = trio.current_time()
    assert [await one.admit("a", now), await two.admit("a", now), await one.admit("a", now)] == [0.0] * 3
    assert await two.admit("a", now) == pytest.approx(20.0, abs=0.5)  # alone, two would admit 3 more
    assert await one.admit("a", now) == pytest.approx(20.0, abs=0.5)
    assert await two.admit("b", now) == 0.0
    assert not one.degraded and not two.degraded


async def test_two_instances_share_the_token_debt(nursery: trio.Nursery, redis_server: RedisServer) -> None:
    one = await instance(nursery, redis_server.url, None, 600)
    two = await instance(nursery, redis_server.url, None, 600)
    assert await one.admit("a", trio.current_time()) == 0.0
    one.debit_tokens("a", 700, trio.current_time())  # its generation ended on instance one
    with trio.fail_after(5):
        while (wait := await two.admit("a", trio.current_time())) == 0.0:
            await trio.sleep(0.01)  # until one's sender has sent the debit
    assert wait == pytest.approx(10.0, abs=0.5)


async def test_limits_count_locally_while_redis_is_away(
    nursery: trio.Nursery, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    one = await instance(nursery, redis_server.url, 2, None)
    two = await instance(nursery, redis_server.url, 2, None)
    now = trio.current_time()
    assert await one.admit("a", now) == 0.0 and await two.admit("a", now) == 0.0
    assert await one.admit("a", now) > 0  # shared: the cluster's two requests are used
    await redis_server.stop()
    with trio.fail_after(5):
        # Each instance now counts alone, from a full bucket: never a hang, never an error.
        assert [await one.admit("a", now) for _ in range(2)] == [0.0, 0.0]
        assert await one.admit("a", now) > 0
    assert one.degraded and one.local_fallbacks == 3
    assert sum("counting in this process" in r.getMessage() for r in caplog.records) == 1  # one: two made no call
    await redis_server.start()  # empty again: the bucket starts full
    with trio.fail_after(10):
        while await two.admit("b", trio.current_time()) != 0.0 or two.degraded:
            await trio.sleep(0.05)
        while one.degraded:
            await one.admit("c", trio.current_time())
            await trio.sleep(0.05)
    assert await one.admit("z", now) == 0.0 and await two.admit("z", now) == 0.0
    assert await one.admit("z", now) > 0  # shared again


# -- on the socket -------------------------------------------------------------------------------


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
