"""Several engines behind one gateway: routing, health, failover and continuation (issue 17).

Three (or four) fake engines, each a real HTTP server with scripted faults: refusing, 503, 429
with Retry-After, dying mid-stream, stalling. The fake engine honours ``continue_final_message``
by continuing its numbered text (``w0 w1 …``) from the partial answer, as a greedy engine would.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from trioai.config import Settings
from trioai.enginespec import EngineSpec
from trioai.fake_upstream import FakeUpstream, Script, ToolDelta, numbered_script
from trioai.server import RunningServer, serve

from .helpers import chat, check_one_generation, collect_until_terminal, connect, recv, send, text_of

ScriptFor = Callable[[dict[str, Any]], Script]


async def engine(nursery: trio.Nursery, script: ScriptFor = numbered_script, **options: Any) -> FakeUpstream:
    fake = FakeUpstream(script, **options)
    await nursery.start(fake.serve)
    return fake


async def gateway_for(nursery: trio.Nursery, engines: dict[str, FakeUpstream], *,
                      capacities: dict[str, int] | None = None, continues: dict[str, bool] | None = None,
                      models: tuple[str, ...] | None = None, **overrides: Any) -> RunningServer:
    """A gateway in front of ``engines`` (name → fake), with fast probes; ``models`` for every entry
    (default: each engine's own list)."""
    specs = tuple(
        EngineSpec(fake.base_url, name, models=models, max_concurrency=(capacities or {}).get(name),
                   can_continue=(continues or {}).get(name, True))
        for name, fake in engines.items()
    )
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "http_port": 0, "engines": specs,
                              "probe_interval": 0.1, "probe_timeout": 1.0, "engine_metrics_interval": 0.05,
                              "eject_after_failures": 2}
    values.update(overrides)
    running: RunningServer = await nursery.start(serve, Settings(**values))
    return running


def numbered(start: int, stop: int) -> str:
    return "".join(f"w{i} " for i in range(start, stop))


async def ask(server: RunningServer, rid: Any = 1, max_tokens: int = 8, **extra: Any) -> list[dict[str, Any]]:
    """One request on a new connection; its events in order, seq kept."""
    async with connect(server) as ws:
        await send(ws, chat("count", max_tokens=max_tokens, id=rid, **extra))
        events = []
        while True:
            event = await recv(ws, keep_seq=True)
            events.append(event)
            if event["type"] in ("done", "error", "cancelled"):
                return events


async def test_requests_spread_over_engines_by_capacity(nursery: trio.Nursery) -> None:
    slow: ScriptFor = lambda body: Script(tokens=("x ",) * 4, delay=0.15)  # noqa: E731
    fakes = {name: await engine(nursery, slow) for name in ("a", "b", "c")}
    server = await gateway_for(nursery, fakes, capacities={"a": 1, "b": 2, "c": 3})
    results: list[str] = []

    async def one(i: int) -> None:
        events = await ask(server, rid=i, max_tokens=4)
        results.append(events[-1]["type"])

    async with trio.open_nursery() as clients:
        for i in range(6):
            clients.start_soon(one, i)
    assert results == ["done"] * 6
    # Six at once fill every engine to its own capacity, and no engine ever takes more.
    assert [fakes[n].peak_active for n in ("a", "b", "c")] == [1, 2, 3]
    assert [len(fakes[n].requests) for n in ("a", "b", "c")] == [1, 2, 3]


async def test_a_queue_beyond_all_capacity_reports_positions_and_drains(nursery: trio.Nursery) -> None:
    slow: ScriptFor = lambda body: Script(tokens=("x ",) * 3, delay=0.1)  # noqa: E731
    fakes = {name: await engine(nursery, slow) for name in ("a", "b")}
    server = await gateway_for(nursery, fakes, capacities={"a": 1, "b": 1})
    async with connect(server) as ws:
        for i in range(4):
            await send(ws, chat("q", max_tokens=3, id=i))
        events = await collect_until_terminal(ws, {0, 1, 2, 3})
    assert all(e[-1]["type"] == "done" for e in events.values())
    first = sorted(next(e["position"] for e in evs if e["type"] == "queued")
                   for evs in events.values() if any(e["type"] == "queued" for e in evs))
    assert first == [1, 2]  # two waited: capacity is 1 + 1 across the model's engines
    assert max(f.peak_active for f in fakes.values()) == 1


