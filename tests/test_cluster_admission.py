"""Admission across instances (issue 18): engine capacity and the model's queue held in a real redis-server.

Two (or three) trioai instances share one Redis and one fake engine that records its peak of
requests streaming at once. The instances run in this process (tests/test_shared.py's ``Instance``),
except the one a test kills: a child process, so that nothing of it runs after ``kill -9``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from trioai.clusteradmission import POLL_MAX, Cluster, PositionTeller, passed_reported, poll_interval
from trioai.config import Settings
from trioai.enginespec import EngineSpec
from trioai.fake_upstream import FakeUpstream, Script, numbered_script
from trioai.redisstate import RedisState
from trioai.server import RunningServer, serve
from trioai.state import LocalState, StateUnavailable

from .helpers import chat, send
from .redisserver import RedisServer
from .scaleout import trioai_processes
from .test_shared import start_instance

LEASE = 0.6
TERMINAL = ("done", "error", "cancelled")


# --- pure parts -------------------------------------------------------------------------------


def test_the_head_of_the_line_asks_often_and_the_back_seldom() -> None:
    assert poll_interval(1, 5.0) == pytest.approx(0.05)
    assert poll_interval(4, 5.0) == pytest.approx(0.2)
    assert poll_interval(1000, 5.0) == POLL_MAX
    assert poll_interval(1000, 0.6) == pytest.approx(0.15)  # a quarter lease: its place is renewed in time
    assert poll_interval(0, 5.0) == pytest.approx(0.05)


def test_positions_told_go_down_on_the_reporting_scale() -> None:
    told: list[int] = []
    teller = PositionTeller(told.append)
    for position in (37, 37, 36, 31, 30, 29, 40, 26, 24, 13, 11, 9, 9, 12, 3, 1):
        teller(position)
    # first 37; 30 reached; 24 passed 25; 13 passed 15; 11 passed 12; then every value below 10
    assert told == [37, 30, 24, 13, 11, 9, 3, 1]
    assert passed_reported(9, 10) and passed_reported(11, 13) and not passed_reported(11, 12)
    assert not passed_reported(13, 14) and passed_reported(13, 16)


async def test_a_cancelled_waiter_leaves_the_line_and_the_next_one_is_woken(
    autojump_clock: trio.testing.MockClock
) -> None:
    state = LocalState()
    cluster = Cluster(state, lease=5.0)
    waiting: list[int] = []
    running = await cluster.acquire("p", 1, print, waiting.append)
    assert running is not None and waiting == []  # free: taken at once, no position
    told: dict[str, list[int]] = {"a": [], "b": []}
    got: list[str] = []

    async def wait(name: str, scope: trio.CancelScope) -> None:
        with scope:
            if await cluster.acquire("p", 1, told[name].append, waiting.append):
                got.append(name)

    scopes = {"a": trio.CancelScope(), "b": trio.CancelScope()}
    async with trio.open_nursery() as nursery:
        for name in "ab":
            nursery.start_soon(wait, name, scopes[name])
            await trio.testing.wait_all_tasks_blocked()
        assert told == {"a": [1], "b": [2]} and sum(waiting) == 2
        scopes["a"].cancel()
        await trio.sleep(1.0)
        assert told["b"] == [2, 1] and await state.queue_length("p") == 1
        started = trio.current_time()
        await cluster.release("p", running)
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["b"] and trio.current_time() == started  # woken by the release, not a poll
    assert sum(waiting) == 0 and await state.queue_length("p") == 0 and list(cluster.held.values()) == ["p"]


async def test_a_slot_that_expired_while_its_request_runs_is_counted_again() -> None:
    now = [0.0]
    state = LocalState(lambda: now[0])
    cluster = Cluster(state, lease=1.0)
    holder = await cluster.acquire("p", 1, print, print)
    assert holder is not None
    now[0] = 10.0  # the state was away longer than a lease
    assert await state.slots_held("p") == 0
    await cluster.renew_all()
    assert cluster.lost == 1 and await state.slots_held("p") == 1
    await cluster.release("p", holder)
    assert await state.slots_held("p") == 0 and not cluster.held


# --- instances ------------------------------------------------------------------------------------


def slow(tokens: int, delay: float = 0.03) -> Any:
    def script(body: dict[str, Any]) -> Script:
        return Script(tokens=numbered_script(body).tokens[:tokens], delay=delay, finish_reason="length")
    return script


async def engine(nursery: trio.Nursery, tokens: int, delay: float = 0.03) -> FakeUpstream:
    fake = FakeUpstream(slow(tokens, delay))
    await nursery.start(fake.serve)
    return fake


async def one_request(url: str, rid: str, tokens: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """One request on its own connection: its events up to the terminal one."""
    events: list[dict[str, Any]] = []
    async with open_websocket_url(url) as ws:
        await send(ws, chat("count", max_tokens=tokens, id=rid))
        with trio.fail_after(timeout):
            while not events or events[-1]["type"] not in TERMINAL:
                events.append(json.loads(await ws.get_message()))
    return events


def positions(events: list[dict[str, Any]]) -> list[int]:
    return [e["position"] for e in events if e["type"] == "queued"]


async def burst(urls: list[str], per_instance: int, tokens: int) -> dict[str, list[dict[str, Any]]]:
    """``per_instance`` requests at once on each instance; every request's events by its id."""
    results: dict[str, list[dict[str, Any]]] = {}

    async def one(url: str, rid: str) -> None:
        results[rid] = await one_request(url, rid, tokens)

    async with trio.open_nursery() as clients:
        for i in range(per_instance):
            for n, url in enumerate(urls):
                clients.start_soon(one, url, f"i{n}-{i}")
    return results


