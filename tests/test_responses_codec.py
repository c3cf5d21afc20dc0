"""The Responses API WebSocket codec (trioai/responses.py), checked against the openai SDK's own models.

Every frame the encoder makes is validated through the SDK's union of WebSocket server events
(``ResponsesServerEvent``, with pydantic's ``TypeAdapter``, and no field the models do not know), then
fed to the SDK's accumulators: the public ``ResponsesWebSocketAccumulator`` and the session's
``_Accumulator`` behind ``lane.get_final_response()``. Client frames are built the way ``lane.send``
serializes them (``_command``) where the SDK has an opinion.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.responses_websocket import ResponsesWebSocketAccumulator, ResponsesWebSocketError
from openai.lib.responses_websocket._session import _Accumulator, _command
from openai.types.responses import Response
from openai.types.responses.responses_client_event import ResponseCreate
from openai.types.responses.responses_server_event import ResponsesServerEvent
from pydantic import BaseModel, TypeAdapter, ValidationError

from trioai.chatfields import MAX_TOOL_CALLS
from trioai.errors import ErrorCode
from trioai.protocol import (
    AssembledToolCall,
    Cancelled,
    Done,
    Error,
    Limits,
    Pong,
    Queued,
    Reasoning,
    ServerEvent,
    Started,
    Token,
    ToolCall,
    Usage,
)
from trioai.responses import (
    CancelResponse,
    CreateResponse,
    ResponseEncoder,
    ResponseHistory,
    ResponsesError,
    SteerResponse,
    error_frame,
    parse_client_event,
    steer_failed_frame,
)

SERVER_EVENTS: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)
LIMITS = Limits(max_messages=16, max_tokens_limit=1000, max_tools=4, max_schema_depth=6)
RID = "resp_test"
TERMINALS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
SCHEMA: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER: dict[str, Any] = {"type": "function", "name": "get_weather", "description": "Weather now.",
                           "parameters": SCHEMA, "strict": True}
CHAT_WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                                                 "parameters": SCHEMA, "strict": True}}


# --- helpers -----------------------------------------------------------------------------------


def frame(**fields: Any) -> str:
    return json.dumps({"type": "response.create", **fields})


def create(history: ResponseHistory | None = None, limits: Limits = LIMITS, rid: str = RID,
           **fields: Any) -> CreateResponse:
    event = parse_client_event(frame(**fields), limits, history if history is not None else ResponseHistory(),
                               new_id=lambda: rid)
    assert isinstance(event, CreateResponse)
    return event


def rejection(text: str, history: ResponseHistory | None = None, limits: Limits = LIMITS) -> ResponsesError:
    with pytest.raises(ResponsesError) as caught:
        parse_client_event(text, limits, history if history is not None else ResponseHistory())
    error = caught.value
    # Whatever was refused, the error event itself is one the SDK accepts.
    check_model(SERVER_EVENTS.validate_json(error.frame()))
    return error


def check_model(model: BaseModel) -> None:
    """No field the SDK's models do not know, at any depth (openai's models would keep it as an extra)."""
    extra = model.__pydantic_extra__
    assert not extra, f"{type(model).__name__} has unknown fields {sorted(extra)}"
    for name in type(model).model_fields:
        stack = [getattr(model, name)]
        while stack:
            value = stack.pop()
            if isinstance(value, BaseModel):
                check_model(value)
            elif isinstance(value, list | tuple):
                stack.extend(value)
            elif isinstance(value, dict):
                stack.extend(value.values())


def encode(request: CreateResponse, events: list[ServerEvent]) -> tuple[ResponseEncoder, list[str]]:
    encoder = ResponseEncoder(request, "test-model", 1_700_000_000)
    return encoder, [text for event in events for text in encoder.encode(event)]


def check_stream(frames: list[str], stream_id: str | None = None) -> list[dict[str, Any]]:
    """Every frame valid for the SDK, numbered 0, 1, 2..., on its lane; exactly one terminal, the last."""
    decoded = []
    for number, text in enumerate(frames):
        check_model(SERVER_EVENTS.validate_json(text))
        event = json.loads(text)
        assert event["sequence_number"] == number, text
        assert event.get("stream_id") == stream_id
        decoded.append(event)
    kinds = [event["type"] for event in decoded]
    assert [kind for kind in kinds if kind in TERMINALS] == [kinds[-1]]
    return decoded


def final_responses(frames: list[str]) -> tuple[Response, Response, str]:
    """The final response by both SDK accumulators, and the public one's ``output_text`` snapshot."""
    public = ResponsesWebSocketAccumulator()
    session = _Accumulator(None)
    for text in frames:
        event = SERVER_EVENTS.validate_json(text)
        public.add_event(event)
        session.add(event, len(text))
    assert session.final is not None
    return public.get_final_response(), session.final, public.snapshot().output_text


def usage(prompt: int | None = 7, completion: int = 3) -> Usage:
    return Usage(prompt, completion, "engine" if prompt is not None else "gateway")


def done(finish: str | None = "stop", calls: tuple[AssembledToolCall, ...] = ()) -> Done:
    return Done(RID, finish, usage(), 12.5, 40.0, calls)


TEXT: list[ServerEvent] = [Started(RID, "m"), Token(RID, "Hello"), Token(RID, ", "), Token(RID, "world"), done()]


# --- encoding: scripted sequences --------------------------------------------------------------


def test_text_only() -> None:
    request = create(input="hi", stream_id="lane.1")
    encoder, frames = encode(request, TEXT)
    events = check_stream(frames, "lane.1")
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hello", ", ", "world"]
    response = events[-1]["response"]
    assert response["status"] == "completed"
    assert response["usage"] == {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0,
                                                                           "cache_write_tokens": 0},
                                 "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": 10}
    assert response["model"] == "test-model"
    assert response["id"] == RID
    public, session, text = final_responses(frames)
    assert text == public.output_text == session.output_text == "Hello, world"
    assert public.status == session.status == "completed"
    assert encoder.status == "completed"
    assert encoder.output_items() == (response["output"][0],)
    assert response["output"][0]["id"] == "msg_test_0"


