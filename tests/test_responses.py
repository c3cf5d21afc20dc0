"""``/v1/responses`` end to end, with OpenAI's own SDK as the client: nothing on the client side is ours.

The server is a real trioai server in front of the fake engine (tests/conftest.py). The ``openai``
SDK runs on its own threads: its synchronous client (``client.responses.connect()`` and
``ResponsesWebSocketSession``) in a Trio worker thread, or its asyncio client in ``asyncio.run`` in
one. Every frame the SDK receives is validated, as it arrives, against the SDK's union of server
events (pydantic ``TypeAdapter``, with no field the models do not know) before the SDK parses it
its own way; the sequence numbers are checked per response.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar, cast

import pytest
import trio
from openai import AsyncOpenAI, OpenAI
from openai.lib.responses_websocket import (
    AsyncResponsesWebSocketSession,
    ResponsesWebSocketAccumulator,
    ResponsesWebSocketError,
    ResponsesWebSocketLane,
    ResponsesWebSocketLimits,
    ResponsesWebSocketSession,
)
from openai.resources.responses.responses import AsyncResponsesConnection, ResponsesConnection
from openai.types.responses import (
    FunctionTool,
    Response,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseSteerFailedEvent,
)
from openai.types.responses.responses_client_event import ResponseCreate
from openai.types.responses.responses_server_event import (
    ResponseFunctionCallArgumentsWsDelta,
    ResponseReasoningTextWsDelta,
    ResponsesServerEvent,
    ResponseTextWsDelta,
    ResponseWsCreated,
    ResponseWsError,
)
from trio_websocket import open_websocket_url

from trioai.fake_upstream import Delta, FakeUpstream, Script, TokenLogprob, ToolDelta
from trioai.server import RunningServer

from .conftest import StartGateway
from .test_responses_codec import SCHEMA, SERVER_EVENTS, TERMINALS, check_model

# websockets >= 17.1 warns about the way openai 3.57's sync client opens its socket (the SDK's
# business, not ours): keep it out of the summary.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

T = TypeVar("T")
LIMITS = ResponsesWebSocketLimits(max_lanes=8, max_events_per_lane=4096, max_events=16384,
                                  max_bytes_per_lane=16 << 20, max_bytes=32 << 20)
TIMEOUT = 15.0  # any one SDK wait
# For tests/test_engine.py and tests/test_vllm.py: a real engine's one or two answers, and its waits.
ENGINE_LIMITS = ResponsesWebSocketLimits(max_lanes=4, max_events_per_lane=1024, max_events=1024,
                                         max_bytes_per_lane=1 << 20, max_bytes=1 << 20)
ENGINE_TIMEOUT = 120.0
WEATHER_TOOL: dict[str, Any] = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
                                "parameters": SCHEMA, "strict": True}
LONG = tuple(f"t{i} " for i in range(400))  # 400 tokens, 20 ms apart: 8 s, far longer than any test waits


# --- helpers -----------------------------------------------------------------------------------


def validate_frames(connection: ResponsesConnection | AsyncResponsesConnection, frames: list[dict[str, Any]]) -> None:
    """Make the connection validate each frame against the SDK's models before it parses it.

    The SDK's own ``parse_event`` builds its models without validating; a frame that does not
    validate raises in the SDK's reader, which ends its session with that error.
    """
    parse = connection.parse_event

    def checked(data: str | bytes) -> ResponsesServerEvent:
        check_model(SERVER_EVENTS.validate_json(data))
        frames.append(json.loads(data))
        return parse(data)

    connection.parse_event = checked  # type: ignore[method-assign]


def check_frames(frames: list[dict[str, Any]]) -> None:
    """Per lane: each response numbered 0, 1, 2... from its ``response.created`` to its terminal."""
    expected: dict[str | None, int | None] = {}
    for event in frames:
        lane, kind, seq = event.get("stream_id"), event["type"], event.get("sequence_number")
        if kind == "response.created":
            assert expected.get(lane) is None, f"a response started on lane {lane} before the last one ended"
            assert seq == 0, event
            expected[lane] = 1
        elif (want := expected.get(lane)) is not None:
            assert seq == want, (want, event)
            expected[lane] = want + 1
            if kind in TERMINALS:
                expected[lane] = None
    assert all(want is None for want in expected.values()), f"responses without a terminal: {expected}"


@contextmanager
def sdk_connection(base_url: str, limits: ResponsesWebSocketLimits = LIMITS,
                   frames: list[dict[str, Any]] | None = None) -> Iterator[ResponsesWebSocketSession]:
    """The sync SDK's session on a fresh connection to ``base_url``'s ``/responses``; with ``frames``,
    every frame validated (and kept there)."""
    client = OpenAI(base_url=base_url, api_key="sk-test", max_retries=0)
    with client.responses.connect() as connection:
        if frames is not None:
            validate_frames(connection, frames)
        with ResponsesWebSocketSession(connection, limits=limits) as session:
            yield session


def sdk_session(server: RunningServer, frames: list[dict[str, Any]]) -> AbstractContextManager[
        ResponsesWebSocketSession]:
    """The sync SDK's session on a fresh connection to the server's ``/v1/responses``, every frame validated."""
    return sdk_connection(server.openai_base_url, frames=frames)


async def in_thread(function: Callable[[], T], timeout: float = 60.0) -> T:
    """Run blocking SDK code in a worker thread (abandoned, failing the test, after ``timeout``)."""
    with trio.fail_after(timeout):
        return await trio.to_thread.run_sync(function, abandon_on_cancel=True)


def until_terminal(lane: ResponsesWebSocketLane, timeout: float = TIMEOUT) -> list[ResponsesServerEvent]:
    """A lane's events up to and including the next terminal (``get_final_response`` still answers)."""
    events: list[ResponsesServerEvent] = []
    while True:
        events.append(event := lane.recv(timeout=timeout))
        if event.type in TERMINALS:
            return events


