"""trioai.client against a real server: text, usage, several streams at once, cancel, errors, keys."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

import trioai.client
from trioai.client import (
    ConnectFailed,
    ConnectionLost,
    GenerationError,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from trioai.fake_upstream import Delta, FakeUpstream, Script, ToolDelta
from trioai.server import RunningServer

from .conftest import StartGateway
from .helpers import echo_tokens
from .proxy import CutProxy


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_generate_text_and_usage(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    async with (
        trioai.client.connect(server.url) as conn,
        conn.generate(user("red green blue"), max_tokens=7, temperature=0.2) as stream,
    ):
        pieces = [piece async for piece in stream]
    assert "".join(pieces) == "".join(echo_tokens("red green blue", 7))
    assert stream.finish_reason == "length"
    assert stream.usage is not None and stream.usage["completion_tokens"] == 7
    assert stream.ttft_ms is not None and stream.model == "fake-model"
    assert not stream.cancelled


async def test_several_streams_at_once_on_one_connection(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(
        tokens=tuple(f"{body['messages'][-1]['content']}{i} " for i in range(body["max_tokens"])), delay=0.002
    )
    server = await start_gateway()
    results: dict[str, str] = {}
    async with trioai.client.connect(server.url) as conn:

        async def ask(name: str) -> None:
            async with conn.generate(user(name), max_tokens=50) as stream:
                results[name] = await stream.text()

        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c"):
                nursery.start_soon(ask, name)
    assert results == {name: "".join(f"{name}{i} " for i in range(50)) for name in "abc"}


async def test_cancel_ends_the_stream_and_the_engine_request(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 5000, delay=0.002)
    server = await start_gateway()
    async with trioai.client.connect(server.url) as conn:
        async with conn.generate(user("go"), max_tokens=5000) as stream:
            received = 0
            async for piece in stream:
                received += piece.count(" ")
                if received >= 5:
                    await stream.cancel()
        assert stream.cancelled
        assert received < 5000
        # Leaving the block early also cancels on the server.
        async with conn.generate(user("go"), max_tokens=5000) as early:
            async for _ in early:
                break
        assert early.cancelled
    for record in upstream.requests:
        with trio.fail_after(5):
            await record.closed.wait()
        assert record.disconnected_at is not None


async def test_error_events_raise_generation_error(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(status=400, error_message="prompt too long", error_param="messages")
    server = await start_gateway()
    async with trioai.client.connect(server.url) as conn:
        with pytest.raises(GenerationError) as caught:
            async with conn.generate(user("x")) as stream:
                await stream.text()
        assert caught.value.code == "invalid_request"
        assert "prompt too long" in caught.value.message
        with pytest.raises(GenerationError) as caught:
            async with conn.generate(user("x"), max_tokens=0) as stream:
                await stream.text()
        assert (caught.value.code, caught.value.param) == ("invalid_request", "max_tokens")


async def test_queue_position_is_visible(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 30, delay=0.01)
    server = await start_gateway(max_concurrency=1)
    positions: list[int | None] = []
    async with trioai.client.connect(server.url) as conn, conn.generate(user("first"), max_tokens=30) as first:
        async for _ in first:
            break  # running now
        async with conn.generate(user("second"), max_tokens=30) as second:
            with trio.fail_after(5):
                while second.queue_position is None:
                    await trio.sleep(0.005)
            positions.append(second.queue_position)
            await first.cancel()
            assert (await second.text()) == "x " * 30
    assert positions == [1]


async def test_api_key(start_gateway: StartGateway, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    server = await start_gateway(api_keys_file=str(keys))
    with pytest.raises(ConnectFailed) as caught:
        async with trioai.client.connect(server.url):
            pass
    assert caught.value.status == 401
    async with (
        trioai.client.connect(server.url, api_key="k1") as conn,
        conn.generate(user("a b"), max_tokens=2) as stream,
    ):
        assert await stream.text() == "a b "


async def test_connection_lost_mid_stream(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 1000, delay=0.01)
    server = await start_gateway()
    async def read_while_closing(stream: trioai.client.Stream, conn: trioai.client.Connection) -> None:
        async for _ in stream:
            await conn.ws.aclose()

    async with (
        trioai.client.connect(server.url) as conn,
        conn.generate(user("x"), max_tokens=1000) as stream,
    ):
        with pytest.raises(ConnectionLost):
            await read_while_closing(stream, conn)


# --- Against a scripted server: the chat-completions events of docs/protocol.md, exactly. -------------

ScriptItem = dict[str, Any] | float | trio.Event
"""What a scripted server does: send an event (its ``id`` filled in), sleep (seconds), or wait for an Event."""


class ScriptedServer:
    """A tiny WebSocket server on 127.0.0.1 that answers each ``message`` with the events ``script`` gives.

    ``script(message)`` returns the items for that request; every received frame is kept in ``received``.
    A ``cancel`` with an id stops that script and is answered ``cancelled``. Also used by
    tests/test_chat.py and tests/test_browser.py.
    """

    def __init__(self, script: Callable[[dict[str, Any]], Sequence[ScriptItem]]) -> None:
        self.script = script
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._playing: dict[Any, trio.CancelScope] = {}

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve_websocket, self._handle, "127.0.0.1", 0, None,
                                                 handler_nursery=nursery))
            self.port = server.port
            task_status.started()

    async def _handle(self, request: WebSocketRequest) -> None:
        subprotocol = "trioai.v1" if "trioai.v1" in request.proposed_subprotocols else None
        ws = await request.accept(subprotocol=subprotocol)
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    event = json.loads(await ws.get_message())
                    self.received.append(event)
                    if event.get("type") == "message":
                        nursery.start_soon(self._play, ws, event)
                    elif event.get("type") == "cancel" and event.get("id") in self._playing:
                        self._playing.pop(event["id"]).cancel()
                        await ws.send_message(json.dumps({"type": "cancelled", "id": event["id"]}))
            except ConnectionClosed:
                nursery.cancel_scope.cancel()

    async def _play(self, ws: WebSocketConnection, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed), trio.CancelScope() as scope:
            self._playing[message.get("id")] = scope
            for item in self.script(message):
                if isinstance(item, trio.Event):
                    await item.wait()
                elif isinstance(item, float | int):
                    await trio.sleep(item)
                else:
                    await ws.send_message(json.dumps({**item, "id": message.get("id")}))
            self._playing.pop(message.get("id"), None)


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> ScriptedServer:
    """A scripted server; set ``.script`` in the test."""
    server = ScriptedServer(lambda message: [])
    await nursery.start(server.serve)
    return server


USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42, "source": "engine"}
WEATHER = '{"city": "Paris"}'
TIME = '{"tz": "CET"}'
DONE_TOOL_CALLS = {"type": "done", "finish_reason": "tool_calls", "usage": USAGE, "ttft_ms": 41.3,
                   "tokens_per_s": 88.2,
                   "tool_calls": [{"call_id": "call_7f3", "name": "get_weather", "arguments": WEATHER},
                                  {"call_id": "call_8a1", "name": "get_time", "arguments": TIME}]}


def rich_events() -> list[dict[str, Any]]:
    """A reasoning model that thinks, says a word and calls two functions, fragments interleaved."""
    return [
        {"type": "start", "model": "qwen3"},
        {"type": "reasoning", "content": "The user asks for"},
        {"type": "reasoning", "content": " the weather."},
        {"type": "token", "content": "Checking"},
        {"type": "token", "content": "."},
        {"type": "tool_call", "index": 0, "call_id": "call_7f3", "name": "get_weather", "arguments": '{"city": '},
        {"type": "tool_call", "index": 1, "call_id": "call_8a1", "name": "get_time", "arguments": '{"tz"'},
        {"type": "tool_call", "index": 0, "arguments": '"Paris"}'},
        {"type": "tool_call", "index": 1, "arguments": ': "CET"}'},
        DONE_TOOL_CALLS,
    ]


async def test_generate_passes_chat_fields_through(scripted: ScriptedServer) -> None:
    scripted.script = lambda message: [{"type": "start", "model": "m"}, {"type": "token", "content": "ok"},
                                       {"type": "done", "finish_reason": "stop", "usage": USAGE}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    fields: dict[str, Any] = {
        "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "response_format": {"type": "json_object"}, "logprobs": True,
        "top_logprobs": 2, "reasoning_effort": "low", "seed": 7, "stop": ["\n\n"],
    }
    async with trioai.client.connect(scripted.url) as conn:
        async with conn.generate(user("hi"), max_tokens=9, **fields) as stream:
            assert await stream.text() == "ok"
        with pytest.raises(TypeError, match="id"):
            async with conn.generate(user("hi"), id="mine"):
                pass
    [message] = [event for event in scripted.received if event["type"] == "message"]
    assert message == {"type": "message", "id": stream.id, "messages": user("hi"), "max_tokens": 9, **fields}


async def test_reasoning_tool_calls_and_typed_events(scripted: ScriptedServer) -> None:
    """Every event arrives before the stream is read: consecutive pieces of a kind come out joined."""
    scripted.script = lambda message: rich_events()
    async with trioai.client.connect(scripted.url) as conn, conn.generate(user("weather?")) as stream:
        with trio.fail_after(5):
            while not stream.finished:
                await trio.sleep(0.005)
        # Readable before a single event is consumed: the stream keeps its running state itself.
        assert stream.reasoning == "The user asks for the weather."
        events = [event async for event in stream.events()]
    assert events == [
        ReasoningDelta("The user asks for the weather."),
        TextDelta("Checking."),
        ToolCallDelta(0, '{"city": ', "call_7f3", "get_weather"),
        ToolCallDelta(1, '{"tz"', "call_8a1", "get_time"),
        ToolCallDelta(0, '"Paris"}'),
        ToolCallDelta(1, ': "CET"}'),
    ]
    assert stream.tool_calls == DONE_TOOL_CALLS["tool_calls"]
    assert stream.finish_reason == "tool_calls" and stream.usage == USAGE and stream.model == "qwen3"
    assert stream.logprobs == []  # not asked for
    assert not stream.cancelled


async def test_tool_calls_assemble_from_fragments_while_streaming(scripted: ScriptedServer) -> None:
    before_done = trio.Event()
    scripted.script = lambda message: [*rich_events()[:-1], before_done, DONE_TOOL_CALLS]
    async with trioai.client.connect(scripted.url) as conn, conn.generate(user("weather?")) as stream:
        with trio.fail_after(5):
            while len(stream.tool_calls) < 2 or stream.tool_calls[1]["arguments"] != TIME:
                await trio.sleep(0.005)
        assert stream.tool_calls == [{"call_id": "call_7f3", "name": "get_weather", "arguments": WEATHER},
                                     {"call_id": "call_8a1", "name": "get_time", "arguments": TIME}]
        assert not stream.finished and stream.finish_reason is None
        before_done.set()
        # Plain iteration still gives only the answer text: reasoning and calls are skipped.
        assert [text async for text in stream] == ["Checking."]
    assert stream.reasoning == "The user asks for the weather."
    assert stream.tool_calls == DONE_TOOL_CALLS["tool_calls"]


async def test_done_tool_calls_replace_the_fragments(scripted: ScriptedServer) -> None:
    """``done`` is authoritative: a client that missed or misjoined fragments still gets the whole calls."""
    final = [{"call_id": "call_1", "name": "lookup", "arguments": '{"q": "trio"}'}]
    scripted.script = lambda message: [
        {"type": "start", "model": "m"},
        {"type": "tool_call", "index": 0, "call_id": "call_1", "name": "lookup", "arguments": '{"q": "tr'},
        {"type": "done", "finish_reason": "tool_calls", "usage": USAGE, "tool_calls": final},
    ]
    async with trioai.client.connect(scripted.url) as conn, conn.generate(user("q")) as stream:
        assert await stream.text() == ""
    assert stream.tool_calls == final
    assert stream.finish_reason == "tool_calls"


async def test_events_in_order_as_they_stream(scripted: ScriptedServer) -> None:
    """Read live, one event at a time (no two consecutive events could be joined), in wire order."""
    scripted.script = lambda message: [
        {"type": "start", "model": "m"}, 0.01,
        {"type": "reasoning", "content": "think "}, 0.01,
        {"type": "token", "content": "say "}, 0.01,
        {"type": "reasoning", "content": "again "}, 0.01,
        {"type": "tool_call", "index": 0, "call_id": "c0", "name": "f", "arguments": "{}"}, 0.01,
        {"type": "token", "content": "end"}, 0.01,
        {"type": "done", "finish_reason": "stop", "usage": USAGE},
    ]
    seen: list[trioai.client.Event] = []
    reasoning_seen: list[str] = []
    async with trioai.client.connect(scripted.url) as conn, conn.generate(user("x")) as stream:
        async for event in stream.events():
            seen.append(event)
            reasoning_seen.append(stream.reasoning)
    assert seen == [ReasoningDelta("think "), TextDelta("say "), ReasoningDelta("again "),
                    ToolCallDelta(0, "{}", "c0", "f"), TextDelta("end")]
    assert reasoning_seen[0] == "think "  # the running state is there while the events stream
    assert stream.reasoning == "think again "
    assert stream.tool_calls == [{"call_id": "c0", "name": "f", "arguments": "{}"}]  # no done.tool_calls: fragments


async def test_logprobs_per_token(scripted: ScriptedServer) -> None:
    entry_a = {"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108], "top_logprobs": []}
    entry_b = {"token": "lo", "logprob": None, "bytes": [108, 111], "top_logprobs": []}
    scripted.script = lambda message: [
        {"type": "start", "model": "m"},
        {"type": "token", "content": "Hel", "logprobs": [entry_a]}, 0.02,
        {"type": "token", "content": "lo", "logprobs": [entry_b]},
        {"type": "done", "finish_reason": "stop", "usage": USAGE},
    ]
    async with trioai.client.connect(scripted.url) as conn, conn.generate(user("x"), logprobs=True) as stream:
        events = [event async for event in stream.events()]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello"
    assert [entry for e in events if isinstance(e, TextDelta) for entry in e.logprobs] == [entry_a, entry_b]
    assert stream.logprobs == [entry_a, entry_b]


async def test_old_style_stream_is_unchanged(scripted: ScriptedServer) -> None:
    """A server that never sends the new events: text, usage and the rest as before; the new fields empty."""
    old: list[ScriptItem] = [{"type": "start", "model": "m"}, {"type": "queued", "position": 1}, 0.01,
           {"type": "token", "content": "Hel"}, {"type": "token", "content": "lo"},
           {"type": "done", "finish_reason": "stop", "usage": USAGE, "ttft_ms": 3.0, "tokens_per_s": None}]
    scripted.script = lambda message: old
    async with trioai.client.connect(scripted.url) as conn:
        async with conn.generate(user("x")) as stream:
            assert await stream.text() == "Hello"
        assert (stream.finish_reason, stream.usage, stream.ttft_ms) == ("stop", USAGE, 3.0)
        assert (stream.reasoning, stream.tool_calls, stream.logprobs) == ("", [], [])
        async with conn.generate(user("x")) as typed:
            assert "".join([e.text async for e in typed.events() if isinstance(e, TextDelta)]) == "Hello"
        assert typed.finish_reason == "stop" and typed.tool_calls == []


async def test_events_raise_generation_error(scripted: ScriptedServer) -> None:
    scripted.script = lambda message: [
        {"type": "start", "model": "m"}, {"type": "reasoning", "content": "hm"},
        {"type": "error", "code": "upstream_error", "message": "the engine reported an error"},
    ]
    seen: list[trioai.client.Event] = []
    streams: list[trioai.client.Stream] = []

    async def read(conn: trioai.client.Connection) -> None:
        async with conn.generate(user("x")) as stream:
            streams.append(stream)
            async for event in stream.events():
                seen.append(event)

    async with trioai.client.connect(scripted.url) as conn:
        with pytest.raises(GenerationError) as caught:
            await read(conn)
    assert caught.value.code == "upstream_error"
    assert seen == [ReasoningDelta("hm")] and streams[0].reasoning == "hm"


# --- End to end: the real gateway in front of the fake engine scripting reasoning and tool calls. ------

WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
                 {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


def engine_rich_script(body: dict[str, Any]) -> Script:
    """The fake engine's version of rich_events(): think, say a word, call two functions."""
    return Script(deltas=(
        Delta(reasoning="The user asks for"), Delta(reasoning=" the weather."), Delta(content="Checking."),
        ToolDelta(0, None, "call_7f3", "get_weather"), ToolDelta(0, '{"city": '),
        ToolDelta(1, None, "call_8a1", "get_time"), ToolDelta(0, '"Paris"}'), ToolDelta(1, '{"tz": "CET"}'),
    ), finish_reason="tool_calls", delay=0.005)


