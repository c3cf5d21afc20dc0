"""Generations that outlive their instance: two trioai servers sharing a real redis-server (issue 18).

The servers run in this process (each its own nursery, so a test can stop one as a crash would: its
tasks cancelled, nothing cleaned up in Redis); the engine is the fake one, whose numbered text
(``w0 w1 …``) continues from a partial answer under ``continue_final_message`` as a greedy engine
would, so a continued answer can be compared word for word with the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import sys
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from trioai.config import Settings
from trioai.fake_upstream import FakeUpstream, Script, numbered_script
from trioai.gateway import trailing_whitespace
from trioai.generation import Generation
from trioai.protocol import ChatRequest, Sampling
from trioai.server import RunningServer, serve
from trioai.sharedgen import Record, SharedGenerations, frame_id, frame_seq, generation_key, is_terminal, summarize
from trioai.state import LocalState, LogEntry, StateUnavailable

from .helpers import chat, check_one_generation, read_generation, send, text_of
from .redisserver import RedisServer

TOKENS = 30
LEASE = 0.6


def numbered(start: int, stop: int) -> str:
    return "".join(f"w{i} " for i in range(start, stop))


def slow_numbered(body: dict[str, Any]) -> Script:
    return Script(tokens=numbered_script(body).tokens, delay=0.03, finish_reason="length")


@pytest.fixture
async def engine(nursery: trio.Nursery) -> FakeUpstream:
    fake = FakeUpstream(slow_numbered)
    await nursery.start(fake.serve)
    return fake


class Instance:
    """One trioai server of the pair, in a nursery of its own that :meth:`crash` cancels."""

    def __init__(self, running: RunningServer, scope: trio.CancelScope) -> None:
        self.running = running
        self.scope = scope

    @property
    def url(self) -> str:
        return self.running.url

    def crash(self) -> None:
        """Stop it as a kill would, for everything outside this process: no task of it runs again, its
        leases are not given back, its clients' connections break."""
        self.scope.cancel()