async def test_failover_before_the_first_token_goes_to_another_engine_at_once(nursery: trio.Nursery) -> None:
    refused: ScriptFor = lambda body: Script(status=503, error_message="warming up")  # noqa: E731
    fakes = {"bad": await engine(nursery, refused), "good": await engine(nursery)}
    server = await gateway_for(nursery, fakes)
    events = await ask(server, max_tokens=4)
    assert text_of(events) == numbered(0, 4) and events[-1]["type"] == "done"
    assert len(fakes["bad"].requests) == 1 and len(fakes["good"].requests) == 1
    assert server.gateway.engine_metrics.failovers.labels("retry")._value.get() == 1.0


async def test_an_engine_that_refuses_connections_is_skipped_at_once(nursery: trio.Nursery,
                                                                      autojump_clock: trio.abc.Clock) -> None:
    """Nothing listens on the first entry's port: whether its probe or a request finds out first,
    the request is answered by the other engine without a retry backoff (the clock would show the
    0.25 s sleep), and the dead engine is ejected."""
    dead = FakeUpstream()  # never served: its port is closed
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        dead.port = probe.getsockname()[1]
    fakes = {"dead": dead, "alive": await engine(nursery)}
    server = await gateway_for(nursery, fakes, models=("fake-model",), eject_after_failures=1,
                               probe_interval=60.0)
    start = trio.current_time()
    events = await ask(server, max_tokens=3)
    assert text_of(events) == numbered(0, 3) and trio.current_time() - start < 0.25
    assert [e.healthy for e in server.gateway.pool.engines] == [False, True]


async def test_429_with_retry_after_is_retried_on_another_engine(nursery: trio.Nursery) -> None:
    busy: ScriptFor = lambda body: Script(status=429, response_headers=(("retry-after", "30"),))  # noqa: E731
    fakes = {"busy": await engine(nursery, busy), "free": await engine(nursery)}
    server = await gateway_for(nursery, fakes)
    events = await ask(server, max_tokens=3)
    assert text_of(events) == numbered(0, 3)
    assert len(fakes["busy"].requests) == 1 and len(fakes["free"].requests) == 1


async def test_a_refusing_engine_is_ejected_until_its_probe_passes(nursery: trio.Nursery) -> None:
    state = {"broken": True}

    def flaky(body: dict[str, Any]) -> Script:
        return Script(status=502) if state["broken"] else numbered_script(body)

    fakes = {"flaky": await engine(nursery, flaky), "steady": await engine(nursery)}
    server = await gateway_for(nursery, fakes, probe_interval=0.05, models=("fake-model",))
    for i in range(2):  # equal loads: the first engine wins the tie, fails, and the other answers
        assert (await ask(server, rid=i))[-1]["type"] == "done"
    fakes["flaky"].refuse_models = True  # from now on its health probe fails too
    seen = len(fakes["flaky"].requests)
    assert seen == 2  # ejected after 2 failures in a row (--eject-after-failures)
    for i in range(4, 10):
        assert (await ask(server, rid=i))[-1]["type"] == "done"
    assert len(fakes["flaky"].requests) == seen  # no traffic while ejected
    state["broken"] = False  # it works again, but its probe still fails: still no traffic
    await trio.sleep(0.3)
    for i in range(10, 13):
        await ask(server, rid=i)
    assert len(fakes["flaky"].requests) == seen
    fakes["flaky"].refuse_models = False
    with trio.fail_after(5):
        while not await healthy(server, "flaky"):
            await trio.sleep(0.05)
    # Back, and idle: requests one after another on new connections go to it again.
    async with trio.open_nursery() as clients:
        for i in range(13, 17):
            clients.start_soon(ask, server, i)
    assert len(fakes["flaky"].requests) > seen