def test_reasoning_then_text() -> None:
    request = create(input="why?", reasoning={"effort": "high"})
    _, frames = encode(request, [Started(RID, "m"), Reasoning(RID, "Think"), Reasoning(RID, "ing."),
                                 Token(RID, "Because."), done()])
    events = check_stream(frames)
    kinds = [e["type"] for e in events]
    assert kinds[2:10] == ["response.output_item.added", "response.content_part.added",
                           "response.reasoning_text.delta", "response.reasoning_text.delta",
                           "response.reasoning_text.done", "response.content_part.done",
                           "response.output_item.done", "response.output_item.added"]
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    assert events[-1]["response"]["reasoning"] == {"effort": "high", "summary": None}
    public, session, text = final_responses(frames)
    assert text == public.output_text == session.output_text == "Because."  # reasoning is not output text
    details = ResponsesWebSocketAccumulator()
    for piece in frames:
        details.add_event(SERVER_EVENTS.validate_json(piece))
    assert details.detailed_snapshot()["output"][0]["item"]["content"][0]["text"] == "Thinking."


def test_two_parallel_tool_calls() -> None:
    request = create(input="weather in Oslo and Bergen?", tools=[WEATHER], parallel_tool_calls=True)
    calls = (AssembledToolCall("call_a", "get_weather", '{"city": "Oslo"}'),
             AssembledToolCall("call_b", "get_weather", '{"city": "Bergen"}'))
    _, frames = encode(request, [
        Started(RID, "m"), Token(RID, "Checking."),
        ToolCall(RID, 0, "call_a", "get_weather", '{"city": '), ToolCall(RID, 1, "call_b", "get_weather", ""),
        ToolCall(RID, 1, None, None, '{"city": "Bergen"}'), ToolCall(RID, 0, None, None, '"Oslo"}'),
        done("tool_calls", calls),
    ])
    events = check_stream(frames)
    assert [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"] == [
        '{"city": ', '{"city": "Bergen"}', '"Oslo"}']
    output = events[-1]["response"]["output"]
    assert [(item["type"], item.get("call_id"), item.get("arguments")) for item in output] == [
        ("message", None, None), ("function_call", "call_a", '{"city": "Oslo"}'),
        ("function_call", "call_b", '{"city": "Bergen"}')]
    assert events[-1]["response"]["tools"] == [WEATHER]
    assert events[-1]["response"]["parallel_tool_calls"] is True
    public, session, _ = final_responses(frames)
    for response in (public, session):
        assert [(o.type, getattr(o, "name", None)) for o in response.output] == [
            ("message", None), ("function_call", "get_weather"), ("function_call", "get_weather")]
        assert response.status == "completed"


