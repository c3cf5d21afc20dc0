"""The client protocol, sans I/O: parsing and validating client frames, encoding server events."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioai.errors import ErrorCode, ProtocolError
from trioai.protocol import (
    Cancelled,
    CancelRequest,
    ChatRequest,
    Done,
    Error,
    Limits,
    PingRequest,
    Pong,
    Queued,
    ServerEvent,
    Started,
    Token,
    Usage,
    encode,
    encode_id,
    encode_token,
    error_from,
    parse_client_event,
)

LIMITS = Limits(max_messages=4, max_tokens_limit=100)
USER = [{"role": "user", "content": "hi"}]


def parse(obj: Any, limits: Limits = LIMITS) -> Any:
    return parse_client_event(json.dumps(obj), limits)


def test_plain_seed_format_message() -> None:
    event = parse_client_event('{"type":"message","messages":[{"role":"user","content":"hi"}],"max_tokens":5}', LIMITS)
    assert event == ChatRequest(None, ({"role": "user", "content": "hi"},), 5)
    assert event.sampling.to_payload() == {}


def test_unknown_fields_are_ignored_and_ids_kept() -> None:
    event = parse({"type": "message", "id": "q1", "messages": USER, "max_tokens": 3, "stream": True, "x": [1]})
    assert isinstance(event, ChatRequest)
    assert event.id == "q1"
    assert parse({"type": "message", "id": 7, "messages": USER}).id == 7


def test_max_tokens_default_comes_from_limits() -> None:
    assert parse({"type": "message", "messages": USER}).max_tokens is None
    assert parse({"type": "message", "messages": USER}, Limits(default_max_tokens=64)).max_tokens == 64


def test_sampling_fields_pass_through() -> None:
    event = parse({"type": "message", "messages": USER, "temperature": 0.7, "top_p": 1, "stop": "\n",
                   "seed": 42, "presence_penalty": -1.5, "frequency_penalty": 2})
    assert event.sampling.to_payload() == {"temperature": 0.7, "top_p": 1.0, "stop": ["\n"], "seed": 42,
                                           "presence_penalty": -1.5, "frequency_penalty": 2.0}
    assert parse({"type": "message", "messages": USER, "stop": ["a", "b"]}).sampling.to_payload() == {
        "stop": ["a", "b"]
    }


def test_message_keeps_only_known_message_fields() -> None:
    event = parse({"type": "message", "messages": [
        {"role": "system", "content": "be brief", "extra": 1},
        {"role": "assistant", "content": None, "name": "bot"},
        {"role": "user", "content": [{"type": "text", "text": "look"}]},
    ]})
    assert event.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": None, "name": "bot"},
        {"role": "user", "content": [{"type": "text", "text": "look"}]},
    )


def test_cancel_and_ping() -> None:
    assert parse({"type": "cancel"}) == CancelRequest(None)
    assert parse({"type": "cancel", "id": "a"}) == CancelRequest("a")
    assert parse({"type": "ping", "id": 3}) == PingRequest(3)


BAD_INPUTS: list[tuple[str | bytes, ErrorCode, str | None]] = [
    (b'{"type":"ping"}', ErrorCode.UNSUPPORTED_FRAME, None),
    ("not json", ErrorCode.INVALID_JSON, None),
    ("[" * 100_000 + "]" * 100_000, ErrorCode.INVALID_JSON, None),
    ('{"type":"message","id":' + "9" * 5000 + "}", ErrorCode.INVALID_JSON, None),
    ("[1, 2]", ErrorCode.INVALID_REQUEST, "type"),
    ('"message"', ErrorCode.INVALID_REQUEST, "type"),
    ("{}", ErrorCode.INVALID_REQUEST, "type"),
    ('{"type": 5}', ErrorCode.INVALID_REQUEST, "type"),
    ('{"type": "generate"}', ErrorCode.UNKNOWN_TYPE, "type"),
    ('{"type": "ping", "id": 1.5}', ErrorCode.INVALID_REQUEST, "id"),
    ('{"type": "ping", "id": true}', ErrorCode.INVALID_REQUEST, "id"),
    ('{"type": "ping", "id": {"a": 1}}', ErrorCode.INVALID_REQUEST, "id"),
    ('{"type": "ping", "id": ""}', ErrorCode.INVALID_REQUEST, "id"),
    (json.dumps({"type": "ping", "id": "x" * 129}), ErrorCode.INVALID_REQUEST, "id"),
    ('{"type": "ping", "id": 9223372036854775808}', ErrorCode.INVALID_REQUEST, "id"),
    ('{"type": "ping", "id": "\\ud800"}', ErrorCode.INVALID_REQUEST, "id"),
    ('{"type": "message"}', ErrorCode.INVALID_REQUEST, "messages"),
    ('{"type": "message", "messages": []}', ErrorCode.INVALID_REQUEST, "messages"),
    ('{"type": "message", "messages": "hi"}', ErrorCode.INVALID_REQUEST, "messages"),
    (json.dumps({"type": "message", "messages": USER * 5}), ErrorCode.INVALID_REQUEST, "messages"),
    ('{"type": "message", "messages": ["hi"]}', ErrorCode.INVALID_REQUEST, "messages[0]"),
    ('{"type": "message", "messages": [{"role": "robot", "content": "x"}]}', ErrorCode.INVALID_REQUEST,
     "messages[0].role"),
    ('{"type": "message", "messages": [{"role": "user", "content": 5}]}', ErrorCode.INVALID_REQUEST,
     "messages[0].content"),
    ('{"type": "message", "messages": [{"role": "user"}]}', ErrorCode.INVALID_REQUEST, "messages[0].content"),
    ('{"type": "message", "messages": [{"role": "user", "content": "\\udfff"}]}', ErrorCode.INVALID_REQUEST,
     "messages[0].content"),
    ('{"type": "message", "messages": [{"role": "user", "content": [5]}]}', ErrorCode.INVALID_REQUEST,
     "messages[0].content"),
    ('{"type": "message", "messages": [{"role": "user", "content": [{"type": "t", "x": [[[[[[1]]]]]]}]}]}',
     ErrorCode.INVALID_REQUEST, "messages[0].content"),
    ('{"type": "message", "messages": [{"role": "user", "content": "x", "name": ""}]}', ErrorCode.INVALID_REQUEST,
     "messages[0].name"),
    (json.dumps({"type": "message", "messages": USER, "max_tokens": 0}), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (json.dumps({"type": "message", "messages": USER, "max_tokens": -3}), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (json.dumps({"type": "message", "messages": USER, "max_tokens": 101}), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (json.dumps({"type": "message", "messages": USER, "max_tokens": True}), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (json.dumps({"type": "message", "messages": USER, "max_tokens": 5.0}), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (json.dumps({"type": "message", "messages": USER, "max_tokens": "5"}), ErrorCode.INVALID_REQUEST, "max_tokens"),
    (json.dumps({"type": "message", "messages": USER, "temperature": 2.5}), ErrorCode.INVALID_REQUEST,
     "temperature"),
    ('{"type": "message", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     ErrorCode.INVALID_REQUEST, "temperature"),
    ('{"type": "message", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
     ErrorCode.INVALID_REQUEST, "top_p"),
    (json.dumps({"type": "message", "messages": USER, "top_p": "high"}), ErrorCode.INVALID_REQUEST, "top_p"),
    (json.dumps({"type": "message", "messages": USER, "stop": []}), ErrorCode.INVALID_REQUEST, "stop"),
    (json.dumps({"type": "message", "messages": USER, "stop": ["a"] * 9}), ErrorCode.INVALID_REQUEST, "stop"),
    (json.dumps({"type": "message", "messages": USER, "stop": [1]}), ErrorCode.INVALID_REQUEST, "stop"),
    (json.dumps({"type": "message", "messages": USER, "stop": "x" * 257}), ErrorCode.INVALID_REQUEST, "stop"),
    (json.dumps({"type": "message", "messages": USER, "seed": 2**64}), ErrorCode.INVALID_REQUEST, "seed"),
    (json.dumps({"type": "message", "messages": USER, "seed": 1.5}), ErrorCode.INVALID_REQUEST, "seed"),
    (json.dumps({"type": "message", "messages": USER, "presence_penalty": -3}), ErrorCode.INVALID_REQUEST,
     "presence_penalty"),
    (json.dumps({"type": "message", "messages": USER, "frequency_penalty": [1]}), ErrorCode.INVALID_REQUEST,
     "frequency_penalty"),
]


@pytest.mark.parametrize(("frame", "code", "param"), BAD_INPUTS)
def test_bad_input_is_a_protocol_error_naming_the_field(frame: str | bytes, code: ErrorCode, param: str | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(frame, LIMITS)
    assert caught.value.code is code
    assert caught.value.param == param
    assert caught.value.message
    if param is not None and param != "type":
        assert param.split("[")[0].split(".")[0] in caught.value.message
    assert len(caught.value.message) < 300  # never echoes a huge input back


def test_errors_carry_the_request_id_when_it_was_valid() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse({"type": "message", "id": "q9", "messages": []})
    assert caught.value.request_id == "q9"
    event = error_from(caught.value)
    assert event == Error("q9", "invalid_request", "field 'messages' must be a non-empty array", "messages")
    assert json.loads(encode(event)) == {"type": "error", "id": "q9", "code": "invalid_request",
                                         "message": "field 'messages' must be a non-empty array",
                                         "param": "messages"}


def json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and objects of ``children`` (a named function: hypothesis cannot see into this lambda)."""
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    json_containers,
    max_leaves=20,
)
EVENT_LIKE = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "cancel", "ping", "other"])},
    optional={"id": JSON_VALUES, "messages": JSON_VALUES, "max_tokens": JSON_VALUES, "temperature": JSON_VALUES,
              "stop": JSON_VALUES, "seed": JSON_VALUES, "top_p": JSON_VALUES},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON_VALUES, EVENT_LIKE))