async def healthy(server: RunningServer, name: str) -> bool:
    metrics = await http_get(server, "/metrics")
    return f'trioai_engine_healthy{{engine="{name}"}} 1.0' in metrics.text


async def http_get(server: RunningServer, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"{server.http_url}{path}")


async def test_an_answer_cut_mid_stream_continues_on_another_engine(nursery: trio.Nursery) -> None:
    def dies(body: dict[str, Any]) -> Script:
        script = numbered_script(body)
        return Script(tokens=script.tokens, drop_after=5, finish_reason="length")

    fakes = {"dies": await engine(nursery, dies), "rescue": await engine(nursery)}
    server = await gateway_for(nursery, fakes)
    events = await ask(server, max_tokens=12)
    check_one_generation(events)
    assert text_of(events) == numbered(0, 12)  # every word once, in order, none lost or repeated
    (failover,) = [e for e in events if e["type"] == "failover"]
    tokens_before = [e for e in events if e["type"] == "token" and e["seq"] < failover["seq"]]
    assert failover["from"] == "dies" and failover["to"] == "rescue"
    assert failover["at_seq"] == failover["seq"] - 1 == tokens_before[-1]["seq"]
    assert "".join(e["content"] for e in tokens_before) == numbered(0, 5)
    done = events[-1]
    assert done["usage"]["completion_tokens"] == 12 and done["usage"]["source"] == "mixed"
    (follow_up,) = fakes["rescue"].requests
    body = follow_up.body
    assert body["messages"][-1] == {"role": "assistant", "content": numbered(0, 5).rstrip()}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 7
    assert fakes["dies"].requests[0].body.get("continue_final_message") is None


async def test_the_client_library_reads_a_continued_answer_as_one(nursery: trio.Nursery) -> None:
    from trioai.client import connect as client_connect

    def dies(body: dict[str, Any]) -> Script:
        return Script(tokens=numbered_script(body).tokens, drop_after=4, finish_reason="length")

    fakes = {"dies": await engine(nursery, dies), "rescue": await engine(nursery)}
    server = await gateway_for(nursery, fakes)
    async with client_connect(server.url) as conn, conn.generate(
            [{"role": "user", "content": "count"}], max_tokens=10, model="fake-model") as stream:
        assert await stream.text() == numbered(0, 10)
    assert stream.failovers == [("dies", "rescue")] and stream.model == "fake-model"
    assert stream.usage is not None and stream.usage["completion_tokens"] == 10


async def test_a_stalled_engine_is_continued_after_the_token_timeout(nursery: trio.Nursery) -> None:
    def stalls(body: dict[str, Any]) -> Script:
        return Script(tokens=numbered_script(body).tokens, stall_after=3, finish_reason="length")

    fakes = {"stalls": await engine(nursery, stalls), "rescue": await engine(nursery)}
    server = await gateway_for(nursery, fakes, token_timeout=0.3)
    events = await ask(server, max_tokens=6)
    assert text_of(events) == numbered(0, 6) and events[-1]["type"] == "done"
    with trio.fail_after(5):
        await fakes["stalls"].wait_idle()  # the stalled request was closed, so a real engine aborts it
    assert fakes["stalls"].requests[0].disconnected_at is not None


async def test_an_in_stream_engine_error_is_continued(nursery: trio.Nursery) -> None:
    def errs(body: dict[str, Any]) -> Script:
        return Script(tokens=numbered_script(body).tokens, stream_error_after=4, finish_reason="length")

    fakes = {"errs": await engine(nursery, errs), "rescue": await engine(nursery)}
    server = await gateway_for(nursery, fakes)
    events = await ask(server, max_tokens=9)
    assert text_of(events) == numbered(0, 9) and events[-1]["type"] == "done"
    assert [e["type"] for e in events].count("failover") == 1


