"""The state interface: every primitive against both backends (in process, and a real
redis-server), Redis dying and coming back, and the pure parts (URL checks, buckets) alone."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing

from trioai.config import ConfigError, Settings
from trioai.redisstate import RedisState, _cluster_parts, _sentinel_parts, check_redis, check_redis_url, redact
from trioai.state import Buckets, LocalState, Renewal, State, StateUnavailable, Take, make_state

from .redisserver import RedisCluster, RedisSentinel, RedisServer, free_port

# Leases, slots, waiters and logs given this time to live expire after ADVANCE: real seconds on
# Redis (its own clock), a step of the test's clock in process.
TTL = 1.0
ADVANCE = 1.3


class FakeClock:
    """The in-process backend's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    state: State
    advance: Callable[[float], Awaitable[None]]


async def started_redis_state(nursery: trio.Nursery, url: str, *, timeout: float = 2.0,
                              retry_interval: float = 1.0) -> RedisState:
    """A :class:`RedisState` for ``url`` whose client runs in ``nursery``."""
    state = RedisState(url, timeout=timeout, retry_interval=retry_interval)
    await nursery.start(state.run)
    return state


@pytest.fixture(params=["local", "redis", "sentinel", "cluster"])
async def backend(request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each backend in turn, empty: in process, a redis-server, that server as the primary a
    Redis Sentinel names (``redis+sentinel://``), and a three-primary Redis Cluster
    (``redis+cluster://``)."""
    if request.param == "local":
        clock = FakeClock()

        async def step(seconds: float) -> None:
            clock.now += seconds

        yield Backend("local", LocalState(clock), step)
        return
    if request.param == "cluster":
        cluster = RedisCluster(nursery, tmp_path)
        await cluster.start()
        yield Backend("redis", await started_redis_state(nursery, cluster.url), trio.sleep)
        return
    server = RedisServer(nursery, tmp_path)
    await server.start()
    if request.param == "sentinel":
        sentinel = RedisSentinel(nursery, tmp_path, server)
        await sentinel.start()
        yield Backend("redis", await started_redis_state(nursery, sentinel.url), trio.sleep)
        return
    yield Backend("redis", await started_redis_state(nursery, server.url), trio.sleep)


# -- rate-limit buckets --------------------------------------------------------------------------


async def test_take_a_bucket_empty_then_wait_for_its_refill(backend: Backend) -> None:
    state = backend.state
    take = Take("a", per_minute=3, amount=1, need=1)  # one unit every 20 s
    assert [await state.take([take]) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert await state.take([take]) == pytest.approx(20.0, abs=0.5)
    assert await state.take([Take("b", per_minute=3, amount=1, need=1)]) == 0.0  # buckets are independent


async def test_take_is_all_or_nothing_but_debits_always_count(backend: Backend) -> None:
    state = backend.state
    empty, full = Take("empty", 60, amount=1, need=1), Take("full", 60, amount=1, need=1)
    assert await state.take([Take("empty", 60, debit=60)]) == 0.0  # a debit alone never waits
    assert await state.take([full, empty]) == pytest.approx(1.0, abs=0.2)
    # "full" lost nothing to the refused call: still 60 requests in it.
    assert [await state.take([full]) for _ in range(60)] == [0.0] * 60
    assert await state.take([full]) > 0
    # Debt: 600 per minute (10 per second), 700 debited: 100 in debt, 10 s until positive.
    assert await state.take([Take("debt", 600, need=1e-9, debit=700)]) == pytest.approx(10.0, abs=0.3)


def test_in_process_buckets_refill_with_the_time_passed_in() -> None:
    buckets = Buckets()
    take = Take("a", per_minute=3, amount=1, need=1)
    assert [buckets.take([take], 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take([take], 0.0) == pytest.approx(20.0)
    assert buckets.take([take], 10.0) == pytest.approx(10.0)
    assert buckets.take([take], 20.0) == 0.0
    assert buckets.take([take], 20.0) == pytest.approx(20.0)


def test_in_process_buckets_forget_full_ones_past_their_limit() -> None:
    buckets = Buckets(limit=100)
    for i in range(100):
        buckets.take([Take(f"idle{i}", 60, amount=0, need=1)], 0.0)
    buckets.take([Take("busy", 60, amount=1, need=1)], 0.0)
    buckets.take([Take("new", 60, amount=1, need=1)], 1.0)
    assert set(buckets.buckets) == {"busy", "new"} or len(buckets.buckets) <= 2


# -- leases --------------------------------------------------------------------------------------


async def test_a_lease_has_one_owner(backend: Backend) -> None:
    state = backend.state
    assert await state.lease_owner("gen1") is None
    assert await state.acquire_lease("gen1", "A", ttl=30)
    assert not await state.acquire_lease("gen1", "B", ttl=30)
    assert await state.acquire_lease("gen1", "A", ttl=30)  # the owner may take it again
    assert await state.lease_owner("gen1") == "A"
    assert [r.held for r in await state.renew_claims([("gen1", "f")], "A", lease_ttl=30, record_ttl=30)] == [True]
    assert [r.held for r in await state.renew_claims([("gen1", "f")], "B", lease_ttl=30, record_ttl=30)] == [False]
    assert await state.lease_owner("gen1") == "A"


async def test_the_lease_of_a_dead_owner_expires(backend: Backend) -> None:
    state = backend.state
    assert await state.acquire_lease("gen1", "dead", ttl=TTL)
    assert await state.acquire_lease("gen2", "alive", ttl=TTL)
    await backend.advance(ADVANCE / 2)
    await state.renew_claims([("gen2", "f")], "alive", lease_ttl=30, record_ttl=30)  # the living owner heartbeats
    await backend.advance(ADVANCE / 2)
    assert await state.lease_owner("gen1") is None
    assert await state.lease_owner("gen2") == "alive"
    assert await state.acquire_lease("gen1", "B", ttl=30)
    [late] = await state.renew_claims([("gen1", "f")], "dead", lease_ttl=30, record_ttl=30)
    assert not late.held  # too late: it is B's
    assert await state.lease_owner("gen1") == "B"


async def test_renewing_claims_keeps_leases_and_records_and_reads_flags_in_one_step(backend: Backend) -> None:
    state = backend.state
    assert await state.claim("gen:a", "A", "record a", lease_ttl=TTL, record_ttl=TTL)
    assert await state.claim("gen:b", "A", "record b", lease_ttl=TTL, record_ttl=30)
    assert await state.claim("gen:other", "B", "record of B", lease_ttl=30, record_ttl=30)
    await state.put_record("cancel:b", "1", 30)
    await backend.advance(ADVANCE / 2)
    claims = [("gen:a", "cancel:a"), ("gen:b", "cancel:b"), ("gen:other", "cancel:other"), ("gen:new", "cancel:new")]
    assert await state.renew_claims(claims, "A", lease_ttl=30, record_ttl=30) == [
        Renewal(held=True, record_gone=False, flagged=False),
        Renewal(held=True, record_gone=False, flagged=True),
        Renewal(held=False, record_gone=False, flagged=False),  # B's: nothing changed
        Renewal(held=True, record_gone=True, flagged=False),  # free: taken; it has no record
    ]
    await backend.advance(ADVANCE / 2)  # past the first TTL: renewed leases and records outlived it
    assert [await state.lease_owner(key) for key, _ in claims] == ["A", "A", "B", "A"]
    assert await state.get_record("gen:a") == "record a"
    assert await state.get_record("gen:other") == "record of B"
    assert await state.renew_claims([], "A", lease_ttl=30, record_ttl=30) == []


async def test_a_claim_takes_the_lease_and_stores_the_record_or_changes_nothing(backend: Backend) -> None:
    state = backend.state
    assert await state.claim("gen:c", "A", "record of A", lease_ttl=TTL, record_ttl=30)
    assert (await state.lease_owner("gen:c"), await state.get_record("gen:c")) == ("A", "record of A")
    assert not await state.claim("gen:c", "B", "record of B", lease_ttl=30, record_ttl=30)  # A holds it
    assert (await state.lease_owner("gen:c"), await state.get_record("gen:c")) == ("A", "record of A")
    assert await state.claim("gen:c", "A", "again", lease_ttl=30, record_ttl=30)  # its owner may again
    assert await state.get_record("gen:c") == "again"
    await backend.advance(ADVANCE)
    assert await state.lease_owner("gen:c") == "A"  # the lease was renewed to 30 s by the second claim
    assert await state.claim("gen:d", "B", "record of B", lease_ttl=TTL, record_ttl=TTL)
    await backend.advance(ADVANCE)
    assert (await state.lease_owner("gen:d"), await state.get_record("gen:d")) == (None, None)  # both expired
    assert await state.claim("gen:d", "C", "record of C", lease_ttl=30, record_ttl=30)  # free again


async def test_records_hold_a_value_until_they_expire(backend: Backend) -> None:
    state = backend.state
    assert await state.get_record("gen:1") is None
    await state.put_record("gen:1", '{"model": "m", "text": "ü"}', 30)
    await state.put_record("cancel:1", "1", TTL)
    assert await state.get_record("gen:1") == '{"model": "m", "text": "ü"}'
    await state.put_record("gen:1", "newer", 30)
    assert await state.get_record("gen:1") == "newer"
    await backend.advance(ADVANCE)
    assert await state.get_record("cancel:1") is None
    assert await state.get_record("gen:1") == "newer"


# -- event logs ----------------------------------------------------------------------------------


async def test_append_and_read_after_a_seq(backend: Backend) -> None:
    state = backend.state
    assert await state.read("g", 0) == []
    assert await state.append("g", [(1, "one"), (2, "two ü")], ttl=30, maxlen=1000)
    assert await state.append("g", [(3, "three")], ttl=30, maxlen=1000)
    assert await state.read("g", 0) == [(1, "one"), (2, "two ü"), (3, "three")]
    assert await state.read("g", 1) == [(2, "two ü"), (3, "three")]
    assert await state.read("g", 3) == []
    assert await state.read("g", 0, limit=2) == [(1, "one"), (2, "two ü")]
    # Another writer's stale batch changes nothing.
    assert not await state.append("g", [(3, "other"), (4, "four")], ttl=30, maxlen=1000)
    assert await state.read("g", 2) == [(3, "three")]


async def test_append_to_several_logs_in_one_call(backend: Backend) -> None:
    state = backend.state
    assert await state.append("b", [(1, "b1")], ttl=30, maxlen=100)
    answers = await state.append_many([("a", [(1, "a1"), (2, "a2")]), ("b", [(1, "stale")]), ("c", [(1, "c1")])],
                                      ttl=30, maxlen=100)
    assert answers == [True, False, True]  # each log on its own: a stale one fails alone
    assert await state.read("a", 0) == [(1, "a1"), (2, "a2")]
    assert await state.read("b", 0) == [(1, "b1")]
    assert await state.read("c", 0) == [(1, "c1")]
    assert await state.append_many([], ttl=30, maxlen=100) == []


async def test_one_multi_log_append_judges_each_log_in_order(backend: Backend) -> None:
    state = backend.state
    first = [("a", [(1, "a1")]), ("b", [(1, "b1"), (2, "b2")])]
    assert await state.append_many(first, ttl=30, maxlen=100) == [True, True]
    answers = await state.append_many([("a", [(2, "a2")]), ("b", [(2, "again")]), ("a", [(3, "a3")]),
                                       ("a", [(3, "twice")]), ("b", [])], ttl=30, maxlen=100)
    assert answers == [True, False, True, False, True]  # a log named twice: the second part after the first
    assert await state.read("a", 0) == [(1, "a1"), (2, "a2"), (3, "a3")]
    assert await state.read("b", 0) == [(1, "b1"), (2, "b2")]
    # Seqs that do not increase are a caller's bug: refused before anything is written, to any log.
    with pytest.raises(ValueError, match="increasing seq"):
        await state.append_many([("c", [(1, "c1")]), ("a", [(5, "x"), (4, "y")])], ttl=30, maxlen=100)
    assert await state.read("c", 0) == [] and await state.read("a", 3) == []


async def test_an_append_without_entries_keeps_a_log_alive(backend: Backend) -> None:
    state = backend.state
    assert await state.append_many([("g", [(1, "a")]), ("h", [(1, "b")])], ttl=TTL, maxlen=100) == [True] * 2
    await backend.advance(ADVANCE / 2)
    assert await state.append_many([("g", [])], ttl=TTL, maxlen=100) == [True]  # its expiry renewed
    await backend.advance(ADVANCE / 2 + 0.1)
    assert await state.read("g", 0) == [(1, "a")]
    assert await state.read("h", 0) == []


async def test_redis_appends_of_a_flush_are_one_script_call(nursery: trio.Nursery, redis_server: RedisServer) -> None:
    state = await started_redis_state(nursery, redis_server.url)
    assert await state.append("warm", [(1, "w")], ttl=30, maxlen=10)
    before = await script_calls(redis_server)
    twenty = [(f"g{i}", [(1, "x"), (2, "y")]) for i in range(20)]
    assert await state.append_many(twenty, ttl=30, maxlen=10) == [True] * 20
    assert await script_calls(redis_server) - before == 1
    await redis_cli(redis_server, "SCRIPT", "FLUSH")  # Redis forgot the script (as after a restart): sent again
    assert await state.append_many([("g0", [(3, "z")]), ("g1", [(2, "stale")])], ttl=30, maxlen=10) == [True, False]
    assert await state.read("g0", 2) == [(3, "z")] and state.available


async def test_the_script_connection_is_replaced_when_redis_drops_it(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    state = await started_redis_state(nursery, redis_server.url, retry_interval=0.1)
    assert await state.append("g", [(1, "a")], ttl=30, maxlen=10)
    await redis_cli(redis_server, "CLIENT", "KILL", "TYPE", "normal")  # every connection, the held one too
    with trio.fail_after(10):
        while True:
            try:
                assert await state.append("g", [(2, "b")], ttl=30, maxlen=10)
                break
            except StateUnavailable:  # the call that found it gone
                await trio.sleep(0.05)
    assert await state.read("g", 0) == [(1, "a"), (2, "b")]


async def redis_cli(server: RedisServer, *words: str) -> str:
    """One command through ``redis-cli``; its reply as text."""
    cli = Path(server.binary).with_name("redis-cli")
    done = await trio.run_process([str(cli), "-p", str(server.port), *words], capture_stdout=True)
    return done.stdout.decode()


async def script_calls(server: RedisServer) -> int:
    """``EVALSHA`` and ``EVAL`` calls so far (``INFO commandstats``)."""
    text = await redis_cli(server, "INFO", "commandstats")
    return sum(int(line.split("calls=")[1].split(",")[0]) for line in text.splitlines()
               if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")))


async def test_a_log_is_bounded_and_expires(backend: Backend) -> None:
    state = backend.state
    for start in range(1, 1001, 100):
        batch = [(seq, f"f{seq}") for seq in range(start, start + 100)]
        assert await state.append("g", batch, ttl=TTL, maxlen=10)
    kept = await state.read("g", 0, limit=2000)
    assert 10 <= len(kept) < 1000  # about the last 10 (Redis trims whole nodes: "MAXLEN ~")
    assert kept[-1] == (1000, "f1000") and [seq for seq, _ in kept] == list(range(1001 - len(kept), 1001))
    await backend.advance(ADVANCE)
    assert await state.read("g", 0) == []


async def test_follow_waits_for_the_next_append(backend: Backend) -> None:
    state = backend.state
    assert await state.append("g", [(1, "a"), (2, "b")], ttl=30, maxlen=100)
    assert await state.follow("g", 1, wait=5) == [(2, "b")]  # already there: at once
    assert await state.follow("g", 2, wait=0.1) == []  # nothing came
    got: list[list[tuple[int, str]]] = []

    async def follower() -> None:
        got.append(await state.follow("g", 2, wait=30))
        got.append(await state.follow("new", 0, wait=30))  # a log not written yet

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            assert await state.append("g", [(3, "c")], ttl=30, maxlen=100)
            while len(got) < 1:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert await state.append("new", [(1, "x")], ttl=30, maxlen=100)
    assert got == [[(3, "c")], [(1, "x")]]


# -- admission: slots and the queue --------------------------------------------------------------


async def test_slots_of_a_pool(backend: Backend) -> None:
    state = backend.state
    assert await state.acquire_slot("e1", 2, "a", ttl=30)
    assert await state.acquire_slot("e1", 2, "b", ttl=30)
    assert not await state.acquire_slot("e1", 2, "c", ttl=30)
    assert await state.acquire_slot("e2", 2, "c", ttl=30)  # another pool
    assert await state.slots_held("e1") == 2
    assert await state.renew_slots([("e1", "a"), ("e1", "c"), ("e2", "c"), ("e3", "a")], ttl=30) == [
        True, False, True, False]
    assert await state.renew_slots([], ttl=30) == []
    await state.release_slot("e1", "a")
    await state.release_slot("e1", "nobody")
    assert await state.slots_held("e1") == 1
    assert await state.acquire_slot("e1", 2, "c", ttl=30)


async def test_the_slot_of_a_dead_holder_comes_back_within_its_lease(backend: Backend) -> None:
    state = backend.state
    assert await state.acquire_slot("e1", 2, "dead", ttl=TTL)
    assert await state.acquire_slot("e1", 2, "alive", ttl=TTL)
    assert not await state.acquire_slot("e1", 2, "new", ttl=30)
    await backend.advance(ADVANCE / 2)
    assert await state.renew_slots([("e1", "alive")], ttl=30) == [True]
    await backend.advance(ADVANCE / 2)
    assert await state.slots_held("e1") == 1
    assert await state.renew_slots([("e1", "dead")], ttl=30) == [False]
    assert await state.acquire_slot("e1", 2, "new", ttl=30)


async def test_queue_positions_move_as_waiters_leave(backend: Backend) -> None:
    state = backend.state
    assert [await state.join_queue("e1", w, ttl=30) for w in ("w1", "w2", "w3")] == [1, 2, 3]
    assert await state.join_queue("e1", "w2", ttl=30) == 2  # joining twice keeps one's place
    assert await state.queue_position("e1", "w3", ttl=30) == 3
    await state.leave_queue("e1", "w2")
    assert await state.queue_position("e1", "w3", ttl=30) == 2
    assert await state.queue_position("e1", "w2", ttl=30) is None
    assert await state.queue_length("e1") == 2


async def test_a_queued_slot_goes_to_the_first_waiters(backend: Backend) -> None:
    state = backend.state
    assert await state.acquire_slot("e1", 2, "running", ttl=30)
    for waiter in ("w1", "w2", "w3"):
        await state.join_queue("e1", waiter, ttl=30)
    assert not await state.acquire_slot("e1", 2, "w2", ttl=30, queue="e1")  # one free slot: w1's
    assert not await state.acquire_slot("e1", 2, "newcomer", ttl=30, queue="e1")
    assert await state.acquire_slot("e1", 2, "w1", ttl=30, queue="e1")
    assert await state.queue_position("e1", "w1", ttl=30) is None  # it left the line
    assert await state.queue_position("e1", "w2", ttl=30) == 1
    assert not await state.acquire_slot("e1", 2, "w2", ttl=30, queue="e1")  # full
    await state.release_slot("e1", "running")
    assert await state.acquire_slot("e1", 2, "w2", ttl=30, queue="e1")
    assert await state.queue_length("e1") == 1


async def test_waiters_of_a_dead_instance_leave_the_queue(backend: Backend) -> None:
    state = backend.state
    await state.join_queue("e1", "dead", ttl=TTL)
    await state.join_queue("e1", "alive", ttl=TTL)
    assert await state.queue_position("e1", "alive", ttl=TTL) == 2
    await backend.advance(ADVANCE / 2)
    assert await state.queue_position("e1", "alive", ttl=30) == 2  # its heartbeat
    await backend.advance(ADVANCE / 2)
    assert await state.queue_position("e1", "alive", ttl=30) == 1
    assert await state.queue_length("e1") == 1


# -- Redis unavailable ---------------------------------------------------------------------------


async def test_redis_restart_degrades_then_recovers(
    nursery: trio.Nursery, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    state = await started_redis_state(nursery, redis_server.url, timeout=2.0, retry_interval=0.2)
    take = Take("a", 60, amount=1, need=1)
    assert await state.take([take]) == 0.0 and state.available
    await redis_server.stop()
    with trio.fail_after(5):  # never hangs
        for _ in range(20):
            with pytest.raises(StateUnavailable):
                await state.take([take])
    assert not state.available and state.failures == 20
    warnings = [r for r in caplog.records if r.name == "trioai.redisstate" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()  # once, not per call
    await redis_server.start()  # a new, empty Redis on the same port: the script must load again
    with trio.fail_after(10):
        while True:
            try:
                assert await state.take([take]) == 0.0
                break
            except StateUnavailable:
                await trio.sleep(0.05)
    assert state.available
    assert await state.append("g", [(1, "a")], ttl=30, maxlen=10) and await state.read("g", 0) == [(1, "a")]
    messages = [r.getMessage() for r in caplog.records if r.name == "trioai.redisstate"]
    assert sum("is back: shared state again" in m for m in messages) == 1
    assert sum("unavailable (" in m for m in messages) == 1


async def test_a_redis_that_stops_answering_times_out(nursery: trio.Nursery, redis_server: RedisServer) -> None:
    state = await started_redis_state(nursery, redis_server.url, timeout=0.3, retry_interval=2.0)
    assert await state.lease_owner("x") is None
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # the host hangs: connected, never answers
    try:
        with trio.fail_after(5):
            with pytest.raises(StateUnavailable):
                await state.lease_owner("x")
        # Within the retry interval every call fails at once: no await, not even a checkpoint.
        reached = False
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(StateUnavailable):
                await state.follow("g", 0, wait=0.1)
            reached = True
        assert reached
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    with trio.fail_after(10):
        while True:
            try:
                assert await state.acquire_lease("x", "me", ttl=30)
                break
            except StateUnavailable:
                await trio.sleep(0.05)
    assert await state.lease_owner("x") == "me"  # answers are not shifted by the abandoned call


async def test_a_blocking_read_is_not_the_probe_that_finds_redis_back(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    state = await started_redis_state(nursery, redis_server.url, timeout=2.0, retry_interval=0.2)
    await redis_server.stop()
    with pytest.raises(StateUnavailable):
        await state.lease_owner("x")
    await redis_server.start()
    await trio.sleep(0.3)  # past the retry interval
    got: list[list[tuple[int, str]]] = []

    async def follower() -> None:
        got.append(await state.follow("g", 0, wait=30))

    with trio.fail_after(10):
        async with trio.open_nursery() as followers:
            followers.start_soon(follower)
            while not state.available:  # its PING found Redis back; then it blocks in XREAD
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert await state.lease_owner("x") is None  # not refused while the follower waits
            assert await state.append("g", [(1, "a")], ttl=30, maxlen=10)
    assert got == [[(1, "a")]]


async def test_calls_before_the_client_runs_are_unavailable() -> None:
    state = RedisState(f"redis://127.0.0.1:{free_port()}")
    with pytest.raises(StateUnavailable):
        await state.lease_owner("x")


# -- construction and checks ---------------------------------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:6379", "must start with redis://"),
    ("redis://", "needs a host"),
    ("redis://127.0.0.1:6379/abc", "database number"),
    ("redis://127.0.0.1:port", "Port could not be cast"),
    ("unix://", "socket's path"),
    ("redis+sentinel://127.0.0.1:26379", "service name"),
    ("redis+sentinel://127.0.0.1/trioai", "host:port"),
    ("redis+sentinel://127.0.0.1:26379,:26380/trioai", "host:port"),
    ("redis+sentinel://127.0.0.1:26379/trioai/x", "database must be a number"),
    ("redis+cluster://127.0.0.1", "each Cluster node needs host:port"),
    ("redis+cluster://127.0.0.1:7000/0", "only database 0"),
])
def test_a_malformed_url_is_a_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_redis_url(url)


def test_well_formed_urls_pass() -> None:
    for url in ("redis://127.0.0.1:6379", "rediss://user:pw@redis.example:6380/2", "unix:///run/redis.sock",
                "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,[::1]:26379/trioai/2",
                "redis+sentinel://:pw@sentinel.example:26379/trioai", "redis+cluster://10.0.0.1:7000,[::1]:7001",
                "redis+cluster://:pw@cluster.example:7000/"):
        check_redis_url(url)


def test_a_sentinel_url_names_its_sentinels_service_database_and_password() -> None:
    assert _sentinel_parts("redis+sentinel://:p%40ss@10.0.0.1:26379,[::1]:26380/svc/3") == (
        [("10.0.0.1", 26379), ("::1", 26380)], "svc", 3, "p@ss")
    assert _sentinel_parts("redis+sentinel://h:1/svc") == ([("h", 1)], "svc", 0, None)
    assert "p%40ss" not in redact("redis+sentinel://:p%40ss@h:1/svc")


def test_a_cluster_url_names_its_startup_nodes_and_password() -> None:
    assert _cluster_parts("redis+cluster://:p%40ss@10.0.0.1:7000,[::1]:7001") == (
        [("10.0.0.1", 7000), ("::1", 7001)], "p@ss")
    assert _cluster_parts("redis+cluster://h:1") == ([("h", 1)], None)
    assert "p%40ss" not in redact("redis+cluster://:p%40ss@h:1")


async def test_check_redis_of_a_cluster(nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer) -> None:
    """A Cluster passes; a plain server named as a Cluster is a clear start error."""
    cluster = RedisCluster(nursery, tmp_path)
    await cluster.start()
    await check_redis(cluster.url)
    with pytest.raises(ConfigError, match="cannot use this Redis"):
        await check_redis(f"redis+cluster://127.0.0.1:{redis_server.port}", 2.0)


T = TypeVar("T")


async def once_available(call: Callable[[], Awaitable[T]], seconds: float = 30.0) -> T:
    """``call()``'s answer once the state is available again (it raises StateUnavailable until then)."""
    with trio.fail_after(seconds):
        while True:
            try:
                return await call()
            except StateUnavailable:
                await trio.sleep(0.2)


async def test_on_a_cluster_every_key_is_on_one_primary(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Logs of several generations, leases, records, buckets, slots and a queue: all in the
    prefix's one hash slot (scripts over several of them run at all only so), so one node holds them."""
    cluster = RedisCluster(nursery, tmp_path)
    await cluster.start()
    state = await started_redis_state(nursery, cluster.url)
    assert await state.append_many([(f"log-{n}", [(1, f"frame {n}")]) for n in range(20)], ttl=60, maxlen=100) \
        == [True] * 20
    assert await state.acquire_lease("gen:a", "me", 60)
    await state.put_record("gen:a", "{}", 60)
    assert await state.take([Take("client-a", 60, amount=1, need=1), Take("tokens-a", 60, amount=1, need=1)]) == 0.0
    assert await state.acquire_slot("engine", 1, "holder-1", 60, queue="engine")
    assert await state.join_queue("engine", "waiter-1", 60) == 1
    await state.leave_queue("engine", "waiter-1")
    assert await state.queue_length("engine") == 0
    counts = await cluster.key_counts()
    assert sorted(counts)[:2] == [0, 0] and max(counts) >= 20 + 5, counts


async def test_on_a_cluster_a_moved_slot_is_followed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The keys' slot given to another primary: the next call is told MOVED (unavailable, as
    any failure), and once the retry interval passes the state works on the new owner."""
    cluster = RedisCluster(nursery, tmp_path)
    await cluster.start()
    state = await started_redis_state(nursery, cluster.url, retry_interval=0.2)
    assert await state.get_record("gen:a") is None  # a call that stores nothing: the slot stays empty
    owner = await cluster.slot_owner("{trioai}")
    target = next(port for port in cluster.ports if port != owner)
    await cluster.give_slot("{trioai}", target)
    with pytest.raises(StateUnavailable):
        await state.acquire_lease("gen:b", "me", 60)
    assert await once_available(lambda: state.acquire_lease("gen:b", "me", 60), seconds=10)
    counts = dict(zip(cluster.ports, await cluster.key_counts(), strict=True))
    assert counts[target] == 1 and counts[owner] == 0


async def test_on_a_cluster_a_failover_is_followed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The primary holding the keys' slot killed: calls fail (unavailable) until the Cluster
    promotes its replica, then go to the new primary, which has what was replicated."""
    cluster = RedisCluster(nursery, tmp_path, replicas=1, node_timeout_ms=500)
    await cluster.start()
    state = await started_redis_state(nursery, cluster.url, timeout=0.5, retry_interval=0.2)
    await state.put_record("gen:a", "kept", 60)
    owner = await cluster.slot_owner("{trioai}")
    await trio.sleep(0.5)  # the replica has it (replication is asynchronous)
    cluster.kill(owner)
    failures = state.failures
    assert await once_available(lambda: state.get_record("gen:a")) == "kept"
    assert state.failures > failures
    survivor = next(port for port in cluster.ports if port != owner)
    assert await cluster.slot_owner("{trioai}", seen_by=survivor) != owner


async def test_check_redis_through_a_sentinel(nursery: trio.Nursery, tmp_path: Path,
                                              redis_server: RedisServer) -> None:
    sentinel = RedisSentinel(nursery, tmp_path, redis_server)
    await sentinel.start()
    await check_redis(sentinel.url)
    with pytest.raises(ConfigError, match="cannot use this Redis"):
        await check_redis(f"redis+sentinel://127.0.0.1:{sentinel.port}/no-such-service", 2.0)


async def test_a_sentinel_failover_is_followed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The primary killed: calls fail (unavailable, at once after the first) while Sentinel promotes
    the replica, then go to the new primary, which has what the old one had replicated."""
    primary = RedisServer(nursery, tmp_path / "primary")
    replica = RedisServer(nursery, tmp_path / "replica", replica_of=primary)
    for server in (primary, replica):
        server.directory.mkdir()
        await server.start()
    sentinel = RedisSentinel(nursery, tmp_path, primary, down_after_ms=300)
    await sentinel.start()
    state = await started_redis_state(nursery, sentinel.url, timeout=0.5, retry_interval=0.2)
    await state.put_record("gen:a", "kept", 60)
    with trio.fail_after(20):  # the replica has it, and Sentinel knows the replica (it asks every 10 s)
        while "master_link_status:up" not in await replica.cli("info", "replication") or str(replica.port) not in (
                await sentinel.cli("sentinel", "replicas", "trioai")):
            await trio.sleep(0.1)
    await primary.stop()
    failures = state.failures
    assert await once_available(lambda: state.get_record("gen:a")) == "kept"
    assert state.failures > failures  # it was down for a while, and came back on its own
    assert "role:master" in await replica.cli("info", "replication")
    await state.put_record("gen:b", "new", 60)
    assert await replica.cli("get", "{trioai}:record:gen:b") == "new"


def test_passwords_stay_out_of_messages() -> None:
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    with pytest.raises(ConfigError) as info:
        check_redis_url("http://user:secret@host")
    assert "secret" not in str(info.value)


async def test_check_redis_at_start(redis_server: RedisServer) -> None:
    await check_redis(redis_server.url)
    with pytest.raises(ConfigError, match=r"cannot use this Redis: .*(refused|establish)"):
        await check_redis(f"redis://:secret@127.0.0.1:{free_port()}/0", 2.0)
    with pytest.raises(ConfigError, match="must start with"):
        await check_redis("127.0.0.1:6379")


async def test_a_unix_socket_url(nursery: trio.Nursery, redis_server: RedisServer) -> None:
    await check_redis(redis_server.unix_url)
    state = await started_redis_state(nursery, redis_server.unix_url)
    assert await state.acquire_lease("x", "me", ttl=30)
    other = await started_redis_state(nursery, redis_server.url)  # the same Redis over TCP
    assert await other.lease_owner("x") == "me"


def test_make_state_picks_the_backend() -> None:
    assert isinstance(make_state(Settings()), LocalState)
    assert isinstance(make_state(Settings(redis="redis://127.0.0.1:1/0")), RedisState)


def test_the_server_runs_without_the_redis_client_when_redis_is_unset() -> None:
    code = (
        "import sys; sys.modules['coredis'] = None\n"  # import coredis now raises ImportError
        "import trioai.server, trioai.cli, trioai.gateway, trioai.ratelimit\n"
        "from trioai.config import Settings\n"
        "from trioai.state import LocalState, make_state\n"
        "assert isinstance(make_state(Settings()), LocalState)\n"
        "try:\n"
        "    make_state(Settings(redis='redis://127.0.0.1:1'))\n"
        "except ImportError:\n"
        "    print('needs coredis')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "needs coredis"