def test_length_is_incomplete() -> None:
    request = create(input="go on", max_output_tokens=3)
    encoder, frames = encode(request, [Started(RID, "m"), Token(RID, "one two three"), done("length")])
    events = check_stream(frames)
    response = events[-1]
    assert response["type"] == "response.incomplete"
    assert response["response"]["status"] == "incomplete"
    assert response["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["response"]["max_output_tokens"] == 3
    assert response["response"]["output"][0]["status"] == "incomplete"
    public, session, text = final_responses(frames)
    assert public.status == session.status == "incomplete"
    assert text == session.output_text == "one two three"
    assert encoder.status == "incomplete"


def test_content_filter_is_incomplete() -> None:
    _, frames = encode(create(input="x"), [Started(RID, "m"), Token(RID, "a"), done("content_filter")])
    assert check_stream(frames)[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}


@pytest.mark.parametrize(("code", "openai_code"), [
    (ErrorCode.UPSTREAM_TIMEOUT, "server_error"),
    (ErrorCode.INTERNAL_ERROR, "server_error"),
    (ErrorCode.RATE_LIMITED, "rate_limit_exceeded"),
])
def test_error_after_start_is_failed(code: ErrorCode, openai_code: str) -> None:
    request = create(input="x", stream_id="s")
    encoder, frames = encode(request, [Started(RID, "m"), Token(RID, "par"), Error(RID, code, "it broke")])
    events = check_stream(frames, "s")
    assert [e["type"] for e in events][-4:] == ["response.output_text.done", "response.content_part.done",
                                                "response.output_item.done", "response.failed"]
    response = events[-1]["response"]
    assert response["status"] == "failed"
    assert response["error"]["code"] == openai_code
    assert response["error"]["message"] == "it broke"
    public, session, text = final_responses(frames)
    assert public.error is not None and public.error.code == openai_code
    assert session.status == "failed"
    assert text == "par"
    assert encoder.status == "failed"


def test_error_before_start_is_an_error_event() -> None:
    request = create(input="x", stream_id="lane")
    encoder, frames = encode(request, [Error(RID, ErrorCode.OVERLOADED, "too many waiting", retry_after=1.5),
                                       Started(RID, "m")])
    events = check_stream(frames, "lane")
    assert events == [{"type": "error", "sequence_number": 0, "status": 503, "stream_id": "lane",
                       "error": {"type": "server_error", "code": "overloaded", "message": "too many waiting",
                                 "param": None, "headers": {"retry-after": "2"}}}]
    with pytest.raises(ResponsesWebSocketError):
        ResponsesWebSocketAccumulator().add_event(SERVER_EVENTS.validate_json(frames[0]))
    session = _Accumulator(None)
    session.add(SERVER_EVENTS.validate_json(frames[0]), len(frames[0]))
    assert isinstance(session.error, ResponsesWebSocketError)
    assert encoder.finished and encoder.status is None


def test_cancelled_is_incomplete_with_status_cancelled() -> None:
    request = create(input="x", stream_id="lane")
    encoder, frames = encode(request, [Started(RID, "m"), Reasoning(RID, "hm"), Token(RID, "Half an ans"),
                                       Cancelled(RID)])
    events = check_stream(frames, "lane")
    terminal = events[-1]
    assert terminal["type"] == "response.incomplete"
    assert terminal["response"]["status"] == "cancelled"
    assert terminal["response"]["incomplete_details"] is None
    assert [item["status"] for item in terminal["response"]["output"]] == ["completed", "incomplete"]
    public, session, text = final_responses(frames)
    assert public.status == session.status == "cancelled"
    assert text == session.output_text == "Half an ans"
    assert encoder.status == "cancelled"


def test_cancelled_before_start() -> None:
    _, frames = encode(create(input="x"), [Queued(RID, 3), Cancelled(RID)])
    events = check_stream(frames)
    assert [e["type"] for e in events] == ["response.created", "response.queued", "response.incomplete"]
    assert events[-1]["response"]["output"] == []


def test_queued_before_and_after_start() -> None:
    _, frames = encode(create(input="x"), [Queued(RID, 2), Queued(RID, 1), Started(RID, "m"), Queued(RID, 1),
                                           Token(RID, "hi"), done()])
    events = check_stream(frames)
    assert [e["type"] for e in events][:4] == ["response.created", "response.queued", "response.in_progress",
                                               "response.output_item.added"]
    assert events[0]["response"]["status"] == "queued"
    assert final_responses(frames)[1].output_text == "hi"


def test_repeats_and_foreign_events() -> None:
    _, frames = encode(create(input="x"), [Started(RID, "m"), Pong(RID), Started(RID, "m"), Token(RID, "a"), done()])
    assert [json.loads(text)["type"] for text in frames].count("response.in_progress") == 1
    check_stream(frames)


@pytest.mark.parametrize(("events", "status"), [
    pytest.param(TEXT, "completed", id="done"),
    pytest.param([Started(RID, "m"), Cancelled(RID)], "cancelled", id="cancelled"),
    pytest.param([Error(RID, ErrorCode.OVERLOADED, "busy")], None, id="error-first"),
])
def test_on_finished(events: list[ServerEvent], status: str | None) -> None:
    history = ResponseHistory()
    finished: list[ResponseEncoder] = []

    def store(encoder: ResponseEncoder) -> None:
        finished.append(encoder)
        if encoder.status is not None:
            history.store(encoder.create.id, encoder.create.input_items, encoder.output_items())

    request = create(history, input="x")
    encoder = ResponseEncoder(request, "m", 0, on_finished=store)
    for event in events[:-1]:
        encoder.encode(event)
        assert not finished
    encoder.encode(events[-1])
    encoder.encode(events[-1])
    assert finished == [encoder] and encoder.status == status
    assert (RID in history) == (status is not None)
    warm = ResponseEncoder(request, "m", 0, on_finished=finished.append)
    warm.warmup()
    assert finished[-1] is warm


def test_nothing_after_the_terminal() -> None:
    encoder, _ = encode(create(input="x"), TEXT)
    assert encoder.encode(Token(RID, "late")) == []
    assert encoder.encode(Cancelled(RID)) == []
    assert encoder.encode(Error(RID, ErrorCode.INTERNAL_ERROR, "late")) == []


def test_logprobs() -> None:
    request = create(input="x", include=["message.output_text.logprobs"], top_logprobs=2)
    assert request.request.chat_fields == {"logprobs": True, "top_logprobs": 2}
    entry = {"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
             "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                              {"token": "Yo", "logprob": -2.0, "bytes": None}]}
    _, frames = encode(request, [Started(RID, "m"), Token(RID, "Hi", (entry, "not an entry")), done()])
    events = check_stream(frames)
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"] == [{"token": "Hi", "logprob": -0.25, "top_logprobs": [
        {"token": "Hi", "logprob": -0.25}, {"token": "Yo", "logprob": -2.0}]}]
    part = events[-1]["response"]["output"][0]["content"][0]
    assert part["logprobs"] == [{"token": "Hi", "bytes": [72, 105], "logprob": -0.25, "top_logprobs": [
        {"token": "Hi", "bytes": [72, 105], "logprob": -0.25}, {"token": "Yo", "bytes": [89, 111], "logprob": -2.0}]}]
    assert events[-1]["response"]["top_logprobs"] == 2


def test_whole_tool_calls_only_at_the_end() -> None:
    calls = (AssembledToolCall(None, "get_weather", '{"city": "Oslo"}'),)
    _, frames = encode(create(input="x", tools=[WEATHER]), [Started(RID, "m"), done("tool_calls", calls)])
    output = check_stream(frames)[-1]["response"]["output"]
    assert output == [{"id": "fc_test_0", "type": "function_call", "call_id": "call_test_0", "name": "get_weather",
                       "arguments": '{"city": "Oslo"}', "status": "completed"}]


def test_gateway_counted_usage_and_no_started() -> None:
    # Output before Started (never sent by the core, but harmless): created and in_progress come first.
    _, frames = encode(create(input="x"), [Token(RID, "a"), Done(RID, None, Usage(None, 1, "gateway"), None, None)])
    events = check_stream(frames)
    assert [e["type"] for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1]["response"]["usage"]["input_tokens"] == 0


def test_warmup() -> None:
    request = create(input="prepare", generate=False, instructions="be brief", metadata={"k": "v"})
    assert request.generate is False
    encoder = ResponseEncoder(request, "test-model", 1)
    frames = encoder.warmup()
    events = check_stream(frames)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.completed"]
    assert events[-1]["response"]["output"] == []
    assert events[-1]["response"]["metadata"] == {"k": "v"}
    assert events[-1]["response"]["instructions"] == "be brief"
    assert final_responses(frames)[1].status == "completed"
    assert encoder.output_items() == ()
    with pytest.raises(RuntimeError):
        encoder.warmup()


def test_response_object_echoes_the_request() -> None:
    request = create(input="x", model="my-model", instructions="sys", temperature=0.5, top_p=0.9,
                     tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                     text={"format": {"type": "json_schema", "name": "out", "schema": SCHEMA, "strict": True}},
                     metadata={"user": "42"}, store=False, user="u1", max_tool_calls=2)
    _, frames = encode(request, TEXT)
    response = check_stream(frames)[0]["response"]
    assert {key: response[key] for key in ("instructions", "temperature", "top_p", "tool_choice", "text", "metadata",
                                           "user", "max_tool_calls", "parallel_tool_calls")} == {
        "instructions": "sys", "temperature": 0.5, "top_p": 0.9,
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "out", "schema": SCHEMA, "strict": True}},
        "metadata": {"user": "42"}, "user": "u1", "max_tool_calls": 2, "parallel_tool_calls": True}
    assert request.model == "my-model"


