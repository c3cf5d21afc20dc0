"""Eager start (issue 19): a generation's first engine request written in the step in which the
session took the client's frame (``Gateway.begin``), the fallback through ``Gateway.generate`` when
something on the way would wait, and nothing held after a begun generation is cancelled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trioai.admission import Admission
from trioai.clusteradmission import Cluster, ClusterAdmission
from trioai.fake_upstream import FakeUpstream
from trioai.gateway import Begun, Gateway, RequestStats
from trioai.outbox import Outbox
from trioai.protocol import ChatRequest, Limits, parse_client_event
from trioai.server import RunningServer
from trioai.session import Session
from trioai.state import LocalState
from trioai.transport import H11Transport

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, connect, count_tasks, echo_tokens, send, settle, text_of
from .redisserver import RedisServer

MODEL = "fake-model"  # what the fake engine lists

Task = trio.lowlevel.Task


class Steps(trio.abc.Instrument):
    """Counts every task's scheduler steps: (task, steps so far) tells one step from another."""

    def __init__(self) -> None:
        self.counts: dict[Task, int] = {}

    def before_task_step(self, task: Task) -> None:
        self.counts[task] = self.counts.get(task, 0) + 1

    def now(self) -> tuple[Task, int]:
        """The running task and the step it is in."""
        task = trio.lowlevel.current_task()
        return task, self.counts.get(task, 0)


@contextmanager
def counting_steps() -> Iterator[Steps]:
    """A :class:`Steps` instrumenting the run for the block."""
    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        yield steps
    finally:
        trio.lowlevel.remove_instrument(steps)


def spy_on_begin(monkeypatch: pytest.MonkeyPatch, gateway: Gateway) -> list[Begun | None]:
    """What each ``gateway.begin`` call returned, in order (the method still runs)."""
    returned: list[Begun | None] = []
    original = gateway.begin

    def begin(*args: Any, **kwargs: Any) -> Begun | None:
        begun = original(*args, **kwargs)
        returned.append(begun)
        return begun

    monkeypatch.setattr(gateway, "begin", begin)
    return returned


def chat_transport(server: RunningServer) -> H11Transport:
    """The server's (one) engine's chat connection pool."""
    transport = server.gateway.pool.engines[0].upstream.transport
    assert isinstance(transport, H11Transport)
    return transport


# --- end to end ------------------------------------------------------------------------------------