@pytest.mark.parametrize("how", ["continue_off", "engine_rejects_fields"])
async def test_no_continuation_where_an_engine_cannot_take_part(nursery: trio.Nursery, how: str) -> None:
    def dies(body: dict[str, Any]) -> Script:
        return Script(tokens=numbered_script(body).tokens, drop_after=3, finish_reason="length")

    fakes = {"dies": await engine(nursery, dies),
             "other": await engine(nursery, accepts_continue=how != "engine_rejects_fields")}
    continues = {"dies": False} if how == "continue_off" else {}
    server = await gateway_for(nursery, fakes, continues=continues)
    events = await ask(server, max_tokens=8)
    assert text_of(events) == numbered(0, 3)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_disconnected"
    assert not [e for e in events if e["type"] == "failover"] or how == "engine_rejects_fields"
    assert len(fakes["other"].requests) == 0  # the rejecting engine answered 400 before any record


async def test_no_continuation_once_a_tool_call_was_relayed(nursery: trio.Nursery) -> None:
    def calls(body: dict[str, Any]) -> Script:
        return Script(deltas=(ToolDelta(0, '{"a":', "c1", "f"), ToolDelta(0, " 1")), drop_after=1)

    fakes = {"calls": await engine(nursery, calls), "other": await engine(nursery)}
    server = await gateway_for(nursery, fakes)
    events = await ask(server, max_tokens=8)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_disconnected"
    assert len(fakes["other"].requests) == 0


async def test_each_request_goes_to_an_engine_of_its_model(nursery: trio.Nursery) -> None:
    fakes = {"small": await engine(nursery, model="small-model"),
             "big": await engine(nursery, models=("big-model", "big-model-lora"))}
    server = await gateway_for(nursery, fakes)
    for model, name in (("big-model", "big"), ("small-model", "small"), ("big-model-lora", "big")):
        events = await ask(server, model=model, max_tokens=2)
        assert events[0]["model"] == model and events[-1]["type"] == "done"
        assert fakes[name].requests[-1].body["model"] == model
    default = await ask(server, max_tokens=2)  # none named: the first engine's first model
    assert default[0]["model"] == "small-model"
    unknown = await ask(server, model="gpt-9", max_tokens=2)
    assert unknown[-1]["type"] == "error" and unknown[-1]["code"] == "model_not_found"
    assert unknown[-1]["param"] == "model"
    for model in ("small-model", "big-model", "big-model-lora"):
        assert model in unknown[-1]["message"]
    async with connect(server) as ws:
        await send(ws, {"type": "models", "id": "m"})
        listing = await recv(ws)
    assert listing == {"type": "models", "id": "m", "data": [
        {"id": "small-model", "engines": ["small"], "healthy": True},
        {"id": "big-model", "engines": ["big"], "healthy": True},
        {"id": "big-model-lora", "engines": ["big"], "healthy": True},
    ]}


async def test_readiness_needs_a_healthy_engine_for_every_model(nursery: trio.Nursery) -> None:
    fakes = {"a": await engine(nursery, model="m1"), "b": await engine(nursery, model="m1"),
             "c": await engine(nursery, model="m2")}
    server = await gateway_for(nursery, fakes, probe_interval=0.05)
    with trio.fail_after(5):
        while (await http_get(server, "/readyz")).status_code != 200:
            await trio.sleep(0.05)
    fakes["a"].refuse_models = True  # m1 still has b
    await trio.sleep(0.6)  # the ready answer is shared for a moment
    assert (await http_get(server, "/readyz")).status_code == 200
    fakes["c"].refuse_models = True  # m2 has no engine left
    await trio.sleep(0.6)
    answer = await http_get(server, "/readyz")
    assert answer.status_code == 503 and answer.text == "model m2: no healthy engine\n"
    metrics = (await http_get(server, "/metrics")).text
    assert 'trioai_engine_healthy{engine="c"} 0.0' in metrics
    assert 'trioai_engine_healthy{engine="b"} 1.0' in metrics