async def test_capacity_and_queue_positions_hold_across_instances(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    # Each request streams for ~1 s: all 20 are in before the first 4 end, so 16 wait at once.
    fake = await engine(nursery, tokens=30, delay=0.035)
    first = await start_instance(nursery, redis_server, fake, max_concurrency=4)
    second = await start_instance(nursery, redis_server, fake, max_concurrency=4)
    results = await burst([first.url, second.url], 10, tokens=30)
    assert len(results) == 20 and all(events[-1]["type"] == "done" for events in results.values())
    assert fake.peak_active == 4  # the engine's capacity used, never more, across both instances
    sequences = [positions(events) for events in results.values()]
    assert all(seq == sorted(seq, reverse=True) for seq in sequences), sequences  # never up
    firsts = sorted(seq[0] for seq in sequences if seq)
    assert firsts == list(range(1, 17)), firsts  # one line across the cluster: no position given twice
    assert all(seq[-1] <= 4 for seq in sequences if seq), sequences  # admitted once among the first 4 in line
    calls = 0
    for instance in (first, second):
        cluster = instance.running.gateway.pool.cluster
        assert cluster is not None and not cluster.held and cluster.local_fallbacks == 0
        calls += cluster.calls
    print(f"redis calls per request, 20 requests over capacity 4: {calls / 20:.1f}")


async def test_one_instance_alone_is_bounded_by_the_cluster_too(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    # Without shared admission each instance would take 4: the check that the test above can fail.
    fake = await engine(nursery, tokens=40)
    first = await start_instance(nursery, redis_server, fake, max_concurrency=4)
    second = await start_instance(nursery, redis_server, fake, max_concurrency=4)
    async with trio.open_nursery() as clients:
        for n in range(4):
            clients.start_soon(one_request, first.url, f"a{n}", 40)
        await trio.sleep(0.3)
        events = await one_request(second.url, "late", 2)
    assert positions(events)[0] == 1 and events[-1]["type"] == "done"
    assert fake.peak_active == 4


async def test_the_slots_of_a_killed_instance_come_back_within_a_lease(
    nursery: trio.Nursery, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake = await engine(nursery, tokens=400)
    options = ("--upstream", fake.base_url, "--redis", redis_server.url, "--lease-seconds", str(LEASE),
               "--max-concurrency", "2")
    survivor = await start_instance(nursery, redis_server, fake, max_concurrency=2)
    async with trioai_processes(tmp_path, 1, *options) as (doomed,):
        url = f"ws://127.0.0.1:{doomed.port}/ws/chat"
        connections = []
        for n in range(2):  # the doomed instance holds both slots of the engine
            ws = await nursery.start(_open, url)
            await send(ws, chat("count", max_tokens=400, id=f"d{n}"))
            with trio.fail_after(10):
                while json.loads(await ws.get_message())["type"] != "token":
                    pass
            connections.append(ws)
        async with open_websocket_url(survivor.url) as ws:
            await send(ws, chat("count", max_tokens=3, id="s"))
            with trio.fail_after(10):
                events = [json.loads(await ws.get_message()) for _ in range(2)]
            assert [e["type"] for e in events] == ["start", "queued"] and events[1]["position"] == 1
            doomed.kill()
            killed_at = trio.current_time()
            waited = float("inf")
            with trio.fail_after(LEASE + 3):
                while events[-1]["type"] not in TERMINAL:
                    events.append(json.loads(await ws.get_message()))
                    if events[-1]["type"] == "token" and len([e for e in events if e["type"] == "token"]) == 1:
                        waited = trio.current_time() - killed_at
        assert events[-1]["type"] == "done"
        assert waited < LEASE + 0.5, waited  # the dead holder's lease ran out, and the head of the line took it
    # A third instance started after the crash gets the engine at once.
    third = await start_instance(nursery, redis_server, fake, max_concurrency=2)
    events = await one_request(third.url, "t", 3)
    assert positions(events) == [] and events[-1]["type"] == "done"
    cluster = third.running.gateway.pool.cluster
    assert cluster is not None and cluster.calls == 2  # a free slot: one round trip to take it, one to give it back


async def _open(url: str, task_status: trio.TaskStatus[Any]) -> None:
    """A client connection kept open in the test's nursery (the instance's death breaks it)."""
    try:
        async with open_websocket_url(url) as ws:
            task_status.started(ws)
            await trio.sleep_forever()
    except Exception:  # its server was killed: the connection breaks, as it should
        return


async def test_redis_stopped_mid_run_requests_still_complete_then_share_again(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    fake = await engine(nursery, tokens=10)
    first = await start_instance(nursery, redis_server, fake, max_concurrency=2)
    second = await start_instance(nursery, redis_server, fake, max_concurrency=2)
    results: dict[str, list[dict[str, Any]]] = {}

    async def one(url: str, rid: str) -> None:
        results[rid] = await one_request(url, rid, 10, timeout=30)

    with trio.fail_after(30):
        async with trio.open_nursery() as clients:
            for i in range(6):
                for n, instance in enumerate((first, second)):
                    clients.start_soon(one, instance.url, f"i{n}-{i}")
            await trio.sleep(0.4)  # some ran, some wait in the cluster's line
            await redis_server.stop()
    assert len(results) == 12 and all(events[-1]["type"] == "done" for events in results.values())
    assert fake.peak_active <= 4  # each instance on its own: its local bound
    clusters = [i.running.gateway.pool.cluster for i in (first, second)]
    assert sum(c.local_fallbacks for c in clusters if c is not None) > 0
    # Redis back: a new request holds a cluster slot again.
    await redis_server.start()
    name = first.running.gateway.pool.engines[0].name
    probe = RedisState(redis_server.url)
    await nursery.start(probe.run)
    with trio.fail_after(15):
        while True:
            async with trio.open_nursery() as clients:
                clients.start_soon(one_request, first.url, f"again{trio.current_time()}", 10)
                await trio.sleep(0.15)
                try:
                    held = await probe.slots_held(f"engine:{name}")
                except StateUnavailable:
                    held = 0
            if held == 1:
                break
            await trio.sleep(0.2)


async def test_engines_shared_by_a_model_hold_their_capacity_across_instances(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    fakes = [await engine(nursery, tokens=10) for _ in range(2)]
    specs = tuple(EngineSpec(fake.base_url, f"e{n}", models=("m",), max_concurrency=1) for n, fake in enumerate(fakes))

    async def instance() -> RunningServer:
        settings = Settings(host="127.0.0.1", port=0, engines=specs, redis=redis_server.url, lease_seconds=LEASE,
                            engine_metrics_interval=0)
        running: RunningServer = await nursery.start(serve, settings)
        return running

    servers = [await instance(), await instance()]
    results = await burst([s.url for s in servers], 4, tokens=10)
    assert all(events[-1]["type"] == "done" for events in results.values())
    assert [fake.peak_active for fake in fakes] == [1, 1]  # one each, though each instance would send one
    firsts = sorted(positions(events)[0] for events in results.values() if positions(events))
    assert firsts == list(range(1, 7)), firsts



async def test_max_queue_counts_the_instances_cluster_waiters(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    fake = await engine(nursery, tokens=30)
    instance = await start_instance(nursery, redis_server, fake, max_concurrency=1, max_queue=2)
    results: dict[str, list[dict[str, Any]]] = {}

    async def one(rid: str) -> None:
        results[rid] = await one_request(instance.url, rid, 30)

    async with trio.open_nursery() as clients:
        for n in range(3):  # one runs, two wait in the cluster's line
            clients.start_soon(one, f"r{n}")
            await trio.sleep(0.1)
        refused = await one_request(instance.url, "over", 3)
    assert refused[-1]["type"] == "error" and refused[-1]["code"] == "overloaded"
    assert all(events[-1]["type"] == "done" for events in results.values())
    assert sorted(positions(events)[0] for events in results.values() if positions(events)) == [1, 2]


async def test_a_frozen_redis_delays_requests_by_its_timeout_at_most(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    fake = await engine(nursery, tokens=3)
    instance = await start_instance(nursery, redis_server, fake, max_concurrency=2)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # it takes connections and never answers
    try:
        with trio.fail_after(5):  # the state's timeout is 1 s; then it fails at once for a while
            async with trio.open_nursery() as clients:
                for n in range(6):
                    clients.start_soon(one_request, instance.url, f"f{n}", 3)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert fake.peak_active <= 2 and len(fake.requests) == 6


async def test_one_renewal_round_is_one_state_call_per_256_slots() -> None:
    now = [0.0]
    state = LocalState(lambda: now[0])
    cluster = Cluster(state, lease=3.0)
    holders = [await cluster.acquire(f"p{i % 3}", 1000, print, print) for i in range(300)]
    calls = cluster.calls
    now[0] = 2.0
    await cluster.renew_all()
    assert cluster.calls - calls == 2 and cluster.lost == 0  # 256 + 44
    now[0] = 4.5  # past the first lease, within the renewed one
    assert sum([await state.slots_held(f"p{i}") for i in range(3)]) == 300
    for i, holder in enumerate(holders):
        assert holder is not None
        await cluster.release(f"p{i % 3}", holder)