def test_parser_only_ever_raises_protocol_error_on_json(value: Any) -> None:
    outcome: object
    try:
        outcome = parse_client_event(json.dumps(value), LIMITS)
    except ProtocolError as exc:
        outcome = exc
    assert isinstance(outcome, ProtocolError | ChatRequest | CancelRequest | PingRequest)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_parser_only_ever_raises_protocol_error_on_any_frame(frame: str | bytes) -> None:
    outcome: object
    try:
        outcome = parse_client_event(frame, LIMITS)
    except ProtocolError as exc:
        outcome = exc
    assert isinstance(outcome, ProtocolError | ChatRequest | CancelRequest | PingRequest)


MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                           "content": st.text(st.characters(exclude_categories=["Cs"]), max_size=50)}),
    min_size=1, max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(MESSAGES, st.one_of(st.none(), st.text(min_size=1, max_size=128).filter(lambda s: s.isprintable()),
                           st.integers(-(2**63), 2**63 - 1)), st.integers(1, 100))
def test_valid_requests_round_trip(messages: list[dict[str, str]], request_id: Any, max_tokens: int) -> None:
    frame = {"type": "message", "messages": messages, "max_tokens": max_tokens}
    if request_id is not None:
        frame["id"] = request_id
    event = parse_client_event(json.dumps(frame), LIMITS)
    assert event == ChatRequest(request_id, tuple(messages), max_tokens)