async def test_routing_avoids_an_engine_whose_own_queue_is_long(nursery: trio.Nursery) -> None:
    fakes = {"queued": await engine(nursery), "idle": await engine(nursery)}
    fakes["queued"].publish_metrics = fakes["idle"].publish_metrics = True
    fakes["queued"].waiting = 40  # other gateways' requests wait there
    server = await gateway_for(nursery, fakes)
    with trio.fail_after(5):
        while "queued" not in (await http_get(server, "/metrics")).text or not await loaded(server, "queued"):
            await trio.sleep(0.05)
    for i in range(5):
        await ask(server, rid=i, max_tokens=2)
    assert len(fakes["queued"].requests) == 0 and len(fakes["idle"].requests) == 5


async def loaded(server: RunningServer, name: str) -> bool:
    for line in (await http_get(server, "/metrics")).text.splitlines():
        if line.startswith(f'trioai_engine_load{{engine="{name}"}}'):
            return float(line.split()[-1]) > 1.0
    return False


async def test_a_connection_stays_on_its_engine_while_loads_are_close(nursery: trio.Nursery) -> None:
    slow: ScriptFor = lambda body: Script(tokens=("x ",) * 3, delay=0.2 if body["max_tokens"] == 3 else 0)  # noqa: E731
    fakes = {"first": await engine(nursery, slow), "second": await engine(nursery, slow)}
    server = await gateway_for(nursery, fakes, capacities={"first": 4, "second": 4})
    async with connect(server) as other, connect(server) as ws:
        await send(other, chat("hold", max_tokens=3, id="hold"))  # keeps "first" busy for a moment
        with trio.fail_after(5):
            while not fakes["first"].active:
                await trio.sleep(0.01)
        await send(ws, chat("one", max_tokens=2, id=1))
        await collect_until_terminal(ws, {1})
        assert len(fakes["second"].requests) == 1  # the less loaded engine
        await collect_until_terminal(other, {"hold"})
        for i in range(2, 5):  # loads equal again: without locality "first" would win the tie
            await send(ws, chat("more", max_tokens=2, id=i))
            await collect_until_terminal(ws, {i})
    assert len(fakes["second"].requests) == 4 and len(fakes["first"].requests) == 1


async def test_per_engine_request_counts_in_metrics(nursery: trio.Nursery) -> None:
    refused: ScriptFor = lambda body: Script(status=503)  # noqa: E731
    fakes = {"down": await engine(nursery, refused), "up": await engine(nursery)}
    server = await gateway_for(nursery, fakes)
    await ask(server, max_tokens=2)
    text = (await http_get(server, "/metrics")).text
    assert 'trioai_engine_requests_total{engine="down",outcome="failed"} 1.0' in text
    assert 'trioai_engine_requests_total{engine="up",outcome="ok"} 1.0' in text
    assert 'trioai_failovers_total{kind="retry"} 1.0' in text


@pytest.mark.parametrize(("options", "toml", "expected"), [
    (("--upstream", "http://127.0.0.1:9/v1", "--upstream", "http://127.0.0.1:9/v1"), "", "names an engine twice"),
    (("--upstream", "ftp://127.0.0.1:9/v1"), "", "must be http:// or https:// base URLs"),
    ((), '[[engines]]\nurl = "http://127.0.0.1:9/v1"\nweight = 0\n', "weight must be a positive number"),
    ((), '[[engines]]\nurl = "http://127.0.0.1:9/v1"\nspeed = 3\n', "unknown key 'speed'"),
    (("--upstream", "http://127.0.0.1:9/v1"), '[[engines]]\nurl = "http://127.0.0.1:8/v1"\nname = "127.0.0.1:9"\n',
     "two engines are named '127.0.0.1:9'"),
])
async def test_bad_engine_entries_stop_the_server_at_start(tmp_path: Any, options: tuple[str, ...], toml: str,
                                                           expected: str) -> None:
    config = tmp_path / "trioai.toml"
    config.write_text(toml)
    result = await trio.run_process([sys.executable, "-m", "trioai", "serve", "--port", "0", "--config", str(config),
                                     *options], check=False, capture_stderr=True)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert expected in stderr and "Traceback" not in stderr, stderr