def test_the_validation_bites() -> None:
    """The checks above would catch a frame the SDK does not type: a wrong code, a missing or unknown field."""
    _, frames = encode(create(input="x"), [Started(RID, "m"), Error(RID, ErrorCode.UPSTREAM_TIMEOUT, "slow")])
    failed = json.loads(frames[-1])
    failed["response"]["error"]["code"] = "upstream_timeout"  # not one of ResponseError's codes
    with pytest.raises(ValidationError):
        SERVER_EVENTS.validate_json(json.dumps(failed))
    delta = json.loads(encode(create(input="x"), TEXT)[1][4])
    del delta["logprobs"]
    with pytest.raises(ValidationError):
        SERVER_EVENTS.validate_json(json.dumps(delta))
    created = json.loads(frames[0])
    created["response"]["store"] = True
    with pytest.raises(AssertionError, match="store"):
        check_model(SERVER_EVENTS.validate_json(json.dumps(created)))


# --- encoding: any sequence --------------------------------------------------------------------

DELTA = st.one_of(
    st.builds(lambda s: Token(RID, s), st.text(min_size=1, max_size=5)),
    st.builds(lambda s: Reasoning(RID, s), st.text(min_size=1, max_size=5)),
    st.builds(lambda i, s: ToolCall(RID, i, None, "f", s), st.integers(0, 2), st.text(max_size=5)),
)
TERMINAL = st.sampled_from([done(), done("length"), Cancelled(RID), Error(RID, ErrorCode.UPSTREAM_ERROR, "x")])


@settings(max_examples=60, deadline=None)
@given(st.lists(DELTA, max_size=12), TERMINAL, st.booleans(), st.sampled_from([None, "a", "lane-2"]))
def test_any_sequence_is_valid(deltas: list[ServerEvent], terminal: ServerEvent, queued: bool,
                               stream_id: str | None) -> None:
    fields: dict[str, Any] = {"input": "x"} if stream_id is None else {"input": "x", "stream_id": stream_id}
    request = create(**fields)
    head: list[ServerEvent] = [Queued(RID, 1), Started(RID, "m")] if queued else [Started(RID, "m")]
    _, frames = encode(request, [*head, *deltas, terminal])
    events = check_stream(frames, stream_id)
    public, session, text = final_responses(frames)
    expected = "".join(event.content for event in deltas if isinstance(event, Token))
    assert text == public.output_text == session.output_text == expected
    output = events[-1]["response"]["output"]
    assert len({item["id"] for item in output}) == len(output)
    assert all(item["status"] in ("completed", "incomplete") for item in output)


# --- parsing: accepted forms -------------------------------------------------------------------