def text_deltas(events: list[ResponsesServerEvent]) -> str:
    return "".join(event.delta for event in events if isinstance(event, ResponseTextWsDelta))


def create(input: Any, **fields: Any) -> Any:
    """A ``response.create`` as a plain dict (what ``lane.send`` takes)."""
    return {"type": "response.create", "input": input, **fields}


def last_user(body: dict[str, Any]) -> str:
    return str([m for m in body["messages"] if m["role"] == "user"][-1]["content"])


def long_or_short(body: dict[str, Any]) -> Script:
    """400 slow tokens when the last user message says "long", else two quick ones."""
    if "long" in last_user(body):
        return Script(tokens=LONG, delay=0.02, finish_reason="stop")
    return Script(tokens=("short", " answer"), finish_reason="stop")


# --- tests -------------------------------------------------------------------------------------


async def test_plain_text_is_the_engines_text(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("Hello", ", ", "wor", "ld!"), finish_reason="stop")
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> tuple[list[ResponsesServerEvent], Response]:
        with sdk_session(server, frames) as session:
            session.default.send(create("Say hello.", instructions="Be brief.", metadata={"k": "v"}))
            events = until_terminal(session.default)
            return events, session.default.get_final_response(timeout=TIMEOUT)

    events, response = await in_thread(run)
    assert [event.type for event in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed"
    assert response.status == "completed" and response.error is None and response.incomplete_details is None
    assert response.output_text == "Hello, world!" == text_deltas(events)
    assert response.model == "fake-model"  # none asked for: the engine's
    assert response.instructions == "Be brief." and response.metadata == {"k": "v"}
    message = response.output[0]
    assert isinstance(message, ResponseOutputMessage) and message.role == "assistant"
    assert message.status == "completed"
    assert response.usage is not None and response.usage.output_tokens == 4
    assert upstream.requests[-1].body["messages"] == [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Say hello."}]
    check_frames(frames)


async def test_three_lanes_at_once_each_get_their_own_text(start_gateway: StartGateway,
                                                           upstream: FakeUpstream) -> None:
    """The asyncio SDK's session: three lanes sent at once, three answers interleaved, each on its lane."""
    upstream.script = lambda body: Script(tokens=tuple(f"{last_user(body)}{i} " for i in range(8)), delay=0.02,
                                          finish_reason="stop")
    server = await start_gateway()
    frames: list[dict[str, Any]] = []
    names = ("alpha", "beta", "gamma")

    async def run() -> list[Response]:
        client = AsyncOpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)
        async with client, client.responses.connect() as connection:
            validate_frames(connection, frames)
            async with AsyncResponsesWebSocketSession(connection, limits=LIMITS) as session:
                lanes = [session.lane(name) for name in names]
                for name, lane in zip(names, lanes, strict=True):
                    await lane.send(create(name))
                finals = asyncio.gather(*(lane.get_final_response() for lane in lanes))
                return list(await asyncio.wait_for(finals, TIMEOUT))

    responses = await in_thread(lambda: asyncio.run(run()))
    for name, response in zip(names, responses, strict=True):
        assert response.status == "completed"
        assert response.output_text == "".join(f"{name}{i} " for i in range(8))
    assert len({response.id for response in responses}) == 3
    # They ran at the same time: every lane streamed text before the first of them finished.
    first_terminal = next(i for i, event in enumerate(frames) if event["type"] in TERMINALS)
    streaming = {e["stream_id"] for e in frames[:first_terminal] if e["type"] == "response.output_text.delta"}
    assert streaming == set(names)
    assert all(event.get("stream_id") in names for event in frames)
    check_frames(frames)


async def test_previous_response_id_gives_the_engine_the_whole_conversation(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.script = lambda body: Script(tokens=(f"Reply to {len(body['messages'])} messages.",),
                                          finish_reason="stop")
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> list[Response]:
        with sdk_session(server, frames) as session:
            lane = session.lane("chat")
            lane.send(create("My name is Ada.", instructions="Be brief."))
            first = lane.get_final_response(timeout=TIMEOUT)
            # Only the new input: the server has the rest.
            lane.send(create("What is my name?", previous_response_id=first.id))
            second = lane.get_final_response(timeout=TIMEOUT)
            lane.send(create([{"type": "message", "role": "user", "content": "And mine?"}],
                             previous_response_id=second.id, instructions="Answer in French."))
            return [first, second, lane.get_final_response(timeout=TIMEOUT)]

    first, second, third = await in_thread(run)
    assert [r.status for r in (first, second, third)] == ["completed"] * 3
    assert second.previous_response_id == first.id and third.previous_response_id == second.id
    # instructions are not carried over (as at OpenAI): the second request has no system message.
    assert upstream.requests[1].body["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Reply to 2 messages."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert upstream.requests[-1].body["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Reply to 2 messages."},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": "Reply to 3 messages."},
        {"role": "user", "content": "And mine?"},
    ]
    assert third.output_text == "Reply to 6 messages."
    check_frames(frames)


async def test_generate_false_stores_the_input_for_a_continuation(start_gateway: StartGateway,
                                                                  upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("kiwi",), finish_reason="stop")
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> tuple[Response, int, Response]:
        with sdk_session(server, frames) as session:
            # As the SDK's README says to warm up: its ResponseCreate model, generate=False.
            session.default.send(ResponseCreate(type="response.create", input="The code word is kiwi.",
                                                generate=False))
            warm = session.default.get_final_response(timeout=TIMEOUT)
            engine_requests = len(upstream.requests)
            session.default.send(create("What is the code word?", previous_response_id=warm.id))
            return warm, engine_requests, session.default.get_final_response(timeout=TIMEOUT)

    warm, engine_requests, answer = await in_thread(run)
    assert warm.status == "completed" and warm.output == []
    assert engine_requests == 0  # nothing was generated
    assert answer.status == "completed" and answer.previous_response_id == warm.id
    assert answer.output_text == "kiwi"
    assert upstream.requests[0].body["messages"] == [{"role": "user", "content": "The code word is kiwi."},
                                                     {"role": "user", "content": "What is the code word?"}]
    assert [event["type"] for event in frames[:3]] == ["response.created", "response.in_progress",
                                                       "response.completed"]
    check_frames(frames)


async def test_a_function_call_round_trip(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    def script(body: dict[str, Any]) -> Script:
        if body["messages"][-1]["role"] == "tool":
            return Script(tokens=("It is ", "sunny."), finish_reason="stop")
        return Script(deltas=(ToolDelta(0, call_id="call_w1", name="get_weather"), ToolDelta(0, '{"city": '),
                              ToolDelta(0, '"Paris"}')), finish_reason="tool_calls")

    upstream.script = script
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> tuple[list[ResponsesServerEvent], Response, Response]:
        with sdk_session(server, frames) as session:
            lane = session.lane("tools")
            lane.send(create("What is the weather in Paris?", tools=[WEATHER_TOOL]))
            events = until_terminal(lane)
            first = lane.get_final_response(timeout=TIMEOUT)
            call = first.output[0]
            assert isinstance(call, ResponseFunctionToolCall)
            # The application runs the tool, and sends only its output, on the call's call_id.
            lane.send(create([{"type": "function_call_output", "call_id": call.call_id,
                               "output": '{"sky": "clear"}'}], previous_response_id=first.id, tools=[WEATHER_TOOL]))
            return events, first, lane.get_final_response(timeout=TIMEOUT)

    events, first, second = await in_thread(run)
    assert first.status == "completed"
    assert len(first.output) == 1
    call = first.output[0]
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.call_id, call.arguments) == ("get_weather", "call_w1", '{"city": "Paris"}')
    assert call.status == "completed"
    assert "".join(e.delta for e in events if isinstance(e, ResponseFunctionCallArgumentsWsDelta)) == call.arguments
    assert [(type(tool), getattr(tool, "name", None)) for tool in first.tools] == [(FunctionTool, "get_weather")]
    assert upstream.requests[0].body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.", "parameters": SCHEMA, "strict": True}}]

    assert second.status == "completed" and second.output_text == "It is sunny."
    assert upstream.requests[1].body["messages"] == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"sky": "clear"}'},
    ]
    check_frames(frames)