def test_encode_every_server_event() -> None:
    events: dict[ServerEvent, dict[str, Any]] = {
        Started("r1", "gemma"): {"type": "start", "id": "r1", "model": "gemma"},
        Queued("r1", 2): {"type": "queued", "id": "r1", "position": 2},
        Token(3, "Hel"): {"type": "token", "id": 3, "content": "Hel"},
        Done("r1", "stop", Usage(9, 12), 38.21, 61.04): {
            "type": "done", "id": "r1", "finish_reason": "stop",
            "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21, "source": "engine"},
            "ttft_ms": 38.2, "tokens_per_s": 61.0,
        },
        Done("r2", "length", Usage(None, 4, source="gateway"), None, None): {
            "type": "done", "id": "r2", "finish_reason": "length",
            "usage": {"prompt_tokens": None, "completion_tokens": 4, "total_tokens": None, "source": "gateway"},
            "ttft_ms": None, "tokens_per_s": None,
        },
        Cancelled("r1"): {"type": "cancelled", "id": "r1"},
        Error("r1", "upstream_overloaded", "busy", retry_after=2.0): {
            "type": "error", "id": "r1", "code": "upstream_overloaded", "message": "busy", "retry_after": 2.0,
        },
        Error(None, "invalid_json", "bad"): {"type": "error", "id": None, "code": "invalid_json", "message": "bad"},
        Pong(None): {"type": "pong", "id": None},
    }
    for event, expected in events.items():
        assert json.loads(encode(event)) == expected