async def start_instance(nursery: trio.Nursery, redis: RedisServer, engine: FakeUpstream,
                         **overrides: Any) -> Instance:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "upstream": engine.base_url, "redis": redis.url,
                              "lease_seconds": LEASE}
    values.update(overrides)

    async def run(task_status: trio.TaskStatus[Instance]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                running: RunningServer = await inner.start(serve, Settings(**values))
                task_status.started(Instance(running, scope))

    instance: Instance = await nursery.start(run)
    return instance


@pytest.fixture
async def pair(nursery: trio.Nursery, redis_server: RedisServer, engine: FakeUpstream) -> tuple[Instance, Instance]:
    return await start_instance(nursery, redis_server, engine), await start_instance(nursery, redis_server, engine)


def resumable(rid: str, tokens: int = TOKENS) -> dict[str, Any]:
    return chat("count", max_tokens=tokens, id=rid, resumable=True)


async def read_some(url: str, request: dict[str, Any], tokens: int) -> list[dict[str, Any]]:
    """Send ``request``, read its events up to ``tokens`` token events, then leave (the connection closes)."""
    events: list[dict[str, Any]] = []
    async with open_websocket_url(url) as ws:
        await send(ws, request)
        with trio.fail_after(10):
            while len([e for e in events if e["type"] == "token"]) < tokens:
                events.append(json.loads(await ws.get_message()))
    return events


async def resume(url: str, rid: str, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with open_websocket_url(url) as ws:
        await send(ws, {"type": "resume", "id": rid, "resume_token": before[0]["resume_token"],
                        "after": before[-1]["seq"]})
        return await read_generation(ws, rid, timeout=20)


# --- pure parts -------------------------------------------------------------------------------


def test_frames_are_read_without_parsing_the_json() -> None:
    frame = '{"type":"token","id":"r1","seq":12,"content":"a,\\"seq\\":9"}'
    assert (frame_id(frame), frame_seq(frame), is_terminal(frame)) == ('"r1"', 12, False)
    assert (frame_id('{"type":"done","id":7,"seq":3,"finish_reason":"stop"}'), is_terminal('{"type":"done"')) == (
        "7", True)
    assert frame_seq('{"type":"pong","id":1}') is None and frame_id('{"type":"pong","id":1}') is None


def test_a_log_summary_has_the_text_and_says_whether_it_can_go_on() -> None:
    frames = [(1, '{"type":"start","id":1,"seq":1,"model":"m"}'),
              (2, '{"type":"token","id":1,"seq":2,"content":"a "}'),
              (3, '{"type":"queued","id":1,"seq":3,"position":1}'),
              (4, '{"type":"token","id":1,"seq":4,"content":"b"}')]
    summary = summarize(frames)
    assert (summary.parts, summary.last_seq, summary.terminal, summary.continuable) == (("a ", "b"), 4, False, True)
    with_call = summarize([*frames, (5, '{"type":"tool_call","id":1,"seq":5,"index":0,"arguments":"{"}')])
    assert not with_call.continuable
    ended = summarize([*frames, (5, '{"type":"done","id":1,"seq":5}')])
    assert ended.terminal


def test_a_frame_joining_several_deltas_counts_as_that_many_produced() -> None:
    """A takeover's continuation asks for max_tokens minus what was produced: a joined frame (a
    client or a shared-log flush behind the engine) must count as its deltas, not as one."""
    frames = [(1, '{"type":"token","id":1,"seq":1,"content":"a b c","deltas":3}'),
              (2, '{"type":"token","id":1,"seq":2,"content":" \\n","deltas":2}')]
    summary = summarize(frames)
    assert "".join(summary.parts) == "a b c \n"
    assert len(summary.parts) == 5
    assert trailing_whitespace(summary.parts) == (" \n", 2)  # the whitespace-only frame's two deltas


class HeldState(LocalState):
    """In-process state whose appends wait until :attr:`go` is set: a flush held in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.go = trio.Event()

    async def append_many(self, appends: Any, *, ttl: float, maxlen: int) -> list[bool]:
        await self.go.wait()
        return await super().append_many(appends, ttl=ttl, maxlen=maxlen)


def tokens(first: int, last: int) -> list[str]:
    return [f'{{"type":"token","id":"g","seq":{seq},"content":"t{seq} "}}' for seq in range(first, last + 1)]


async def test_frames_replayed_while_their_flush_is_in_flight_are_logged_once(nursery: trio.Nursery) -> None:
    """A connection lost while its frames are on their way to the log, and a relay replaying them
    from what was logged before: the flusher skips what the earlier flush logged (the log would
    refuse them as another writer's and the generation would be cancelled), once, in order."""
    state = HeldState()
    shared = SharedGenerations(state, Settings(upstream="http://127.0.0.1:9/v1"))
    await nursery.start(shared.run)
    generation = cast(Generation, SimpleNamespace(token="tok"))
    answers: list[bool] = []
    lost = trio.CancelScope()

    async def writer() -> None:  # the writer of the connection that goes away
        with lost:
            answers.append(await shared.append(generation, tokens(1, 3)))

    async def relay() -> None:  # replays everything after what it knows was logged: nothing yet
        answers.append(await shared.append(generation, tokens(1, 5)))

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    lost.cancel()  # its flush is in flight
    nursery.start_soon(relay)
    await trio.testing.wait_all_tasks_blocked()
    state.go.set()
    with trio.fail_after(5):
        while not answers:
            await trio.sleep(0.01)
    assert lost.cancelled_caught
    assert answers == [True]  # the relay's: the generation goes on
    logged: list[LogEntry] = await state.read(f"gen:{generation_key('tok')}", 0)
    assert [seq for seq, _ in logged] == [1, 2, 3, 4, 5]
    assert shared.appended[generation_key("tok")] == 5


def test_a_record_keeps_the_whole_request() -> None:
    request = ChatRequest("g", ({"role": "user", "content": "hi"},), 12, Sampling(temperature=0.0, stop=("x",)),
                          {"top_k": 5}, resumable=True, model="m")
    back = Record.from_json(Record("g", "k1", "203.0.113.7", request).to_json())
    assert back == Record("g", "k1", "203.0.113.7", request)
    with pytest.raises(ValueError, match="not a generation record"):
        Record.from_json('{"id": 1}')
    assert generation_key("secret") != "secret" and len(generation_key("secret")) == 40


# --- two instances ------------------------------------------------------------------------------


async def test_a_resume_on_the_other_instance_follows_the_owner(
    pair: tuple[Instance, Instance], engine: FakeUpstream
) -> None:
    first, second = pair
    before = await read_some(first.url, resumable("g"), 5)
    after = await resume(second.url, "g", before)
    events = before + after
    check_one_generation(events)
    assert text_of(events) == numbered(0, TOKENS)
    assert len(engine.requests) == 1  # followed, not generated again


async def test_the_instance_a_resume_reaches_continues_when_the_owner_died(
    pair: tuple[Instance, Instance], engine: FakeUpstream
) -> None:
    first, second = pair
    before = await read_some(first.url, resumable("g"), 6)
    first.crash()
    after = await resume(second.url, "g", before)
    events = before + after
    check_one_generation(events)
    assert text_of(events) == numbered(0, TOKENS)  # every word once: what was logged, then the continuation
    assert len(engine.requests) == 2
    follow_up = engine.requests[1].body
    assert follow_up["continue_final_message"] is True and follow_up["messages"][-1]["role"] == "assistant"
    continued_from = follow_up["messages"][-1]["content"]
    # Never from a shorter text than the client saw (the trailing space: the engine writes it again).
    assert continued_from.startswith(text_of(before).rstrip())
    assert follow_up["max_tokens"] == TOKENS - len(continued_from.split())
    assert events[-1]["usage"]["completion_tokens"] == TOKENS


async def test_exactly_one_instance_continues_when_two_resume_after_the_owner_died(
    nursery: trio.Nursery, redis_server: RedisServer, engine: FakeUpstream
) -> None:
    owner, second, third = [await start_instance(nursery, redis_server, engine) for _ in range(3)]
    before = await read_some(owner.url, resumable("g"), 5)
    owner.crash()
    results: dict[str, list[dict[str, Any]]] = {}

    async def resume_on(name: str, instance: Instance) -> None:
        results[name] = await resume(instance.url, "g", before)

    async with trio.open_nursery() as clients:
        clients.start_soon(resume_on, "second", second)
        clients.start_soon(resume_on, "third", third)
    for events in results.values():
        check_one_generation(before + events)
        assert text_of(before + events) == numbered(0, TOKENS)
    assert results["second"] == results["third"]  # the same events: one continued, the other followed its log
    assert len(engine.requests) == 2  # exactly one continuation


async def test_a_cancel_sent_to_another_instance_stops_the_owner(
    pair: tuple[Instance, Instance], engine: FakeUpstream
) -> None:
    first, second = pair
    before = await read_some(first.url, resumable("g", tokens=200), 2)
    async with open_websocket_url(second.url) as ws:
        await send(ws, {"type": "cancel", "id": "g", "resume_token": before[0]["resume_token"]})
        assert json.loads(await ws.get_message()) == {"type": "cancelled", "id": "g"}
    with trio.fail_after(LEASE * 3):
        await engine.requests[0].closed.wait()  # the owner closed the engine stream: the engine aborts
    assert engine.requests[0].chunks_sent < 200


async def test_a_replay_of_logged_frames_on_the_same_instance_goes_on(pair: tuple[Instance, Instance]) -> None:
    """A resume here of a shared generation from an earlier ``after`` sends frames the log has
    already (this instance appended them): they are not appended again (the log would refuse them,
    as if another instance owned the generation) and the generation runs on to its end."""
    first, _ = pair
    before = await read_some(first.url, resumable("g"), 8)
    replay_from = before[:3]  # start, then two tokens: the rest comes again
    after = await resume(first.url, "g", replay_from)
    events = replay_from + after
    check_one_generation(events)
    assert text_of(events) == numbered(0, TOKENS)


async def test_a_wrong_token_on_the_other_instance_is_not_found(pair: tuple[Instance, Instance]) -> None:
    first, second = pair
    before = await read_some(first.url, resumable("g"), 2)
    async with open_websocket_url(second.url) as ws:
        await send(ws, {"type": "resume", "id": "g", "resume_token": before[0]["resume_token"][:-2] + "xx",
                        "after": 1})
        answer = json.loads(await ws.get_message())
        await send(ws, {"type": "resume", "id": "other", "resume_token": before[0]["resume_token"], "after": 1})
        other = json.loads(await ws.get_message())
    assert answer["code"] == other["code"] == "resume_not_found"


async def test_redis_restarted_mid_run_no_request_is_lost(
    nursery: trio.Nursery, redis_server: RedisServer, engine: FakeUpstream
) -> None:
    instance = await start_instance(nursery, redis_server, engine)
    await redis_server.stop()
    # Degraded: plain and resumable requests are served with local state; resume works on this instance.
    async with open_websocket_url(instance.url) as ws:
        await send(ws, chat("count", max_tokens=4, id="plain"))
        assert text_of(await read_generation(ws, "plain")) == numbered(0, 4)
    before = await read_some(instance.url, resumable("local", tokens=8), 2)
    after = await resume(instance.url, "local", before)
    check_one_generation(before + after)
    assert text_of(before + after) == numbered(0, 8)
    assert "trioai_state_degraded 1.0" in instance.running.gateway.metrics.render().decode()
    assert b"shared state: degraded" in (await instance.running.server._readyz()).body
    await redis_server.start()
    # Back: a new resumable generation is shared again (another instance could resume it).
    with trio.fail_after(10):
        while True:
            events = await read_some(instance.url, resumable(f"again{trio.current_time()}", tokens=3), 3)
            key = generation_key(events[0]["resume_token"])
            shared = instance.running.gateway.shared
            assert shared is not None
            with contextlib.suppress(StateUnavailable):  # still told down for a moment after it is back
                if await shared.state.get_record(f"gen:{key}") is not None:
                    break
            await trio.sleep(0.2)
    assert "trioai_state_degraded 0.0" in instance.running.gateway.metrics.render().decode()


async def test_a_wrong_redis_url_stops_the_start_with_one_line() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "trioai", "serve", "--port", "0", "--upstream", "http://127.0.0.1:9/v1",
         "--redis", "redis://127.0.0.1:1/0"], check=False, capture_stderr=True)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "cannot use this Redis" in stderr and "Traceback" not in stderr, stderr


async def test_a_client_connection_to_a_crashed_instance_breaks(pair: tuple[Instance, Instance]) -> None:
    first, _ = pair
    async with open_websocket_url(first.url) as ws:
        await send(ws, resumable("g", tokens=100))
        json.loads(await ws.get_message())
        first.crash()
        with trio.fail_after(5):
            while True:
                try:
                    await ws.get_message()
                except ConnectionClosed:
                    break


async def test_every_frame_a_client_gets_is_in_the_shared_log_first(pair: tuple[Instance, Instance]) -> None:
    """Log, then send, also beside a generation that is not shared (whose deltas may take the fast
    path that writes from the generation task): each frame of the shared one the client received was
    in Redis by then, and the connection's fast path is back once it ended."""
    first, _ = pair
    shared = first.running.gateway.shared
    assert shared is not None
    async with open_websocket_url(first.url) as ws:
        await send(ws, chat("count", max_tokens=20, id="plain"))
        await send(ws, resumable("kept", tokens=20))
        received: dict[str, list[dict[str, Any]]] = {"plain": [], "kept": []}
        logged_when_received: list[bool] = []
        token = None
        while not all(events and events[-1]["type"] in ("done", "error") for events in received.values()):
            event = json.loads(await ws.get_message())
            received[event["id"]].append(event)
            if event["id"] == "kept":
                token = token or event.get("resume_token")
                assert token is not None
                logged = await shared.read_log(token, event["seq"] - 1)
                logged_when_received.append(bool(logged) and logged[0][0] == event["seq"])
        session = next(iter(first.running.server.sessions))
        assert session.outbox.direct is not None  # no shared generation attached: the fast path again
    assert all(logged_when_received) and len(logged_when_received) == len(received["kept"])
    assert text_of(received["plain"]) == numbered(0, 20) and text_of(received["kept"]) == numbered(0, 20)


class CountingState(LocalState):
    """In-process state that notes when each ``append_many`` call (a Redis round trip) came, and what it carried."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, int]] = []  # (time, logs in the call)

    async def append_many(self, appends: Any, *, ttl: float, maxlen: int) -> list[bool]:
        self.calls.append((trio.current_time(), len(appends)))
        return await super().append_many(appends, ttl=ttl, maxlen=maxlen)


@pytest.mark.parametrize(("gather", "second_after", "calls"), [
    (0.001, 0.0005, [(0.0005, 2)]),  # the second stream's frame comes within the window: one round trip
    (0.001, 0.005, [(0.001, 1), (0.006, 1)]),  # it does not: the window passes; its own waits one too
    (0.0, 0.0005, [(0.0, 1), (0.0005, 1)]),  # no window: each goes at once
])
async def test_the_flusher_gathers_the_frames_of_the_instances_streams(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
        gather: float, second_after: float, calls: list[tuple[float, int]]) -> None:
    state = CountingState()
    shared = SharedGenerations(state, Settings(upstream="http://127.0.0.1:9/v1", shared_log_gather=gather))
    await nursery.start(shared.run)
    first, second = (cast(Generation, SimpleNamespace(token=name)) for name in ("a", "b"))
    for generation in (first, second):
        shared.owned[generation_key(cast(str, generation.token))] = generation
    start = trio.current_time()

    async def later() -> None:
        await trio.sleep(second_after)
        assert await shared.append(second, tokens(1, 1))

    nursery.start_soon(later)
    assert await shared.append(first, tokens(1, 1))
    with trio.fail_after(1):
        while len(state.calls) < len(calls):
            await trio.sleep(0.0001)
    assert [(round(when - start, 6), logs) for when, logs in state.calls] == calls


async def test_one_stream_alone_is_never_held(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    state = CountingState()
    shared = SharedGenerations(state, Settings(upstream="http://127.0.0.1:9/v1", shared_log_gather=0.01))
    await nursery.start(shared.run)
    generation = cast(Generation, SimpleNamespace(token="a"))
    shared.owned[generation_key("a")] = generation
    start = trio.current_time()
    assert await shared.append(generation, tokens(1, 2))
    assert state.calls == [(start, 1)]


class RenewCountingState(LocalState):
    """In-process state that counts ``renew_claims`` calls (Redis round trips) and the claims in each."""

    def __init__(self) -> None:
        super().__init__()
        self.renewals: list[int] = []

    async def renew_claims(self, claims: Any, owner: str, *, lease_ttl: float, record_ttl: float) -> Any:
        self.renewals.append(len(claims))
        return await super().renew_claims(claims, owner, lease_ttl=lease_ttl, record_ttl=record_ttl)


async def test_a_heartbeat_renews_every_generation_in_one_round_trip_and_acts_on_each_answer(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    state = RenewCountingState()
    shared = SharedGenerations(state, Settings(upstream="http://127.0.0.1:9/v1", lease_seconds=3), instance="A")
    await nursery.start(shared.run)
    cancels: dict[str, list[str]] = {}
    request = ChatRequest("g", ({"role": "user", "content": "hi"},), 5, Sampling(), {}, resumable=True, model="m")
    for name in ("kept", "cancelled", "taken", "forgotten"):
        generation = cast(Generation, SimpleNamespace(token=name, request_id=name,
                                                      cancel=cancels.setdefault(name, []).append))
        assert await shared.register(generation, Record(name, None, "127.0.0.1", request))
    key = {name: generation_key(name) for name in cancels}
    await state.put_record(f"cancel:{key['cancelled']}", "1", 30)  # a client's cancel, on another instance
    state._leases[f"gen:{key['taken']}"] = ("B", trio.current_time() + 30)  # another instance took it over
    del state._records[f"gen:{key['forgotten']}"]  # the state forgot its record (a Redis restarted empty)
    await trio.sleep(1.5)  # one heartbeat: every lease/3
    assert state.renewals == [4]  # one round trip for the four
    assert cancels == {"kept": [], "cancelled": ["cancel"], "taken": ["disconnect"], "forgotten": []}
    assert set(shared.owned) == {key["kept"], key["cancelled"], key["forgotten"]}
    assert Record.from_json(cast(str, await state.get_record(f"gen:{key['forgotten']}"))).request_id == "forgotten"
    await trio.sleep(20)  # leases of 3 s outlive this only if every heartbeat renews them
    assert [await state.lease_owner(f"gen:{key[name]}") for name in ("kept", "forgotten", "taken")] == ["A", "A", "B"]
    assert state.renewals == [4] + [3] * 20  # every second (lease/3), one round trip each