async def test_max_output_tokens_ends_incomplete(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    server = await start_gateway()  # the fake engine's default: the user's words, max_tokens of them
    frames: list[dict[str, Any]] = []

    def run() -> tuple[list[ResponsesServerEvent], Response]:
        with sdk_session(server, frames) as session:
            session.default.send(create("one two", max_output_tokens=3))
            events = until_terminal(session.default)
            return events, session.default.get_final_response(timeout=TIMEOUT)

    events, response = await in_thread(run)
    assert upstream.requests[0].body["max_tokens"] == 3
    assert events[-1].type == "response.incomplete"
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 3
    assert response.output_text == "one two one " == text_deltas(events)
    check_frames(frames)


@pytest.mark.parametrize(("fields", "code", "param"), [
    ({"background": True}, "unsupported_value", "background"),
    ({"conversation": "conv_123"}, "unsupported_parameter", "conversation"),
    ({"tools": [{"type": "web_search"}]}, "unsupported_value", "tools[0].type"),
    ({"truncation": "auto"}, "unsupported_value", "truncation"),
    ({"previous_response_id": "resp_0123456789abcdef01234567"}, "previous_response_not_found",
     "previous_response_id"),
    ({"temperature": 9}, "invalid_value", "temperature"),
    ({"frobnicate": 1}, "unknown_parameter", "frobnicate"),
], ids=["background", "conversation", "hosted-tool", "truncation", "unknown-previous", "temperature", "unknown-field"])
async def test_a_refused_create_is_the_sdks_typed_error(
    start_gateway: StartGateway, upstream: FakeUpstream, fields: dict[str, Any], code: str, param: str
) -> None:
    upstream.script = lambda body: Script(tokens=("fine",), finish_reason="stop")
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> tuple[ResponsesServerEvent, Response]:
        with sdk_session(server, frames) as session:
            lane = session.lane("lane-1")
            lane.send(create("Hi.", **fields))
            with pytest.raises(ResponsesWebSocketError) as caught:
                lane.get_final_response(timeout=TIMEOUT)
            # The connection and the lane go on working.
            lane.send(create("Hi."))
            return caught.value.event, lane.get_final_response(timeout=TIMEOUT)

    event, after = await in_thread(run)
    assert isinstance(event, ResponseWsError)
    assert (event.error.code, event.error.param) == (code, param), event
    assert event.error.type == "invalid_request_error" and event.status == 400
    assert event.stream_id == "lane-1"  # routed to the lane that sent it
    assert after.status == "completed" and after.output_text == "fine"
    assert len(upstream.requests) == 1  # the refused create never reached the engine
    check_frames(frames)


async def test_raw_frames_of_every_kind_validate(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    """Reasoning, text with logprobs and a tool call in one response, read raw from the connection."""
    upstream.script = lambda body: Script(deltas=(
        Delta(reasoning="Let me "), Delta(reasoning="think."),
        Delta(content="Calling", logprobs=(TokenLogprob("Calling", -0.5, (("Calling", -0.5), ("Asking", -1.5))),)),
        ToolDelta(0, call_id="call_1", name="get_weather"), ToolDelta(0, '{"city": "Oslo"}'),
    ), finish_reason="tool_calls")
    server = await start_gateway()

    def run() -> tuple[list[bytes], list[ResponsesServerEvent]]:
        client = OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)
        raw: list[bytes] = []
        parsed: list[ResponsesServerEvent] = []
        with client.responses.connect() as connection:
            connection.send(create("Weather in Oslo?", tools=[WEATHER_TOOL], include=["message.output_text.logprobs"],
                                   top_logprobs=2, stream_id="s.1"))
            while not parsed or parsed[-1].type not in TERMINALS:
                raw.append(data := connection.recv_bytes())
                parsed.append(connection.parse_event(data))
        return raw, parsed

    raw, parsed = await in_thread(run)
    accumulator = ResponsesWebSocketAccumulator()
    for data, event in zip(raw, parsed, strict=True):
        model = SERVER_EVENTS.validate_json(data)
        check_model(model)
        assert type(model) is type(event)  # the SDK's own parse gives the same type
        accumulator.add_event(event)
    check_frames([json.loads(data) for data in raw])
    kinds = [event.type for event in parsed]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.reasoning_text.delta") in (1, 2)  # the writer joins deltas it is behind on
    assert "".join(e.delta for e in parsed if isinstance(e, ResponseReasoningTextWsDelta)) == "Let me think."
    text = [e for e in parsed if isinstance(e, ResponseTextWsDelta)]
    assert [(t.delta, [(lp.token, lp.logprob) for lp in t.logprobs]) for t in text] == [
        ("Calling", [("Calling", -0.5)])]
    assert [(top.token, top.logprob) for top in text[0].logprobs[0].top_logprobs or []] == [
        ("Calling", -0.5), ("Asking", -1.5)]
    assert all(getattr(event, "stream_id", None) == "s.1" for event in parsed)
    final = accumulator.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Calling"
    assert accumulator.snapshot().output_text == "Calling"


async def test_closing_the_socket_mid_answer_closes_the_engine_request(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.script = long_or_short
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> int:
        with sdk_session(server, frames) as session:
            session.default.send(create("Tell me a long story."))
            deltas = 0
            while deltas < 3:
                deltas += isinstance(session.default.recv(timeout=TIMEOUT), ResponseTextWsDelta)
            return deltas  # leaving the session closes the socket, mid-answer

    await in_thread(run)
    request = upstream.requests[0]
    with trio.fail_after(5):
        await request.closed.wait()
    assert not request.completed
    assert request.chunks_sent < len(LONG)


@pytest.mark.parametrize("by", ["response_id", "stream_id"])
async def test_response_cancel_ends_it_cancelled(start_gateway: StartGateway, upstream: FakeUpstream,
                                                 by: str) -> None:
    upstream.script = long_or_short
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> tuple[list[ResponsesServerEvent], Response, Response, ResponsesServerEvent]:
        with sdk_session(server, frames) as session:
            lane = session.lane("story")
            lane.send(create("A long story, please."))
            events: list[ResponsesServerEvent] = []
            while not isinstance(events[-1] if events else None, ResponseTextWsDelta):
                events.append(lane.recv(timeout=TIMEOUT))
            created = events[0]
            assert isinstance(created, ResponseWsCreated)
            target = created.response.id if by == "response_id" else "story"
            # trioai's extension, so not one of the SDK's types: a raw dict through the connection.
            session.connection.send(cast(Any, {"type": "response.cancel", by: target}))
            events += until_terminal(lane)
            cancelled = lane.get_final_response(timeout=TIMEOUT)
            # The lane goes on; cancelling what no longer runs is an error on the default lane.
            lane.send(create("Now a short one."))
            after = lane.get_final_response(timeout=TIMEOUT)
            session.connection.send(cast(Any, {"type": "response.cancel", "response_id": cancelled.id}))
            return events, cancelled, after, session.default.recv(timeout=TIMEOUT)

    events, cancelled, after, late = await in_thread(run)
    assert events[-1].type == "response.incomplete"
    assert cancelled.status == "cancelled" and cancelled.incomplete_details is None and cancelled.error is None
    # The partial answer is kept, its message closed as incomplete.
    assert cancelled.output_text and cancelled.output_text == text_deltas(events)
    assert "".join(LONG).startswith(cancelled.output_text) and len(cancelled.output_text) < len("".join(LONG))
    message = cancelled.output[0]
    assert isinstance(message, ResponseOutputMessage) and message.status == "incomplete"
    with trio.fail_after(5):
        await upstream.requests[0].closed.wait()
    assert not upstream.requests[0].completed
    assert after.status == "completed" and after.output_text == "short answer"
    assert isinstance(late, ResponseWsError) and late.error.code == "response_not_found" and late.status == 404
    check_frames(frames)


async def test_steer_is_answered_with_steer_failed(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("ok",), finish_reason="stop")
    server = await start_gateway()
    frames: list[dict[str, Any]] = []

    def run() -> tuple[Response, ResponsesServerEvent]:
        with sdk_session(server, frames) as session:
            session.default.send(create("Hi."))
            response = session.default.get_final_response(timeout=TIMEOUT)
            # The SDK's own steering command, as its README describes it.
            session.default.send({"type": "response.steer", "previous_response_id": response.id,
                                  "input": "Also, be brief."})
            return response, session.default.recv(timeout=TIMEOUT)

    response, event = await in_thread(run)
    assert isinstance(event, ResponseSteerFailedEvent)
    assert event.error.code == "steering_not_supported"
    assert event.steer.previous_response_id == response.id
    assert len(upstream.requests) == 1
    check_frames(frames)


async def test_a_lane_runs_one_response_at_a_time(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    """A second create on a busy stream_id is refused (OpenAI runs a lane's responses in order)."""
    upstream.script = long_or_short
    server = await start_gateway()
    url = server.openai_base_url.replace("http://", "ws://") + "/responses"
    async with open_websocket_url(url) as ws:
        first = {"type": "response.create", "model": "fake-model", "input": "long", "stream_id": "lane"}
        await ws.send_message(json.dumps(first))
        await ws.send_message(json.dumps({**first, "input": "short"}))
        refusal = None
        with trio.fail_after(10):
            while refusal is None:
                event = json.loads(await ws.get_message())
                if event["type"] == "error":
                    refusal = event
    assert refusal["stream_id"] == "lane"
    assert refusal["error"]["code"] == "duplicate_id" and refusal["error"]["param"] == "stream_id"
    assert len(upstream.requests) == 1
