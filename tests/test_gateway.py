"""Socket-level tests: a real trioai server, real WebSocket clients, a fake engine over real HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from trioai.config import Settings
from trioai.enginepool import DISCOVERY_RETRY as MODEL_LOOKUP_RETRY
from trioai.enginepool import EnginePool
from trioai.errors import ErrorCode, UpstreamError
from trioai.fake_upstream import FakeUpstream, Script
from trioai.gateway import Gateway
from trioai.server import RunningServer
from trioai.transport import H11Transport

from .conftest import StartGateway
from .helpers import (
    chat,
    collect_until_terminal,
    connect,
    count_tasks,
    echo_tokens,
    recv,
    send,
    settle,
)


async def test_plain_seed_format_client(gateway: RunningServer) -> None:
    """A client written for message → start/token/done and cancel → cancelled works unchanged."""
    async with connect(gateway) as ws:
        await ws.send_message(
            '{"type":"message","messages":[{"role":"user","content":"alpha beta gamma"}],"max_tokens":7}'
        )
        start = await recv(ws)
        assert start["type"] == "start"
        text = ""
        while (event := await recv(ws))["type"] == "token":
            text += event["content"]
        assert event["type"] == "done"
        assert text == "".join(echo_tokens("alpha beta gamma", 7))
        assert event["finish_reason"] == "length"
        assert event["usage"]["completion_tokens"] == 7
        assert event["usage"]["source"] == "engine"
        assert isinstance(event["usage"]["prompt_tokens"], int)
        assert event["ttft_ms"] >= 0


async def test_plain_client_cancel(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=tuple(f"w{i} " for i in range(1000)), delay=0.01)
    server = await start_gateway()
    async with connect(server) as ws:
        await ws.send_message('{"type":"message","messages":[{"role":"user","content":"x"}],"max_tokens":1000}')
        assert (await recv(ws))["type"] == "start"
        assert (await recv(ws))["type"] == "token"
        await ws.send_message('{"type":"cancel"}')
        while (event := await recv(ws))["type"] == "token":
            pass
        assert event["type"] == "cancelled"
    await upstream.wait_idle()
    assert upstream.requests[0].disconnected_at is not None
    assert not upstream.requests[0].completed


async def test_three_multiplexed_streams_arrive_complete_and_in_order(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    def script(body: dict[str, Any]) -> Script:
        words = body["messages"][-1]["content"].split()
        return Script(tokens=tuple(f"{w} " for w in words), delay=0.002)

    upstream.script = script
    server = await start_gateway()
    prompts = {
        "a": " ".join(f"a{i}" for i in range(60)),
        "b": " ".join(f"b{i}" for i in range(45)),
        7: " ".join(f"c{i}" for i in range(30)),
    }
    async with connect(server) as ws:
        for rid, prompt in prompts.items():
            await send(ws, chat(prompt, max_tokens=100, id=rid))
        events = await collect_until_terminal(ws, set(prompts))
    interleaved = False
    for rid, prompt in prompts.items():
        stream = events[rid]
        assert stream[0] == {"type": "start", "id": rid, "model": "fake-model"}
        assert stream[-1]["type"] == "done", stream[-1]
        text = "".join(e["content"] for e in stream if e["type"] == "token")
        assert text == "".join(f"{w} " for w in prompt.split())
        interleaved |= len([e for e in stream if e["type"] == "token"]) > 1
    assert interleaved
    assert upstream.active == 0


async def test_cancel_one_of_two_streams(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    def script(body: dict[str, Any]) -> Script:
        slow = body["messages"][-1]["content"] == "slow"
        return Script(tokens=tuple(f"t{i} " for i in range(400 if slow else 40)), delay=0.005)

    upstream.script = script
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("slow", max_tokens=400, id="slow"))
        await send(ws, chat("fast", max_tokens=40, id="fast"))
        seen_slow_token = False
        events: dict[str, list[dict[str, Any]]] = {"slow": [], "fast": []}
        while not seen_slow_token:
            event = await recv(ws)
            events[event["id"]].append(event)
            seen_slow_token = event["id"] == "slow" and event["type"] == "token"
        await send(ws, {"type": "cancel", "id": "slow"})
        rest = await collect_until_terminal(ws, {"slow", "fast"})
    for rid in events:
        events[rid] += rest.get(rid, [])
    assert events["slow"][-1] == {"type": "cancelled", "id": "slow"}
    assert events["fast"][-1]["type"] == "done"
    fast_text = "".join(e["content"] for e in events["fast"] if e["type"] == "token")
    assert fast_text == "".join(f"t{i} " for i in range(40))
    await upstream.wait_idle()
    slow_request = next(r for r in upstream.requests if r.body["messages"][-1]["content"] == "slow")
    assert slow_request.disconnected_at is not None
    assert slow_request.chunks_sent < 400


async def test_cancel_is_immediate_and_closes_the_upstream_stream(
    start_gateway: StartGateway, upstream: FakeUpstream, autojump_clock: trio.testing.MockClock
) -> None:
    """With the engine pausing 10 s between tokens, cancel is acknowledged without waiting for it."""
    upstream.script = lambda body: Script(tokens=("a ", "b ", "c "), delay=10.0)
    server = await start_gateway(token_timeout=100.0)
    async with connect(server) as ws:
        await send(ws, chat("x", id=1))
        assert (await recv(ws))["type"] == "start"
        assert (await recv(ws, timeout=60))["content"] == "a "
        cancel_sent = trio.current_time()
        await send(ws, {"type": "cancel", "id": 1})
        assert await recv(ws) == {"type": "cancelled", "id": 1}
        acked = trio.current_time()
        await upstream.requests[0].closed.wait()
    assert acked - cancel_sent < 1.0
    disconnected_at = upstream.requests[0].disconnected_at
    assert disconnected_at is not None
    assert disconnected_at - cancel_sent < 1.0
    assert upstream.requests[0].chunks_sent == 1


async def test_client_disconnect_aborts_the_upstream(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=tuple(f"t{i} " for i in range(10_000)), delay=0.01)
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("x", id="a"))
        await send(ws, chat("y", id="b"))
        for _ in range(6):
            await recv(ws)
    with trio.fail_after(5):
        await upstream.wait_idle()
    assert len(upstream.requests) == 2
    assert all(r.disconnected_at is not None and not r.completed for r in upstream.requests)
    await settle()
    assert server.server.open_connections == 0
    assert server.gateway.admission.running == 0


async def test_queue_positions_under_a_small_limiter(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    release = trio.Event()

    def script(body: dict[str, Any]) -> Script:
        return Script(tokens=("x ",) * 3, delay=0.05)

    upstream.script = script
    server = await start_gateway(max_concurrency=1)
    async with connect(server) as ws:
        for rid in ("first", "second", "third"):
            await send(ws, chat("q", id=rid))
        events = await collect_until_terminal(ws, {"first", "second", "third"})
    release.set()
    positions = {rid: [e["position"] for e in evs if e["type"] == "queued"] for rid, evs in events.items()}
    assert positions["first"] == []
    assert positions["second"] == [1]
    assert positions["third"] == [2, 1]
    for evs in events.values():
        assert evs[-1]["type"] == "done"
    # Nobody ran concurrently: each request started upstream after the previous one ended.
    assert [r.body["messages"][0]["content"] for r in upstream.requests] == ["q", "q", "q"]
    assert server.gateway.admission.limiter.statistics().tasks_waiting == 0


async def test_queued_request_can_be_cancelled(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 20, delay=0.02)
    server = await start_gateway(max_concurrency=1)
    async with connect(server) as ws:
        await send(ws, chat("q", id="running"))
        await send(ws, chat("q", id="waiting"))
        events: list[dict[str, Any]] = []
        while not any(e["type"] == "queued" for e in events):
            events.append(await recv(ws))
        await send(ws, {"type": "cancel", "id": "waiting"})
        rest = await collect_until_terminal(ws, {"running", "waiting"})
    assert rest["waiting"][-1] == {"type": "cancelled", "id": "waiting"}
    assert rest["running"][-1]["type"] == "done"
    assert len(upstream.requests) == 1


FAILURES = [
    pytest.param(
        Script(status=400, error_message="This model's maximum context length is 2048 tokens", error_param="messages"),
        "invalid_request",
        "maximum context length is 2048",
        id="http-400-too-long",
    ),
    pytest.param(Script(status=500, error_message="Traceback: secret internals"), "upstream_error", "HTTP 500",
                 id="http-500"),
    pytest.param(Script(status=503), "upstream_unavailable", "HTTP 503", id="http-503"),
    pytest.param(Script(status=429), "upstream_overloaded", "HTTP 429", id="http-429"),
    pytest.param(Script(tokens=("a ", "b ", "c "), stream_error_after=2, error_message="engine exploded"),
                 "upstream_error", "engine exploded", id="in-stream-error"),
    pytest.param(Script(tokens=("a ", "b ", "c "), drop_after=2), "upstream_disconnected", "", id="dropped"),
    pytest.param(Script(tokens=("a ", "b "), send_done=False), "upstream_disconnected", "[DONE]", id="no-done"),
    pytest.param(Script(tokens=("a ", "b "), stall_after=1), "upstream_timeout", "next token", id="stall"),
    pytest.param(Script(tokens=("a ",), headers_delay=30), "upstream_timeout", "", id="no-answer"),
    pytest.param(Script(tokens=("a ",), raw_lines=(b"data: {not json\n\n",)), "upstream_error", "not JSON",
                 id="garbage-sse"),
    pytest.param(Script(tokens=("a ",), raw_lines=(b"data: " + b"x" * (1 << 20) + b"\n\n",)), "upstream_error",
                 "longer than", id="over-long-line"),
    pytest.param(Script(tokens=("a ",), stall_after=0), "upstream_timeout", "first token", id="stall-after-headers"),
]


@pytest.mark.parametrize(("script", "code", "message_part"), FAILURES)
async def test_upstream_failure_modes(
    start_gateway: StartGateway, upstream: FakeUpstream, script: Script, code: str, message_part: str
) -> None:
    healthy = Script(tokens=tuple(f"h{i} " for i in range(20)), delay=0.02)
    upstream.script = lambda body: healthy if body["messages"][-1]["content"] == "healthy" else script
    server = await start_gateway(first_token_timeout=1.0, token_timeout=0.5, upstream_api_key="sk-SECRET-KEY")
    async with connect(server) as ws:
        await send(ws, chat("healthy", id="h", max_tokens=20))
        await send(ws, chat("x", id="r"))
        both = await collect_until_terminal(ws, {"r", "h"})
        events = both["r"]
        # The failure touched no other stream.
        assert "".join(e["content"] for e in both["h"] if e["type"] == "token") == "".join(
            f"h{i} " for i in range(20))
        assert both["h"][-1]["type"] == "done"
        error = events[-1]
        assert error["type"] == "error", events
        assert error["code"] == code
        assert message_part in error["message"]
        assert "SECRET" not in json.dumps(events) and "secret internals" not in json.dumps(events)
        # Tokens that arrived before the failure were delivered, in order.
        tokens = "".join(e["content"] for e in events if e["type"] == "token")
        assert tokens in ("", "a ", "a b ")
        # The connection is still usable afterwards.
        upstream.script = lambda body: Script(tokens=("ok",))
        await send(ws, chat("again", id="r2"))
        assert (await collect_until_terminal(ws, {"r2"}))["r2"][-1]["type"] == "done"
    assert all(r.headers["authorization"] == "Bearer sk-SECRET-KEY" for r in upstream.requests)


async def test_cookies_an_engine_sets_are_not_sent_back(gateway: RunningServer, upstream: FakeUpstream) -> None:
    """The gateway serves many users over one engine client: a cookie one answer set must not
    travel with anyone's next request (an HTTP client's cookie jar would do exactly that)."""
    upstream.script = lambda body: Script(tokens=("a ",), response_headers=(("set-cookie", "session=alice"),))
    for user in ("alice", "bob"):
        async with connect(gateway) as ws:
            await send(ws, chat(user, id=user))
            assert (await collect_until_terminal(ws, {user}))[user][-1]["type"] == "done"
    assert len(upstream.requests) == 2
    assert all("cookie" not in r.headers for r in upstream.requests)


async def test_upstream_refusing_connections(start_gateway: StartGateway) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = await start_gateway(upstream=f"http://127.0.0.1:{port}/v1", model="m")
    async with connect(server) as ws:
        await send(ws, chat("x", id="r"))
        events = (await collect_until_terminal(ws, {"r"}))["r"]
    assert [e["type"] for e in events] == ["start", "error"]
    assert events[-1]["code"] == "upstream_unavailable"


async def test_model_is_taken_from_the_engine_list(gateway: RunningServer, upstream: FakeUpstream) -> None:
    async with connect(gateway) as ws:
        await send(ws, chat("x"))
        assert (await recv(ws))["model"] == "fake-model"
        await collect_until_terminal(ws)
    assert upstream.requests[0].body["model"] == "fake-model"
    assert upstream.requests[0].body["stream"] is True
    assert upstream.requests[0].body["stream_options"] == {"include_usage": True}


async def test_sampling_fields_are_passed_through(gateway: RunningServer, upstream: FakeUpstream) -> None:
    async with connect(gateway) as ws:
        await send(ws, chat("x", temperature=0.5, top_p=0.9, stop=["\n"], seed=3, presence_penalty=0.1,
                            frequency_penalty=-0.2, unknown_field="ignored"))
        await collect_until_terminal(ws)
    body = upstream.requests[0].body
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["stop"] == ["\n"] and body["seed"] == 3
    assert body["presence_penalty"] == 0.1 and body["frequency_penalty"] == -0.2
    assert "unknown_field" not in body and body["max_tokens"] == 5


async def test_usage_is_counted_when_the_engine_sends_none(gateway: RunningServer, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("a", "b", "c"), usage=False)
    async with connect(gateway) as ws:
        await send(ws, chat("x"))
        done = (await collect_until_terminal(ws)).popitem()[1][-1]
    assert done["usage"] == {"prompt_tokens": None, "completion_tokens": 3, "total_tokens": None, "source": "gateway"}


BAD_FRAMES = [
    pytest.param("not json", "invalid_json", id="not-json"),
    pytest.param("[" * 50_000, "invalid_json", id="deeply-nested"),
    pytest.param("42", "invalid_request", id="not-an-object"),
    pytest.param('{"type":"dance"}', "unknown_type", id="unknown-type"),
    pytest.param('{"messages":[]}', "invalid_request", id="no-type"),
    pytest.param('{"type":"message"}', "invalid_request", id="no-messages"),
    pytest.param('{"type":"message","messages":"hi"}', "invalid_request", id="messages-not-list"),
    pytest.param('{"type":"message","messages":[{"role":"user","content":1}]}', "invalid_request", id="content-int"),
    pytest.param('{"type":"message","messages":[{"role":"user","content":"x"}],"max_tokens":"9"}',
                 "invalid_request", id="max-tokens-string"),
    pytest.param('{"type":"message","messages":[{"role":"user","content":"x"}],"max_tokens":10000000}',
                 "invalid_request", id="max-tokens-huge"),
    pytest.param('{"type":"message","messages":[{"role":"user","content":"x"}],"max_tokens":' + "9" * 5000 + "}",
                 "invalid_json", id="max-tokens-5000-digits"),
    pytest.param('{"type":"message","messages":[{"role":"user","content":"\\ud800"}]}', "invalid_request",
                 id="lone-surrogate"),
    pytest.param('{"type":"message","id":true,"messages":[{"role":"user","content":"x"}]}', "invalid_request",
                 id="id-bool"),
    pytest.param(b"\x00\x01binary", "unsupported_frame", id="binary-frame"),
    pytest.param('{"type":"cancel","id":"nope"}', "unknown_id", id="cancel-unknown-id"),
    pytest.param('{"type":"cancel"}', "nothing_to_cancel", id="cancel-nothing"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_input_gets_an_error_and_the_connection_stays_usable(
    gateway: RunningServer, frame: str | bytes, code: str
) -> None:
    async with connect(gateway) as ws:
        await ws.send_message(frame)
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["code"] == code
        assert error["message"]
        await send(ws, chat("still works", max_tokens=2))
        events = await collect_until_terminal(ws)
        assert next(iter(events.values()))[-1]["type"] == "done"


async def test_error_carries_the_request_id_when_valid(gateway: RunningServer) -> None:
    async with connect(gateway) as ws:
        await send(ws, {"type": "message", "id": "mine", "messages": [], "max_tokens": 3})
        error = await recv(ws)
    assert error == {
        "type": "error", "id": "mine", "code": "invalid_request", "param": "messages",
        "message": "field 'messages' must be a non-empty array",
    }


async def test_too_many_streams_and_duplicate_ids(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 1000, delay=0.01)
    server = await start_gateway(max_streams_per_connection=2)
    async with connect(server) as ws:
        await send(ws, chat("x", id="a"))
        await send(ws, chat("x", id="a"))
        await send(ws, chat("x", id="b"))
        await send(ws, chat("x", id="c"))
        errors: list[dict[str, Any]] = []
        while len(errors) < 2:
            event = await recv(ws)
            if event["type"] == "error":
                errors.append(event)
        assert [(e["id"], e["code"]) for e in errors] == [("a", "duplicate_id"), ("c", "too_many_streams")]
        await send(ws, {"type": "cancel"})
        events = await collect_until_terminal(ws, {"a", "b"})
        assert {events[r][-1]["type"] for r in ("a", "b")} == {"cancelled"}


async def test_ping_pong(gateway: RunningServer) -> None:
    async with connect(gateway) as ws:
        await send(ws, {"type": "ping", "id": 5})
        assert await recv(ws) == {"type": "pong", "id": 5}
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong", "id": None}


async def test_other_paths_are_rejected_at_the_handshake(gateway: RunningServer) -> None:
    url = gateway.url.replace("/ws/chat", "/elsewhere")
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url):
            pass
    assert info.value.status_code == 404


async def test_query_string_on_chat_path_is_accepted(gateway: RunningServer) -> None:
    async with open_websocket_url(gateway.url + "?client=x") as ws:
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"


async def test_oversized_frame_closes_with_1009(start_gateway: StartGateway) -> None:
    server = await start_gateway(max_message_size=4096)
    async with connect(server) as ws:
        await send(ws, chat("x" * 10_000))
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.reason is not None and info.value.reason.code == 1009


async def test_nothing_leaks_after_connections_end(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 500, delay=0.005)
    server = await start_gateway(max_concurrency=2)
    await settle()
    baseline = count_tasks()
    for round_ in range(3):
        async with connect(server) as ws:
            for i in range(4):
                await send(ws, chat("x", id=i))
            await recv(ws)
            await recv(ws)
            if round_ == 1:
                await send(ws, {"type": "cancel"})
                await collect_until_terminal(ws, {0, 1, 2, 3})
        # leaving the block closes the connection with generations still running or queued
    with trio.fail_after(5):
        await upstream.wait_idle()
    await settle()
    assert count_tasks() == baseline
    assert server.server.open_connections == 0
    stats = server.gateway.admission.limiter.statistics()
    assert (stats.borrowed_tokens, stats.tasks_waiting) == (0, 0)
    assert server.gateway.admission.queued == 0


async def test_finished_streams_leave_their_engine_connection_for_the_next(
    gateway: RunningServer, upstream: FakeUpstream
) -> None:
    """Read to the end of the HTTP body after [DONE]: the next request needs no new TCP connection."""
    async with connect(gateway) as ws:
        for i in range(3):
            await send(ws, chat("a b", id=i))
            events = await collect_until_terminal(ws, {i})
            assert events[i][-1]["type"] == "done"
        assert upstream.connections == 1
        await send(ws, chat("long", max_tokens=2000, id="c"))
        await recv(ws)  # start
        await recv(ws)  # first token
        await send(ws, {"type": "cancel", "id": "c"})
        assert (await collect_until_terminal(ws, {"c"}))["c"][-1]["type"] == "cancelled"
        with trio.fail_after(5):
            await upstream.requests[-1].closed.wait()
        assert upstream.requests[-1].disconnected_at is not None  # a cancel still closes its connection
        await send(ws, chat("a b", id=9))
        assert (await collect_until_terminal(ws, {9}))[9][-1]["type"] == "done"
        assert upstream.connections == 2


async def test_the_sweeper_closes_engine_connections_left_idle(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    server = await start_gateway(ping_interval=0.2)  # sweeps every 50 ms
    transport = server.gateway.upstream.transport
    assert isinstance(transport, H11Transport)
    transport.keepalive_expiry = 0.1
    async with connect(server) as ws:
        await send(ws, chat("a b", id=1))
        assert (await collect_until_terminal(ws, {1}))[1][-1]["type"] == "done"
    with trio.fail_after(5):
        while transport.connections_open:
            await trio.sleep(0.02)
    assert upstream.connections == 1


class HangingModelList:
    """An upstream whose model list takes ``seconds`` and then fails, counting the calls."""

    base_url = "http://127.0.0.1:9/v1"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    async def list_models(self) -> list[str]:
        self.calls += 1
        await trio.sleep(self.seconds)
        raise UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, "engine did not list its models in time", retryable=True)


async def test_one_model_lookup_is_shared_by_every_waiting_request(autojump_clock: trio.abc.Clock) -> None:
    """The k-th of several requests waited k lookup timeouts behind a lock; now they share one lookup."""
    upstream = HangingModelList(10.0)
    settings = Settings(upstream="http://127.0.0.1:9/v1")
    gateway = Gateway(settings, EnginePool.single_engine(settings, upstream))  # type: ignore[arg-type]
    failed_at: list[float] = []

    async def request() -> None:
        with pytest.raises(UpstreamError):
            await gateway.model()
        failed_at.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(request)
    assert upstream.calls == 1
    assert [round(t - start) for t in failed_at] == [10] * 5
    # The failure is shared only briefly: a request soon after asks the engine again.
    await trio.sleep(MODEL_LOOKUP_RETRY + 0.1)
    with pytest.raises(UpstreamError):
        await gateway.model()
    assert upstream.calls == 2


async def test_a_cancel_that_crosses_the_done_gets_no_error(gateway: RunningServer) -> None:
    """The terminal event is the answer to a late cancel; nothing for that id may follow it."""
    async with connect(gateway) as ws:
        await send(ws, chat("hello there", max_tokens=2, id="late"))
        events = await collect_until_terminal(ws, {"late"})
        assert events["late"][-1]["type"] == "done"
        await send(ws, {"type": "cancel", "id": "late"})
        await send(ws, {"type": "ping", "id": 1})
        assert await recv(ws) == {"type": "pong", "id": 1}
        await send(ws, {"type": "cancel", "id": "never-seen"})  # an id that was never active still gets one
        error = await recv(ws)
        assert (error["type"], error["code"], error["id"]) == ("error", "unknown_id", "never-seen")