async def test_the_engine_request_is_written_in_the_step_that_took_the_frame(
    gateway: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first request (the default model still to be asked of the engine) is written by its
    generation task; on a warm pool the next one is written by the session's task, in the very step
    in which ``Session.handle`` got its frame. The request-start histogram is still fed both times."""
    frames: list[tuple[Task, int]] = []
    writes: list[tuple[Task, int]] = []
    begun = spy_on_begin(monkeypatch, gateway.gateway)
    with counting_steps() as steps:
        original_handle = Session.handle

        async def handle(self: Session, data: str | bytes) -> None:
            frames.append(steps.now())
            await original_handle(self, data)

        monkeypatch.setattr(Session, "handle", handle)
        upstream = gateway.gateway.pool.engines[0].upstream
        observe = upstream.on_request_start
        assert observe is not None

        def request_started(seconds: float) -> None:
            writes.append(steps.now())
            observe(seconds)

        monkeypatch.setattr(upstream, "on_request_start", request_started)
        async with connect(gateway) as ws:
            for rid in ("first", "second"):
                await send(ws, chat("one two", 3, id=rid))
                events = (await collect_until_terminal(ws, {rid}))[rid]
                assert events[-1]["type"] == "done"
                assert text_of(events) == "".join(echo_tokens("one two", 3))
    assert len(frames) == len(writes) == 2
    assert begun[0] is None  # the model was not known yet: generate() resolved it, then wrote
    assert writes[0][0] is not frames[0][0]  # the fallback: written by the generation task
    assert isinstance(begun[1], Begun)
    assert writes[1] == frames[1]  # the same task, the same step
    count = gateway.gateway.metrics.registry.get_sample_value("trioai_request_start_seconds_count")
    assert count == 2


async def test_a_request_waiting_for_capacity_is_not_begun_and_completes(
    start_gateway: StartGateway, slow_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_concurrency 1, taken by a running generation: begin() declines the next request (nothing
    taken), which is queued, then runs once the first is done."""
    server = await start_gateway(upstream=slow_upstream.base_url, max_concurrency=1)
    begun = spy_on_begin(monkeypatch, server.gateway)
    async with connect(server) as ws:
        await send(ws, chat("warm", 1, id="warm"))  # the model known, a pooled connection
        assert (await collect_until_terminal(ws, {"warm"}))["warm"][-1]["type"] == "done"
        await send(ws, chat("x", 10, id="a"))
        await send(ws, chat("x", 3, id="b"))
        events = await collect_until_terminal(ws, {"a", "b"})
    assert [e["type"] for e in events["a"]] == ["start"] + ["token"] * 10 + ["done"]
    assert [e["type"] for e in events["b"]] == ["start", "queued"] + ["token"] * 3 + ["done"]
    assert events["b"][1]["position"] == 1
    assert text_of(events["b"]) == "t0 t1 t2 "
    assert len(begun) == 3
    assert begun[0] is None  # the first request: the model still to be asked of the engine
    assert isinstance(begun[1], Begun)
    assert begun[2] is None  # "b": no capacity free, so generate() queued it
    assert len(slow_upstream.requests) == 3


@pytest.mark.parametrize("cancel_from", ["client", "same-step"])
async def test_cancelling_a_begun_generation_at_once_leaks_nothing(
    start_gateway: StartGateway, slow_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, cancel_from: str
) -> None:
    """A message then its cancel, round after round: each ends ``cancelled``, and afterwards no
    capacity unit, engine room, engine connection or task is still held.

    ``client``: the client sends the cancel right after the message. ``same-step``: the session
    handles the cancel in the step that took the message, before the generation task ever ran, so
    only the ``Begun`` it was handed can give back what ``begin`` took (the written request included).
    """
    server = await start_gateway(upstream=slow_upstream.base_url)
    pool = server.gateway.pool
    transport = chat_transport(server)
    begun = spy_on_begin(monkeypatch, server.gateway)
    rounds = 20
    same_step: list[bool] = []
    with counting_steps() as steps:
        if cancel_from == "same-step":
            original_handle = Session.handle

            async def handle(self: Session, data: str | bytes) -> None:
                event = json.loads(data)
                before = steps.now()
                await original_handle(self, data)
                if event["type"] == "message" and event["id"].startswith("c"):
                    await original_handle(self, json.dumps({"type": "cancel", "id": event["id"]}))
                    same_step.append(steps.now() == before)

            monkeypatch.setattr(Session, "handle", handle)
        async with connect(server) as ws:
            await send(ws, chat("warm", 1, id="warm"))
            assert (await collect_until_terminal(ws, {"warm"}))["warm"][-1]["type"] == "done"
            await settle()
            open_before = transport.connections_open
            tasks_after_one = 0
            for i in range(rounds):
                rid = f"c{i}"
                await send(ws, chat("x", 1000, id=rid))
                if cancel_from == "client":
                    await send(ws, {"type": "cancel", "id": rid})
                events = (await collect_until_terminal(ws, {rid}))[rid]
                assert events[-1] == {"type": "cancelled", "id": rid}
                await settle()
                assert pool.admission(MODEL).running == 0
                assert [engine.in_flight for engine in pool.engines] == [0] * len(pool.engines)
                assert transport.connections_open <= open_before  # the cancelled request's connection closed
                if i == 0:  # (the first round closes the warm-up's pooled connection, and its engine task ends)
                    tasks_after_one = count_tasks()
            assert count_tasks() == tasks_after_one
            await send(ws, chat("x", 2, id="after"))  # still serves
            assert text_of((await collect_until_terminal(ws, {"after"}))["after"]) == "t0 t1 "
    assert all(isinstance(b, Begun) for b in begun[1:rounds + 1]), begun
    assert same_step == ([True] * rounds if cancel_from == "same-step" else [])
    cancelled = [record for record in slow_upstream.requests if record.body.get("max_tokens") == 1000]
    assert len(cancelled) == rounds  # every one was written to the engine
    with trio.fail_after(5):
        for record in cancelled:
            await record.closed.wait()  # and the engine saw it end
            assert not record.completed


async def test_a_resumable_generation_without_shared_state_is_begun(gateway: RunningServer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No --redis: a resumable request takes the eager start too, its ``start`` carrying the token."""
    begun = spy_on_begin(monkeypatch, gateway.gateway)
    assert gateway.gateway.shared is None
    async with connect(gateway) as ws:
        await send(ws, chat("warm", 1, id="warm"))
        await collect_until_terminal(ws, {"warm"})
        await send(ws, chat("one two", 2, id="r", resumable=True))
        events = (await collect_until_terminal(ws, {"r"}))["r"]
    assert events[0]["type"] == "start" and events[0]["resume_token"]
    assert events[-1]["type"] == "done" and text_of(events) == "one two "
    assert len(begun) == 2 and isinstance(begun[1], Begun)


async def test_a_resumable_generation_with_shared_state_is_not_begun(
    nursery: trio.Nursery, tmp_path: Path, start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --redis a resumable generation is registered in Redis before its engine request, so
    begin() is not asked; a plain request on the same server still is."""
    redis = RedisServer(nursery, tmp_path)
    await redis.start()
    server = await start_gateway(redis=redis.url)
    assert server.gateway.shared is not None
    begun = spy_on_begin(monkeypatch, server.gateway)
    async with connect(server) as ws:
        await send(ws, chat("warm", 1, id="warm"))
        await collect_until_terminal(ws, {"warm"})
        calls = len(begun)
        await send(ws, chat("one two", 2, id="r", resumable=True))
        events = (await collect_until_terminal(ws, {"r"}))["r"]
        assert events[-1]["type"] == "done" and text_of(events) == "one two "
        assert len(begun) == calls  # not asked
        await send(ws, chat("one two", 2, id="plain"))
        assert (await collect_until_terminal(ws, {"plain"}))["plain"][-1]["type"] == "done"
    assert len(begun) == calls + 1


async def warm(server: RunningServer) -> None:
    """One request through ``server``: the default model known, an idle connection to the engine."""
    async with connect(server) as ws:
        await send(ws, chat("warm", 1, id="warm"))
        assert (await collect_until_terminal(ws, {"warm"}))["warm"][-1]["type"] == "done"
    await settle()


def message(**fields: Any) -> ChatRequest:
    """A parsed ``message`` event ("one two", 3 tokens) with ``fields``."""
    event = parse_client_event(json.dumps(chat("one two", 3, **fields)), Limits())
    assert isinstance(event, ChatRequest)
    return event


async def test_a_begun_generation_gives_back_what_it_holds_once(
    gateway: RunningServer, upstream: FakeUpstream
) -> None:
    """begin() takes a capacity unit, room on the engine and an idle connection, writes the request
    and queues ``start``; leaving the Begun unread gives each back (the engine sees the request
    end), and leaving it again gives nothing back twice."""
    await warm(gateway)
    pool = gateway.gateway.pool
    engine = pool.engines[0]
    transport = chat_transport(gateway)
    assert (transport.connections_open, transport.connections_idle) == (1, 1)
    outbox = Outbox()
    stats = RequestStats(received_at=trio.current_time())
    begun = gateway.gateway.begin(message(id="b"), "b", outbox.stream("b"), stats)
    assert isinstance(begun, Begun)
    assert begun.model == MODEL and begun.engine is engine
    assert (pool.admission(MODEL).running, engine.in_flight) == (1, 1)
    assert (transport.connections_open, transport.connections_idle) == (1, 0)
    assert stats.admitted_at is not None
    start = outbox.pop()
    assert isinstance(start, str) and json.loads(start)["type"] == "start" and json.loads(start)["id"] == "b"
    with begun:
        pass
    assert (pool.admission(MODEL).running, engine.in_flight) == (0, 0)
    assert transport.connections_open == 0
    begun.release()  # again (the registry's safety net): nothing is given back twice
    assert (pool.admission(MODEL).running, engine.in_flight) == (0, 0)
    assert transport.connections_open == 0
    with trio.fail_after(5):
        while len(upstream.requests) < 2:
            await trio.sleep(0.01)
        await upstream.requests[-1].closed.wait()
    assert upstream.requests[-1].body["messages"] == [{"role": "user", "content": "one two"}]
    assert not upstream.requests[-1].completed


@pytest.mark.parametrize("case", ["unknown-model", "connection-buffer-full", "cold"])
async def test_begin_declines_without_taking_anything(gateway: RunningServer, case: str) -> None:
    """A model not (yet) known, a client connection over its buffer bound, or a pool not yet warm
    (the default model still to be asked of the engine): None, with no unit, room or connection taken
    and no event queued."""
    if case != "cold":
        await warm(gateway)
    pool = gateway.gateway.pool
    transport = chat_transport(gateway)
    open_before = transport.connections_open
    outbox = Outbox(connection_buffer_bytes=0 if case == "connection-buffer-full" else 1 << 20)
    request = message(id="b", model="other-model") if case == "unknown-model" else message(id="b")
    stats = RequestStats(received_at=trio.current_time())
    assert gateway.gateway.begin(request, "b", outbox.stream("b"), stats) is None
    assert stats.admitted_at is None
    assert all(admission.running == 0 for admission in pool.admissions)
    assert [engine.in_flight for engine in pool.engines] == [0]
    assert transport.connections_open == open_before
    assert outbox.pop() is None


# --- units -----------------------------------------------------------------------------------------


def test_take_now_takes_a_free_unit_and_release_gives_it_back() -> None:
    """take_now() gets a unit while a token is left, None once none is; a released unit is taken again."""
    admission = Admission(2)
    first = admission.take_now()
    second = admission.take_now()
    assert first is not None and second is not None and first is not second
    assert admission.running == 2
    assert admission.take_now() is None
    assert admission.running == 2  # the refusal took nothing
    admission.release(first)
    assert admission.running == 1
    third = admission.take_now()
    assert third is not None
    admission.release(second)
    admission.release(third)
    assert admission.running == 0
    assert admission.limiter.borrowed_tokens == 0


async def test_take_now_does_not_jump_the_line() -> None:
    """With someone waiting in line for a unit, take_now() is None even when a unit frees up as the
    waiter's turn comes: the waiter gets it."""
    admission = Admission(1)
    held = admission.take_now()
    assert held is not None
    got: list[str] = []

    async def wait_for_a_slot() -> None:
        async with admission.slot(lambda position: None):
            got.append("waiter")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_a_slot)
        await trio.testing.wait_all_tasks_blocked()
        assert admission.queued == 1
        assert admission.take_now() is None
        admission.release(held)
        assert admission.take_now() is None  # handed to the waiter, not to whoever asks first
    assert got == ["waiter"]
    assert admission.running == 0
    assert admission.take_now() is not None


def test_a_cluster_admission_never_takes_now() -> None:
    """Across instances a unit is a round trip to the shared state: take_now() is None, even when free."""
    admission = ClusterAdmission(4, Cluster(LocalState(), lease=5.0), "model:m")
    assert admission.take_now() is None
    assert admission.running == 0