@given(st.text(), st.one_of(st.text(max_size=20), st.integers()))
def test_token_fast_path_matches_the_generic_encoder(content: str, request_id: str | int) -> None:
    frame = encode_token(encode_id(request_id), content)
    assert frame == encode(Token(request_id, content))
    assert json.loads(frame) == {"type": "token", "id": request_id, "content": content}


def test_a_joined_token_says_how_many_deltas_it_holds() -> None:
    assert json.loads(encode_token(encode_id("a"), "xy", None, 2)) == {
        "type": "token", "id": "a", "content": "xy", "deltas": 2}
    assert json.loads(encode_token(encode_id("a"), "xy", [{"token": "x"}, {"token": "y"}], 2)) == {
        "type": "token", "id": "a", "content": "xy", "logprobs": [{"token": "x"}, {"token": "y"}], "deltas": 2}
    assert "deltas" not in json.loads(encode_token(encode_id("a"), "x", None, 1))


def test_token_content_with_json_special_characters() -> None:
    content = 'quote " backslash \\ newline \n tab \t nul \x00 emoji 🦜 and ü'
    assert json.loads(encode_token(encode_id("a"), content))["content"] == content


# --- max_completion_tokens and n (parsed by protocol.py; the other chat fields: test_chatfields.py) ---


@pytest.mark.parametrize(("fields", "max_tokens"), [
    ({"max_completion_tokens": 50}, 50),
    ({"max_tokens": 7, "max_completion_tokens": 7}, 7),
    ({"max_tokens": 7, "max_completion_tokens": None}, 7),
    ({"max_tokens": None, "max_completion_tokens": 100}, 100),
    ({"max_completion_tokens": 1}, 1),
])
def test_max_completion_tokens_is_an_alias_of_max_tokens(fields: dict[str, Any], max_tokens: int) -> None:
    assert parse({"type": "message", "messages": USER, **fields}).max_tokens == max_tokens


def test_max_completion_tokens_wins_over_the_default() -> None:
    limits = Limits(max_tokens_limit=100, default_max_tokens=64)
    assert parse({"type": "message", "messages": USER, "max_completion_tokens": 9}, limits).max_tokens == 9


@pytest.mark.parametrize("n", [1, None])
def test_n_of_one_is_accepted(n: int | None) -> None:
    event = parse({"type": "message", "messages": USER, "n": n, "max_tokens": 5})
    assert event == ChatRequest(None, tuple(USER), 5)


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": 7, "max_completion_tokens": 8}, "max_completion_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 101}, "max_completion_tokens"),
    ({"max_completion_tokens": "5"}, "max_completion_tokens"),
    ({"max_completion_tokens": True}, "max_completion_tokens"),
    ({"max_completion_tokens": 5.5}, "max_completion_tokens"),
    ({"max_tokens": 0, "max_completion_tokens": 5}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"n": 0}, "n"),
    ({"n": -1}, "n"),
    ({"n": True}, "n"),
    ({"n": "1"}, "n"),
    ({"n": [1]}, "n"),
])
def test_max_completion_tokens_and_n_rejections(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse({"type": "message", "id": "q2", "messages": USER, **fields})
    assert (caught.value.code, caught.value.param, caught.value.request_id) == (ErrorCode.INVALID_REQUEST, param, "q2")
    assert param in caught.value.message


def test_a_huge_integer_sampling_value_is_an_invalid_request_not_a_crash() -> None:
    """math.isfinite(10**400) raises OverflowError, which is not a ProtocolError."""
    frame = '{"type":"message","messages":[{"role":"user","content":"x"}],"temperature":1' + "0" * 400 + "}"
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(frame, Limits())
    assert caught.value.param == "temperature"