async def test_end_to_end_reasoning_and_tool_calls(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = engine_rich_script
    server = await start_gateway()
    async with (
        trioai.client.connect(server.url) as conn,
        conn.generate(user("weather?"), max_tokens=50, tools=WEATHER_TOOLS, tool_choice="auto") as stream,
    ):
        events = [event async for event in stream.events()]
    kinds = [type(event) for event in events]
    assert [kind for i, kind in enumerate(kinds) if i == 0 or kind is not kinds[i - 1]] == [
        ReasoningDelta, TextDelta, ToolCallDelta]
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == stream.reasoning
    assert stream.reasoning == "The user asks for the weather."
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Checking."
    assert stream.tool_calls == DONE_TOOL_CALLS["tool_calls"]
    for index, call in enumerate(stream.tool_calls):  # the fragments give the same calls as done
        assert "".join(e.arguments for e in events if isinstance(e, ToolCallDelta) and e.index == index) \
            == call["arguments"]
    assert stream.finish_reason == "tool_calls"
    assert upstream.requests[0].body["tools"] == WEATHER_TOOLS
    assert upstream.requests[0].body["tool_choice"] == "auto"


async def test_end_to_end_logprobs(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("Hel", "lo"))
    server = await start_gateway()
    async with (
        trioai.client.connect(server.url) as conn,
        conn.generate(user("x"), max_tokens=5, logprobs=True, top_logprobs=1) as stream,
    ):
        assert await stream.text() == "Hello"
    assert [entry["token"] for entry in stream.logprobs] == ["Hel", "lo"]
    assert all(len(entry["top_logprobs"]) == 1 for entry in stream.logprobs)


# --- Resume: generations that survive a cut connection (tests/proxy.py between client and gateway). ----

COUNT = 200
NUMBERED = "".join(f"w{i} " for i in range(COUNT))


def numbered_script(body: dict[str, Any]) -> Script:
    """``w0 w1 … w{max_tokens-1}``, paced: an answer long enough to cut in the middle."""
    return Script(tokens=tuple(f"w{i} " for i in range(body["max_tokens"])), delay=0.005)


class GatewayProxy(CutProxy):
    """A cuttable proxy in front of ``gateway``."""

    def __init__(self, gateway: RunningServer) -> None:
        super().__init__("127.0.0.1", gateway.port)
        self.gateway = gateway


@pytest.fixture
async def proxied(nursery: trio.Nursery, start_gateway: StartGateway, upstream: FakeUpstream) -> GatewayProxy:
    """A cuttable proxy in front of a gateway whose engine counts ``w0 w1 …``."""
    upstream.script = numbered_script
    proxy = GatewayProxy(await start_gateway())
    await nursery.start(proxy.serve)
    return proxy


def resumes_on(server: RunningServer) -> float:
    """How many ``resume`` attaches the server counted."""
    return server.gateway.metrics.registry.get_sample_value("trioai_resumes_total") or 0.0


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_resume_after_a_cut_mid_answer(proxied: GatewayProxy, upstream: FakeUpstream, rst: bool) -> None:
    proxied.rst = rst
    proxied.cut_after = 3000  # the handshake and some 50 events: mid-answer
    async with (
        trioai.client.connect(proxied.url, resume=True) as conn,
        conn.generate(user("count"), max_tokens=COUNT) as stream,
    ):
        text = await stream.text()
    assert text == NUMBERED  # whole, and once
    assert stream.resumes == 1 and conn.reconnects == 1
    assert stream.resume_token is not None
    assert len(proxied.relays) == 2 and proxied.relays[0].to_client == 3000
    assert stream.usage is not None and stream.usage["completion_tokens"] == COUNT
    assert len(upstream.requests) == 1  # the same generation went on: not asked again
    assert resumes_on(proxied.gateway) == 1


async def test_resume_after_two_cuts(proxied: GatewayProxy) -> None:
    pieces: list[str] = []
    async with (
        trioai.client.connect(proxied.url, resume=True) as conn,
        conn.generate(user("count"), max_tokens=COUNT) as stream,
    ):
        async for piece in stream:
            pieces.append(piece)
            text = "".join(pieces)
            first_cut = len(proxied.relays) == 1 and "w40 " in text
            second_cut = len(proxied.relays) == 2 and stream.resumes == 1 and "w120 " in text
            if first_cut or second_cut:
                proxied.cut()
    assert "".join(pieces) == NUMBERED
    assert stream.resumes == 2 and conn.reconnects == 2 and len(proxied.relays) == 3


async def test_a_finished_stream_is_not_resumed(proxied: GatewayProxy) -> None:
    async with (
        trioai.client.connect(proxied.url, resume=True) as conn,
        conn.generate(user("short"), max_tokens=5) as short,
    ):
        assert await short.text() == "w0 w1 w2 w3 w4 "
        async with conn.generate(user("count"), max_tokens=COUNT) as long:
            first = await long.__anext__()
            proxied.cut()  # the short one is done, the long one streams
            rest = await long.text()
    assert first + rest == NUMBERED
    assert (short.resumes, long.resumes) == (0, 1)
    assert resumes_on(proxied.gateway) == 1


async def test_a_cut_after_done_reconnects_only_when_needed(proxied: GatewayProxy) -> None:
    async with trioai.client.connect(proxied.url, resume=True) as conn:
        async with conn.generate(user("short"), max_tokens=5) as stream:
            assert await stream.text() == "w0 w1 w2 w3 w4 "
            proxied.cut()  # `done` has arrived: nothing to resume
            await trio.sleep(0.3)
            assert len(proxied.relays) == 1 and conn.reconnects == 0 and stream.resumes == 0
        # The next generation reconnects first.
        async with conn.generate(user("again"), max_tokens=3) as again:
            assert await again.text() == "w0 w1 w2 "
    assert len(proxied.relays) == 2 and again.resumes == 0
    assert resumes_on(proxied.gateway) == 0


async def test_resume_not_found_after_a_server_restart(proxied: GatewayProxy, start_gateway: StartGateway) -> None:
    restarted = await start_gateway()  # knows nothing of the first one's generations
    streams: list[trioai.client.Stream] = []

    async def read(conn: trioai.client.Connection) -> None:
        async with conn.generate(user("count"), max_tokens=COUNT) as stream:
            streams.append(stream)
            async for _ in stream:
                if len(proxied.relays) == 1:
                    proxied.target = ("127.0.0.1", restarted.port)
                    proxied.cut()

    async with trioai.client.connect(proxied.url, resume=True) as conn:
        with pytest.raises(GenerationError) as caught:
            await read(conn)
    assert caught.value.code == "resume_not_found"
    assert not isinstance(caught.value, trioai.client.ResumedElsewhere)
    assert streams[0].resumes == 1


async def test_resumed_elsewhere_ends_the_stream_here(proxied: GatewayProxy) -> None:
    server = proxied.gateway
    other_events: list[dict[str, Any]] = []
    got: list[str] = []

    async def read_while_another_resumes(conn: trioai.client.Connection) -> None:
        async with conn.generate(user("count"), max_tokens=COUNT) as stream:
            got.append(await stream.__anext__())
            assert stream.resume_token is not None
            async with open_websocket_url(server.url) as other:
                await other.send_message(json.dumps({"type": "resume", "id": stream.id,
                                                     "resume_token": stream.resume_token, "after": 0}))
                while not other_events or other_events[-1]["type"] != "done":
                    with trio.fail_after(10):
                        other_events.append(json.loads(await other.get_message()))
                async for piece in stream:
                    got.append(piece)

    async with trioai.client.connect(server.url, resume=True) as conn:
        with pytest.raises(trioai.client.ResumedElsewhere) as caught:
            await read_while_another_resumes(conn)
    assert isinstance(caught.value, GenerationError) and caught.value.code == "resumed_elsewhere"
    assert "another connection" in str(caught.value)
    assert NUMBERED.startswith("".join(got))  # what it had, and nothing twice
    assert "".join(e.get("content", "") for e in other_events if e["type"] == "token") == NUMBERED


async def test_reconnecting_gives_up(proxied: GatewayProxy) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    cut_at: list[float] = []
    streams: list[trioai.client.Stream] = []

    async def read(conn: trioai.client.Connection) -> None:
        async with conn.generate(user("count"), max_tokens=COUNT) as stream:
            streams.append(stream)
            async for _ in stream:
                if not cut_at:
                    proxied.target = ("127.0.0.1", dead)  # every new connection is dropped at once
                    proxied.cut()
                    cut_at.append(trio.current_time())

    async with trioai.client.connect(proxied.url, resume=True, resume_timeout=1.0, connect_timeout=0.3) as conn:
        with trio.fail_after(5), pytest.raises(ConnectionLost) as caught:
            await read(conn)
        assert 0.9 < trio.current_time() - cut_at[0] < 2.0
        assert "gave up after 1 s" in str(caught.value)
        assert streams[0].resumes == 0
        with pytest.raises(ConnectionLost):  # the connection is done for
            async with conn.generate(user("x"), max_tokens=2):
                pass


async def test_cancel_while_reconnecting(proxied: GatewayProxy, upstream: FakeUpstream) -> None:
    live = proxied.target
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    async with (
        trioai.client.connect(proxied.url, resume=True, connect_timeout=0.3) as conn,
        conn.generate(user("count"), max_tokens=COUNT) as stream,
    ):
        text = await stream.__anext__()
        proxied.target = ("127.0.0.1", dead)
        proxied.cut()
        await trio.sleep(0.2)
        await stream.cancel()  # down now: goes out after the resume
        proxied.target = live
        text += await stream.text()
    assert stream.cancelled and stream.resumes == 1
    assert NUMBERED.startswith(text) and text != NUMBERED
    with trio.fail_after(5):
        await upstream.requests[0].closed.wait()  # the engine request was stopped


async def test_without_resume_nothing_changes(proxied: GatewayProxy) -> None:
    proxied.cut_after = 3000
    async with trioai.client.connect(proxied.url) as conn, conn.generate(user("count"), max_tokens=COUNT) as stream:
        with pytest.raises(ConnectionLost):
            await stream.text()
    assert stream.resume_token is None and stream.resumes == 0 and len(proxied.relays) == 1


async def test_resumable_is_sent_only_with_resume(scripted: ScriptedServer) -> None:
    scripted.script = lambda message: [{"type": "start", "model": "m"}, {"type": "token", "content": "ok"},
                                       {"type": "done", "finish_reason": "stop", "usage": USAGE}]
    for resume in (False, True):
        async with (
            trioai.client.connect(scripted.url, resume=resume) as conn,
            conn.generate(user("hi"), max_tokens=2) as stream,
        ):
            assert await stream.text() == "ok"
    plain, resumable = [event for event in scripted.received if event["type"] == "message"]
    assert "resumable" not in plain
    assert resumable["resumable"] is True


async def test_replayed_events_are_dropped(nursery: trio.Nursery) -> None:
    """A server that replays more than asked (from seq 1): the text still comes out once."""
    received: list[dict[str, Any]] = []

    def events(rid: str) -> list[dict[str, Any]]:
        return [{"type": "start", "id": rid, "seq": 1, "model": "m", "resume_token": "tok"},
                *({"type": "token", "id": rid, "seq": i + 2, "content": f"w{i} "} for i in range(10)),
                {"type": "done", "id": rid, "seq": 12, "finish_reason": "stop", "usage": USAGE}]

    async def handle(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="trioai.v1")
        with contextlib.suppress(ConnectionClosed):
            frame = json.loads(await ws.get_message())
            received.append(frame)
            playlist = events(frame["id"])
            for event in playlist if frame["type"] == "resume" else playlist[:6]:
                await ws.send_message(json.dumps(event))
            if frame["type"] == "resume":
                await ws.get_message()  # until the client leaves
            # else: drop the connection mid-answer

    server = await nursery.start(partial(serve_websocket, handle, "127.0.0.1", 0, None))
    url = f"ws://127.0.0.1:{server.port}/ws/chat"
    async with trioai.client.connect(url, resume=True) as conn, conn.generate(user("x")) as stream:
        assert await stream.text() == "".join(f"w{i} " for i in range(10))
    assert stream.resumes == 1 and stream.finish_reason == "stop"
    assert received[1] == {"type": "resume", "id": stream.id, "resume_token": "tok", "after": 6}