USER_HI = {"role": "user", "content": "hi"}
ACCEPTED: list[Any] = [
    pytest.param({"input": "hi"}, [USER_HI], {}, id="string-input"),
    pytest.param({"input": [{"role": "user", "content": "hi"}]}, [USER_HI], {}, id="easy-message"),
    pytest.param({"input": [{"type": "message", "role": "user",
                             "content": [{"type": "input_text", "text": "hi"}]}]}, [USER_HI], {}, id="input-text"),
    pytest.param({"input": [{"type": "message", "role": "developer",
                             "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}]},
                 [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                 {}, id="two-parts"),
    pytest.param({"instructions": "be brief", "input": "hi"},
                 [{"role": "system", "content": "be brief"}, USER_HI], {}, id="instructions"),
    pytest.param({"input": [{"role": "system", "content": "s"}, USER_HI,
                            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                             "content": [{"type": "output_text", "text": "hello", "annotations": []}]}]},
                 [{"role": "system", "content": "s"}, USER_HI, {"role": "assistant", "content": "hello"}], {},
                 id="assistant-output-text"),
    pytest.param({"input": [USER_HI, {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "[]"},
                            {"type": "function_call_output", "call_id": "c1", "output": "one"},
                            {"type": "function_call_output", "call_id": "c2",
                             "output": [{"type": "input_text", "text": "tw"}, {"type": "input_text", "text": "o"}]}]},
                 [USER_HI, {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                     {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[]"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "one"},
                  {"role": "tool", "tool_call_id": "c2", "content": "two"}], {}, id="function-calls"),
    pytest.param({"input": [USER_HI, {"type": "reasoning", "id": "rs_1", "summary": [],
                                      "content": [{"type": "reasoning_text", "text": "hm"}]},
                            {"role": "assistant", "content": "I'll call f."},
                            {"type": "reasoning", "id": "rs_2", "summary": []},
                            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]},
                 [USER_HI, {"role": "assistant", "content": "I'll call f.", "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], {},
                 id="reasoning-items-left-out"),
    pytest.param({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]}]},
                 [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                               {"type": "image_url", "image_url": {
                                                   "url": "data:image/png;base64,AAAA", "detail": "low"}}]}], {},
                 id="image"),
    pytest.param({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
                  "parallel_tool_calls": False},
                 [USER_HI], {"tools": [CHAT_WEATHER], "tool_choice": {"type": "function",
                                                                      "function": {"name": "get_weather"}},
                             "parallel_tool_calls": False}, id="tools"),
    pytest.param({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": None, "strict": None}],
                  "tool_choice": "required"},
                 [USER_HI], {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                 id="minimal-tool"),
    pytest.param({"input": "hi", "tools": [], "tool_choice": "auto"}, [USER_HI], {}, id="no-tools"),
    pytest.param({"input": "hi", "text": {"format": {"type": "json_schema", "name": "city", "schema": SCHEMA,
                                                     "description": "A city.", "strict": True}}},
                 [USER_HI], {"response_format": {"type": "json_schema", "json_schema": {
                     "name": "city", "schema": SCHEMA, "description": "A city.", "strict": True}}}, id="json-schema"),
    pytest.param({"input": "hi", "text": {"format": {"type": "json_object"}}},
                 [USER_HI], {"response_format": {"type": "json_object"}}, id="json-object"),
    pytest.param({"input": "hi", "text": {"format": {"type": "text"}, "verbosity": None}},
                 [USER_HI], {"response_format": {"type": "text"}}, id="text"),
    pytest.param({"input": "hi", "reasoning": {"effort": "low", "summary": None}},
                 [USER_HI], {"reasoning_effort": "low"}, id="reasoning-effort"),
    pytest.param({"input": "hi", "top_logprobs": 3}, [USER_HI], {"logprobs": True, "top_logprobs": 3},
                 id="top-logprobs"),
    pytest.param({"input": "hi", "top_logprobs": 0}, [USER_HI], {}, id="top-logprobs-0"),
    pytest.param({"input": "hi", "store": True, "user": "u", "safety_identifier": "s", "prompt_cache_key": "k",
                  "prompt_cache_retention": "24h", "service_tier": "auto", "truncation": "disabled",
                  "background": False, "stream": True, "stream_options": {"include_obfuscation": False},
                  "max_tool_calls": 3, "metadata": {"a": "b"}, "model": "gpt-x", "include": [],
                  "stream_id": "lane_1"},
                 [USER_HI], {}, id="no-op-fields"),
    pytest.param({**{name: None for name in ResponseCreate.model_fields if name != "type"}, "input": "hi"},
                 [USER_HI], {}, id="every-field-null"),
]


@pytest.mark.parametrize(("fields", "messages", "chat_fields"), ACCEPTED)
def test_accepted(fields: dict[str, Any], messages: list[Any], chat_fields: dict[str, Any]) -> None:
    request = create(**fields)
    assert request.id == RID
    assert [dict(m) for m in request.request.messages] == messages
    assert dict(request.request.chat_fields) == chat_fields
    assert request.request.resumable is False
    # Through the SDK's own validation of client events too: these are requests the SDK can type.
    ResponseCreate.model_validate({"type": "response.create", **fields})


def test_sampling_and_limits() -> None:
    request = create(input="hi", max_output_tokens=100, temperature=0.2, top_p=1)
    assert request.request.max_tokens == 100
    assert (request.request.sampling.temperature, request.request.sampling.top_p) == (0.2, 1.0)
    default = create(limits=Limits(default_max_tokens=64), input="hi")
    assert default.request.max_tokens == 64
    assert create(input="hi").request.max_tokens is None


def test_metadata_stream_id_model() -> None:
    request = create(input="hi", metadata={"a": "1", "b": "2"}, stream_id="x.y-z_0", model="m")
    assert (dict(request.metadata), request.stream_id, request.model) == ({"a": "1", "b": "2"}, "x.y-z_0", "m")
    bare = create(input="hi")
    assert (dict(bare.metadata), bare.stream_id, bare.model, bare.generate) == ({}, None, None, True)


def test_the_sdk_lane_serialization() -> None:
    """What ``lane.send`` puts on the wire (``_command``): typed objects included, stream_id added."""
    event = ResponseCreate(type="response.create", model="m", input="hi", instructions="sys",
                           max_output_tokens=50, tools=[WEATHER],  # type: ignore[list-item]
                           text={"format": {"type": "json_object"}})  # type: ignore[arg-type]
    data, is_create = _command(event, "lane")
    assert is_create
    request = parse_client_event(data, LIMITS, ResponseHistory(), new_id=lambda: RID)
    assert isinstance(request, CreateResponse)
    assert request.stream_id == "lane"
    assert [dict(m) for m in request.request.messages] == [{"role": "system", "content": "sys"}, USER_HI]
    assert request.request.chat_fields == {"tools": [CHAT_WEATHER], "response_format": {"type": "json_object"}}
    data, _ = _command({"type": "response.create", "model": "m", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}, None)
    assert isinstance(parse_client_event(data, LIMITS, ResponseHistory()), CreateResponse)


def test_new_ids() -> None:
    first = parse_client_event(frame(input="hi"), LIMITS, ResponseHistory())
    second = parse_client_event(frame(input="hi"), LIMITS, ResponseHistory())
    assert isinstance(first, CreateResponse) and isinstance(second, CreateResponse)
    assert first.id.startswith("resp_") and len(first.id) == 29 and first.id != second.id


def test_binary_utf8_frame() -> None:
    request = parse_client_event(frame(input="hi").encode(), LIMITS, ResponseHistory())
    assert isinstance(request, CreateResponse)


# --- parsing: refusals -------------------------------------------------------------------------

REFUSED: list[Any] = [
    # Fields trioai cannot honour: each named.
    pytest.param({"background": True}, "background", "unsupported_value", id="background"),
    pytest.param({"conversation": "conv_1"}, "conversation", "unsupported_parameter", id="conversation"),
    pytest.param({"prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_parameter", id="prompt"),
    pytest.param({"context_management": [{"type": "compaction"}]}, "context_management", "unsupported_parameter",
                 id="context-management"),
    pytest.param({"moderation": {"model": "omni"}}, "moderation", "unsupported_parameter", id="moderation"),
    pytest.param({"access_programs": {"cyber": "standard"}}, "access_programs", "unsupported_parameter",
                 id="access-programs"),
    pytest.param({"background_options": {}}, "background_options", "unsupported_parameter", id="background-options"),
    pytest.param({"image": {"context_compression": "auto"}}, "image", "unsupported_parameter", id="image"),
    pytest.param({"prompt_cache_options": {"ttl": "30m"}}, "prompt_cache_options", "unsupported_parameter",
                 id="prompt-cache-options"),
    pytest.param({"truncation": "auto"}, "truncation", "unsupported_value", id="truncation-auto"),
    pytest.param({"stream": False}, "stream", "unsupported_value", id="stream-false"),
    pytest.param({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation",
                 "unsupported_value", id="obfuscation"),
    pytest.param({"service_tier": "flex"}, "service_tier", "unsupported_value", id="service-tier"),
    pytest.param({"include": ["reasoning.encrypted_content"]}, "include[0]", "unsupported_value", id="include"),
    pytest.param({"include": [LOGPROBS := "message.output_text.logprobs", "file_search_call.results"]},
                 "include[1]", "unsupported_value", id="include-second"),
    pytest.param({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning.summary", "unsupported_parameter",
                 id="reasoning-summary"),
    pytest.param({"text": {"verbosity": "low"}}, "text.verbosity", "unsupported_parameter", id="verbosity"),
    pytest.param({"tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value", id="web-search"),
    pytest.param({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools[1].type",
                 "unsupported_value", id="file-search"),
    pytest.param({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type",
                 "unsupported_value", id="code-interpreter"),
    pytest.param({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type", "unsupported_value", id="mcp"),
    pytest.param({"tools": [{"type": "custom", "name": "x"}]}, "tools[0].type", "unsupported_value", id="custom"),
    pytest.param({"tools": [{**WEATHER, "defer_loading": True}]}, "tools[0].defer_loading", "unsupported_value",
                 id="defer-loading"),
    pytest.param({"tools": [{**WEATHER, "output_schema": SCHEMA}]}, "tools[0].output_schema",
                 "unsupported_parameter", id="output-schema"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type",
                 "unsupported_value", id="hosted-tool-choice"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
                 "tool_choice.type", "unsupported_value", id="allowed-tools"),
    pytest.param({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "unsupported_value",
                 id="item-reference"),
    pytest.param({"input": [{"type": "web_search_call", "id": "ws", "status": "completed"}]}, "input[0].type",
                 "unsupported_value", id="hosted-item"),
    pytest.param({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
                 "input[0].content[0].type", "unsupported_value", id="input-file"),
    pytest.param({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f",
                                                          "detail": "auto"}]}]},
                 "input[0].content[0].file_id", "unsupported_parameter", id="image-file-id"),
    pytest.param({"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u",
                                                            "detail": "auto"}]}]},
                 "input[0].content[0].type", "unsupported_value", id="system-image"),
    pytest.param({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
                             "namespace": "ns"}]}, "input[0].namespace", "unsupported_parameter", id="namespace"),
    # Unknown fields, at any level.
    pytest.param({"frobnicate": 1}, "frobnicate", "unknown_parameter", id="unknown-field"),
    pytest.param({"stop": ["\n"]}, "stop", "unknown_parameter", id="chat-only-field"),
    pytest.param({"tools": [{**WEATHER, "extra": 1}]}, "tools[0].extra", "unknown_parameter", id="unknown-tool-key"),
    pytest.param({"input": [{"role": "user", "content": "x", "name": "bob"}]}, "input[0].name", "unknown_parameter",
                 id="unknown-item-key"),
    pytest.param({"text": {"format": {"type": "json_object", "schema": {}}}}, "text.format.schema",
                 "unknown_parameter", id="unknown-format-key"),
    # Values, checked by chatfields (limits shared with /ws/chat) and renamed to the Responses fields.
    pytest.param({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name", "invalid_value",
                 id="tool-name"),
    pytest.param({"tools": [WEATHER, WEATHER]}, "tools[1].name", "invalid_value", id="duplicate-tool"),
    pytest.param({"tools": [{"type": "function", "name": f"f{i}"} for i in range(5)]}, "tools", "invalid_value",
                 id="too-many-tools"),
    pytest.param({"tools": [{"type": "function", "name": "f",
                             "parameters": {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}}]},
                 "tools[0].parameters", "invalid_value", id="schema-too-deep"),
    pytest.param({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "tools[0].strict", "invalid_value",
                 id="tool-strict"),
    pytest.param({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice.name",
                 "invalid_value", id="tool-choice-unknown-name"),
    pytest.param({"tool_choice": "required"}, "tool_choice", "invalid_value", id="required-without-tools"),
    pytest.param({"tool_choice": "sometimes"}, "tool_choice", "invalid_value", id="tool-choice-value"),
    pytest.param({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_value", id="parallel"),
    pytest.param({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "invalid_value",
                 id="json-schema-no-schema"),
    pytest.param({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format.name",
                 "missing_required_parameter", id="json-schema-no-name"),
    pytest.param({"text": {"format": {"type": "yaml"}}}, "text.format.type", "invalid_value", id="format-type"),
    pytest.param({"reasoning": {"effort": "ultra"}}, "reasoning.effort", "invalid_value", id="effort"),
    pytest.param({"top_logprobs": 21}, "top_logprobs", "invalid_value", id="top-logprobs"),
    pytest.param({"temperature": 2.5}, "temperature", "invalid_value", id="temperature"),
    pytest.param({"top_p": "high"}, "top_p", "invalid_value", id="top-p"),
    pytest.param({"max_output_tokens": 0}, "max_output_tokens", "invalid_value", id="max-output-tokens-0"),
    pytest.param({"max_output_tokens": 1001}, "max_output_tokens", "invalid_value", id="max-output-tokens-limit"),
    pytest.param({"metadata": {"k": 1}}, "metadata.k", "invalid_value", id="metadata-value"),
    pytest.param({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value", id="metadata-pairs"),
    pytest.param({"model": 5}, "model", "invalid_value", id="model"),
    pytest.param({"generate": "no"}, "generate", "invalid_value", id="generate"),
    pytest.param({"instructions": ["x"]}, "instructions", "invalid_value", id="instructions"),
    pytest.param({"stream_id": "has space"}, "stream_id", "invalid_stream_id", id="stream-id"),
    pytest.param({"stream_id": "x" * 257}, "stream_id", "invalid_stream_id", id="stream-id-long"),
    pytest.param({"input": 5}, "input", "invalid_value", id="input-type"),
    pytest.param({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "invalid_value", id="role"),
    pytest.param({"input": [{"role": "user"}]}, "input[0].content", "missing_required_parameter", id="no-content"),
    pytest.param({"input": [{"role": "user", "content": []}]}, "input[0].content", "invalid_value",
                 id="empty-content"),
    pytest.param({"input": [{"content": "x"}]}, "input[0].type", "missing_required_parameter", id="no-type"),
    pytest.param({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id",
                 "missing_required_parameter", id="no-call-id"),
    pytest.param({"input": [{"type": "function_call", "call_id": "c", "name": "f f", "arguments": "{}"}]},
                 "input[0].name", "invalid_value", id="call-name"),
    pytest.param({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
                 "input[0].output[0]", "unsupported_value", id="output-image"),
    pytest.param({"input": "\ud800"}, "input", "invalid_value", id="lone-surrogate"),
    pytest.param({"input": [{"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"}
                            for i in range(MAX_TOOL_CALLS + 1)]}, "input", "invalid_value", id="too-many-calls"),
    pytest.param({"input": ["x"] * 17}, "input[0]", "invalid_value", id="item-type"),
    pytest.param({"input": [{"role": "user", "content": "x"}] * 17}, "input", "invalid_value", id="too-many-messages"),
    pytest.param({"input": None}, "input", "missing_required_parameter", id="no-input"),
]


@pytest.mark.parametrize(("fields", "param", "code"), REFUSED)
def test_refused(fields: dict[str, Any], param: str, code: str) -> None:
    error = rejection(frame(**{"input": "hi", **fields}))
    assert (error.param, error.code) == (param, code), error.message
    assert error.status == 400
    assert param.split("[")[0].split(".")[0] in error.message or "input" in error.message, error.message


def test_chatfields_messages_are_renamed() -> None:
    error = rejection(frame(input="hi", tools=[{"type": "function", "name": "bad name"}]))
    assert "tools[0].name" in error.message and "function" not in error.message


def test_errors_keep_the_lane() -> None:
    error = rejection(frame(input="hi", stream_id="lane", temperature=9))
    assert error.stream_id == "lane"
    assert json.loads(error.frame())["stream_id"] == "lane"
    # An invalid stream_id cannot route anything: the error goes to the default lane.
    assert rejection(frame(input="hi", stream_id="a b")).stream_id is None


@pytest.mark.parametrize(("text", "code", "param"), [
    pytest.param("{", "invalid_json", None, id="bad-json"),
    pytest.param("[" * 100_000, "invalid_json", None, id="deep-json"),
    pytest.param("[]", "invalid_value", "type", id="not-an-object"),
    pytest.param("{}", "missing_required_parameter", "type", id="no-type"),
    pytest.param('{"type": 1}', "invalid_value", "type", id="type-not-string"),
    pytest.param('{"type": "session.update"}', "invalid_value", "type", id="unknown-type"),
])
def test_bad_frames(text: str, code: str, param: str | None) -> None:
    error = rejection(text)
    assert (error.code, error.param) == (code, param)


def test_binary_frame_not_utf8() -> None:
    with pytest.raises(ResponsesError) as caught:
        parse_client_event(b"\xff\xfe", LIMITS, ResponseHistory())
    assert caught.value.code == "invalid_json"


def test_every_sdk_field_is_known() -> None:
    """Every field of the SDK's ResponseCreate is either handled or refused by name, never unknown."""
    for name in ResponseCreate.model_fields:
        error = outcome(frame(**{"input": "hi", name: {}}))
        if error is not None:
            assert error.code != "unknown_parameter", name
            assert error.param is not None and error.param.startswith(name), (name, error.param)
    error = outcome(frame(input="hi", frobnicate={}))
    assert error is not None and error.code == "unknown_parameter"


def outcome(text: str) -> ResponsesError | None:
    try:
        parse_client_event(text, LIMITS, ResponseHistory())
    except ResponsesError as error:
        return error
    return None


# --- previous_response_id ----------------------------------------------------------------------


def run(request: CreateResponse, events: list[ServerEvent], history: ResponseHistory) -> list[dict[str, Any]]:
    encoder, frames = encode(request, events)
    decoded = check_stream(frames, request.stream_id)
    assert history.store(request.id, request.input_items, encoder.output_items())
    return decoded


def test_previous_response_chains() -> None:
    history = ResponseHistory()
    first = create(history, rid="resp_1", instructions="be brief", input="weather in Oslo?", tools=[WEATHER])
    run(first, [Started("resp_1", "m"), Reasoning("resp_1", "use the tool"), Token("resp_1", "Checking."),
                ToolCall("resp_1", 0, "call_1", "get_weather", '{"city": "Oslo"}'),
                done("tool_calls", (AssembledToolCall("call_1", "get_weather", '{"city": "Oslo"}'),))], history)

    second = create(history, rid="resp_2", previous_response_id="resp_1", tools=[WEATHER],
                    input=[{"type": "function_call_output", "call_id": "call_1", "output": "12 °C"}])
    # The instructions are not carried over (as at OpenAI); the reasoning item is not sent to the engine.
    assert [dict(m) for m in second.request.messages] == [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{
            "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 °C"},
    ]
    assert second.previous_response_id == "resp_1"
    events = run(second, [Started("resp_2", "m"), Token("resp_2", "12 °C in Oslo."), done()], history)
    assert events[-1]["response"]["previous_response_id"] == "resp_1"

    third = create(history, rid="resp_3", previous_response_id="resp_2", instructions="new rules", input="thanks")
    assert dict(third.request.messages[0]) == {"role": "system", "content": "new rules"}
    assert [dict(m) for m in third.request.messages][-2:] == [
        {"role": "assistant", "content": "12 °C in Oslo."}, {"role": "user", "content": "thanks"}]
    assert len(third.input_items) == 7  # user, reasoning, message, call, output, message, user

    # A fork: another response from resp_1's state, on another lane.
    fork = create(history, rid="resp_4", previous_response_id="resp_1", stream_id="other",
                  input=[{"type": "function_call_output", "call_id": "call_1", "output": "-3 °C"}])
    assert [dict(m) for m in fork.request.messages][-1]["content"] == "-3 °C"


def test_warmup_chains() -> None:
    history = ResponseHistory()
    warm = create(history, rid="resp_w", generate=False, input=[{"role": "developer", "content": "context"}])
    history.store(warm.id, warm.input_items, ResponseEncoder(warm, "m", 0).output_items())
    turn = create(history, previous_response_id="resp_w", input="go")
    assert [dict(m) for m in turn.request.messages] == [{"role": "developer", "content": "context"},
                                                        {"role": "user", "content": "go"}]
    assert create(history, generate=False).input_items == ()


def test_previous_response_not_found() -> None:
    history = ResponseHistory()
    error = rejection(frame(input="hi", previous_response_id="resp_nope", stream_id="lane"), history)
    assert (error.code, error.param, error.stream_id) == ("previous_response_not_found", "previous_response_id",
                                                          "lane")


def test_chain_counts_toward_max_messages() -> None:
    history = ResponseHistory()
    history.store("resp_1", [{"type": "message", "role": "user", "content": "x"}] * 15, [])
    assert len(create(history, previous_response_id="resp_1", input="y").request.messages) == 16
    assert rejection(frame(previous_response_id="resp_1", input="y", instructions="z"), history).param == "input"


# --- history -----------------------------------------------------------------------------------

ITEM = {"type": "message", "role": "user", "content": "x" * 100}


def test_history_bounded_in_count() -> None:
    history = ResponseHistory(max_responses=3)
    for n in range(4):
        assert history.store(f"r{n}", [ITEM], [])
    assert "r0" not in history and len(history) == 3
    assert history.get("r1") is not None  # now the most recent
    history.store("r4", [ITEM], [])
    assert "r2" not in history and "r1" in history


def test_history_bounded_in_bytes() -> None:
    size = len(json.dumps(ITEM, separators=(",", ":")).encode())
    history = ResponseHistory(max_bytes=3 * size)
    for n in range(3):
        history.store(f"r{n}", [ITEM], [])
    assert history.bytes == 3 * size
    history.store("r3", [ITEM], [])
    assert "r0" not in history and history.bytes == 3 * size
    assert not history.store("big", [ITEM] * 4, [])
    assert "big" not in history and len(history) == 3
    history.store("r1", [ITEM, ITEM], [ITEM])  # replacing counts once
    assert history.bytes == 3 * size and len(history) == 1
    history.discard("r1")
    assert history.bytes == 0
    stored = history.store("r5", [ITEM], [ITEM]) and history.get("r5")
    assert stored and stored.input_items == (ITEM,) and stored.output_items == (ITEM,)
    with pytest.raises(ValueError, match="positive"):
        ResponseHistory(max_responses=0)


# --- steer, cancel, errors ---------------------------------------------------------------------


def test_steer_answered_with_steer_failed() -> None:
    steer_input = [{"type": "message", "role": "user", "content": "shorter please"}]
    data, is_create = _command({"type": "response.steer", "previous_response_id": "resp_1",
                                "input": [{"type": "message", "role": "user", "content": "shorter please"}]},
                               "ignored")
    assert not is_create
    event = parse_client_event(data, LIMITS, ResponseHistory())
    assert event == SteerResponse("resp_1", steer_input)
    text = steer_failed_frame(event, stream_id="lane", sequence_number=4)
    check_model(SERVER_EVENTS.validate_json(text))
    decoded = json.loads(text)
    assert decoded["type"] == "response.steer.failed"
    assert decoded["error"]["code"] == "steering_not_supported"
    assert "response.cancel" in decoded["error"]["message"]
    assert decoded["steer"] == {"previous_response_id": "resp_1", "input": steer_input}
    assert decoded["stream_id"] == "lane" and decoded["sequence_number"] == 4
    plain = parse_client_event('{"type": "response.steer", "previous_response_id": "r", "input": "hi"}', LIMITS,
                               ResponseHistory())
    assert isinstance(plain, SteerResponse)
    check_model(SERVER_EVENTS.validate_json(steer_failed_frame(plain)))


@pytest.mark.parametrize(("event", "param"), [
    ({"input": "x"}, "previous_response_id"),
    ({"previous_response_id": "r"}, "input"),
    ({"previous_response_id": "r", "input": []}, "input"),
    ({"previous_response_id": "", "input": "x"}, "previous_response_id"),
    ({"previous_response_id": "r", "input": "x", "stream_id": "lane"}, "stream_id"),
])
def test_bad_steer(event: dict[str, Any], param: str) -> None:
    assert rejection(json.dumps({"type": "response.steer", **event})).param == param


def test_cancel() -> None:
    history = ResponseHistory()
    assert parse_client_event('{"type": "response.cancel", "response_id": "resp_1"}', LIMITS, history) == \
        CancelResponse("resp_1", None)
    assert parse_client_event('{"type": "response.cancel", "stream_id": "lane"}', LIMITS, history) == \
        CancelResponse(None, "lane")
    assert rejection('{"type": "response.cancel"}').code == "missing_required_parameter"
    assert rejection('{"type": "response.cancel", "response_id": "r", "stream_id": "s"}').param == "response_id"
    assert rejection('{"type": "response.cancel", "stream_id": "a b"}').code == "invalid_stream_id"
    assert rejection('{"type": "response.cancel", "id": 1}').code == "unknown_parameter"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_frames(code: ErrorCode) -> None:
    text = error_frame(Error(None, code, "message", "param", 2.2 if code == ErrorCode.RATE_LIMITED else None),
                       "lane")
    check_model(SERVER_EVENTS.validate_json(text))
    event = json.loads(text)
    assert event["stream_id"] == "lane"
    assert event["error"]["message"] == "message" and event["error"]["param"] == "param"
    if code == ErrorCode.RATE_LIMITED:
        assert (event["status"], event["error"]["code"]) == (429, "rate_limit_exceeded")
        assert event["error"]["headers"] == {"retry-after": "3"}
    elif code == ErrorCode.INTERNAL_ERROR:
        assert (event["status"], event["error"]["code"]) == (500, "server_error")
    elif code in (ErrorCode.INVALID_REQUEST, ErrorCode.UNKNOWN_TYPE):
        assert (event["status"], event["error"]["code"]) == (400, "invalid_value")
    elif code == ErrorCode.UNKNOWN_ID:
        assert (event["status"], event["error"]["code"]) == (404, "response_not_found")
    else:
        assert event["error"]["code"] == code.value
        assert event["status"] >= 400
