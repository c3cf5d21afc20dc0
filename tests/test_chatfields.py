"""The chat-completions fields (tools, response_format, logprobs, ...), through real ``message`` frames."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioai.chatfields import MAX_TOOL_CALLS
from trioai.errors import ErrorCode, ProtocolError
from trioai.protocol import ROLES, ChatRequest, Limits, dumps, parse_client_event

LIMITS = Limits(max_messages=8, max_tokens_limit=100)
USER = [{"role": "user", "content": "hi"}]
SCHEMA: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                            "parameters": SCHEMA}}
F: dict[str, Any] = {"type": "function", "function": {"name": "f"}}
G: dict[str, Any] = {"type": "function", "function": {"name": "g-2_X"}}
CALL: dict[str, Any] = {"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL_ANSWER: dict[str, Any] = {"role": "tool", "content": "12 °C", "tool_call_id": "call_1"}
LONE_SURROGATE = "\ud800"  # json.dumps writes it as the escape "\ud800", which json.loads accepts
HUGE = 10**400  # an integer JSON allows and float() does not


def frame(messages: list[Any] | None = None, **fields: Any) -> str:
    """A ``message`` frame with id "q1" as JSON text (lone surrogates escaped, NaN written as NaN)."""
    return json.dumps({"type": "message", "id": "q1", "messages": USER if messages is None else messages, **fields})


def parse(text: str, limits: Limits = LIMITS) -> ChatRequest:
    event = parse_client_event(text, limits)
    assert isinstance(event, ChatRequest)
    return event


def rejection(text: str, limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(text, limits)
    return caught.value


def engine_json(event: ChatRequest) -> Any:
    """What the engine would receive, through the gateway's own strict encoder (no NaN, UTF-8 only)."""
    body = {"messages": list(event.messages), **event.chat_fields}
    return json.loads(dumps(body).encode("utf-8"))


# --- accepted forms ----------------------------------------------------------------------------

ACCEPTED: list[Any] = [
    pytest.param({}, {}, id="none"),
    pytest.param({"tools": [F]}, {"tools": [F]}, id="minimal-tool"),
    pytest.param({"tools": [WEATHER, {**G, "function": {**G["function"], "strict": True}}]},
                 {"tools": [WEATHER, {"type": "function", "function": {"name": "g-2_X", "strict": True}}]},
                 id="full-tools"),
    pytest.param({"tools": [{"type": "function", "x": 1, "function": {"name": "f", "extra": [1], "description": None,
                                                                      "parameters": None, "strict": None}}]},
                 {"tools": [F]}, id="tool-unknown-and-null-keys-dropped"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "description": "Wetter ☀ 🦜",
                                                              "parameters": {"description": "ü", "x": [1.5, None]}}}]},
                 {"tools": [{"type": "function", "function": {"name": "f", "description": "Wetter ☀ 🦜",
                                                              "parameters": {"description": "ü", "x": [1.5, None]}}}]},
                 id="non-ascii-text"),
    pytest.param({"tools": None, "tool_choice": None, "response_format": None, "logprobs": None,
                  "top_logprobs": None, "top_k": None, "min_p": None, "repetition_penalty": None,
                  "reasoning_effort": None, "parallel_tool_calls": None}, {}, id="nulls-are-absent"),
    pytest.param({"tools": []}, {}, id="empty-tools-dropped"),
    pytest.param({"tools": [], "tool_choice": "none"}, {}, id="empty-tools-and-none"),
    pytest.param({"tool_choice": "none"}, {}, id="choice-none-without-tools-dropped"),
    pytest.param({"tool_choice": "auto"}, {}, id="choice-auto-without-tools-dropped"),
    pytest.param({"tools": [F], "tool_choice": "auto"}, {"tools": [F], "tool_choice": "auto"}, id="choice-auto"),
    pytest.param({"tools": [F], "tool_choice": "none"}, {"tools": [F], "tool_choice": "none"}, id="choice-none"),
    pytest.param({"tools": [F], "tool_choice": "required"}, {"tools": [F], "tool_choice": "required"},
                 id="choice-required"),
    pytest.param({"tools": [F, G], "tool_choice": {"type": "function", "function": {"name": "g-2_X", "x": 1}, "y": 2}},
                 {"tools": [F, G], "tool_choice": {"type": "function", "function": {"name": "g-2_X"}}},
                 id="choice-named"),
    pytest.param({"parallel_tool_calls": False}, {"parallel_tool_calls": False}, id="parallel-false"),
    pytest.param({"tools": [F], "parallel_tool_calls": True}, {"tools": [F], "parallel_tool_calls": True},
                 id="parallel-true"),
    pytest.param({"response_format": {"type": "text"}}, {"response_format": {"type": "text"}}, id="format-text"),
    pytest.param({"response_format": {"type": "json_object", "json_schema": 5}},
                 {"response_format": {"type": "json_object"}}, id="format-json-object"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "City", "schema": SCHEMA}}},
                 {"response_format": {"type": "json_schema", "json_schema": {"name": "City", "schema": SCHEMA}}},
                 id="format-json-schema"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {
                     "name": "a" * 64, "schema": {}, "strict": False, "description": "d", "other": 1}}},
                 {"response_format": {"type": "json_schema", "json_schema": {
                     "name": "a" * 64, "description": "d", "schema": {}, "strict": False}}},
                 id="format-json-schema-full"),
    pytest.param({"logprobs": False}, {"logprobs": False}, id="logprobs-false"),
    pytest.param({"logprobs": True}, {"logprobs": True}, id="logprobs-true"),
    pytest.param({"logprobs": True, "top_logprobs": 0}, {"logprobs": True, "top_logprobs": 0}, id="top-logprobs-0"),
    pytest.param({"logprobs": True, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 20}, id="top-logprobs-20"),
    pytest.param({"top_k": -1}, {"top_k": -1}, id="top-k-off"),
    pytest.param({"top_k": 1}, {"top_k": 1}, id="top-k-1"),
    pytest.param({"top_k": 100000}, {"top_k": 100000}, id="top-k-max"),
    pytest.param({"min_p": 0}, {"min_p": 0.0}, id="min-p-0"),
    pytest.param({"min_p": 1}, {"min_p": 1.0}, id="min-p-1"),
    pytest.param({"min_p": 0.05}, {"min_p": 0.05}, id="min-p"),
    pytest.param({"repetition_penalty": 2}, {"repetition_penalty": 2.0}, id="repetition-max"),
    pytest.param({"repetition_penalty": 1e-9}, {"repetition_penalty": 1e-9}, id="repetition-tiny"),
    *(pytest.param({"reasoning_effort": e}, {"reasoning_effort": e}, id=f"effort-{e}")
      for e in ("none", "minimal", "low", "medium", "high")),
    pytest.param(
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
         "response_format": {"type": "json_object"}, "logprobs": True, "top_logprobs": 3, "top_k": 40,
         "min_p": 0.1, "repetition_penalty": 1.1, "reasoning_effort": "low", "unknown": {"x": 1}},
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
         "response_format": {"type": "json_object"}, "logprobs": True, "top_logprobs": 3, "top_k": 40,
         "min_p": 0.1, "repetition_penalty": 1.1, "reasoning_effort": "low"},
        id="everything"),
]


@pytest.mark.parametrize(("fields", "expected"), ACCEPTED)
def test_accepted_fields_become_engine_fields(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    event = parse(frame(**fields))
    assert dict(event.chat_fields) == expected
    for key in ("min_p", "repetition_penalty"):
        if key in expected:
            assert type(event.chat_fields[key]) is float
    assert engine_json(event) == {"messages": USER, **expected}
    # Normalised fields are a fixed point: sent again, they come back the same.
    assert dict(parse(frame(**event.chat_fields)).chat_fields) == expected


ACCEPTED_MESSAGES: list[Any] = [
    pytest.param(
        [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
         TOOL_ANSWER],
        [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
         TOOL_ANSWER],
        id="round-trip"),
    pytest.param(
        [{"role": "assistant", "content": "let me look", "tool_calls": [
            {**CALL, "index": 0, "function": {**CALL["function"], "extra": 1}},
            {"id": "c" * 256, "type": "function", "function": {"name": "f", "arguments": ""}}]}],
        [{"role": "assistant", "content": "let me look", "tool_calls": [
            CALL, {"id": "c" * 256, "type": "function", "function": {"name": "f", "arguments": ""}}]}],
        id="unknown-keys-dropped"),
    pytest.param(
        [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "é🦜", "type": "function", "function": {"name": "f", "arguments": '{"q": "ü"}'}}]}],
        [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "é🦜", "type": "function", "function": {"name": "f", "arguments": '{"q": "ü"}'}}]}],
        id="non-ascii"),
    pytest.param(
        [{"role": "user", "content": "x", "tool_calls": None, "tool_call_id": None},
         {"role": "assistant", "content": "y", "tool_calls": None}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        id="nulls-are-absent"),
    pytest.param(
        [{"role": "tool", "content": [{"type": "text", "text": "ok"}], "tool_call_id": "x" * 256, "name": "f"}],
        [{"role": "tool", "content": [{"type": "text", "text": "ok"}], "name": "f", "tool_call_id": "x" * 256}],
        id="tool-with-parts-and-name"),
    pytest.param(
        [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            for i in range(MAX_TOOL_CALLS)]}],
        [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            for i in range(MAX_TOOL_CALLS)]}],
        id="most-tool-calls"),
]


@pytest.mark.parametrize(("messages", "expected"), ACCEPTED_MESSAGES)
def test_accepted_message_fields(messages: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    event = parse(frame(messages, tools=[WEATHER]))
    assert [dict(m) for m in event.messages] == expected
    assert engine_json(event)["messages"] == expected


# --- rejections --------------------------------------------------------------------------------

def tools_with(**function: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "f", **function}}]


REJECTED: list[Any] = [
    # tools
    pytest.param({"tools": "f"}, "tools", id="tools-string"),
    pytest.param({"tools": {"type": "function"}}, "tools", id="tools-object"),
    pytest.param({"tools": [F, 1]}, "tools[1]", id="tool-not-object"),
    pytest.param({"tools": [{"function": {"name": "f"}}]}, "tools[0].type", id="tool-no-type"),
    pytest.param({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", id="tool-type"),
    pytest.param({"tools": [{"type": "function"}]}, "tools[0].function", id="tool-no-function"),
    pytest.param({"tools": [{"type": "function", "function": "f"}]}, "tools[0].function", id="tool-function-str"),
    pytest.param({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", id="name-missing"),
    pytest.param({"tools": tools_with(name="")}, "tools[0].function.name", id="name-empty"),
    pytest.param({"tools": tools_with(name="a" * 65)}, "tools[0].function.name", id="name-long"),
    pytest.param({"tools": tools_with(name="get weather")}, "tools[0].function.name", id="name-space"),
    pytest.param({"tools": tools_with(name="f\n")}, "tools[0].function.name", id="name-newline"),
    pytest.param({"tools": tools_with(name="café")}, "tools[0].function.name", id="name-non-ascii"),
    pytest.param({"tools": tools_with(name=5)}, "tools[0].function.name", id="name-int"),
    pytest.param({"tools": [F, G, F]}, "tools[2].function.name", id="name-duplicate"),
    pytest.param({"tools": tools_with(description=5)}, "tools[0].function.description", id="description-int"),
    pytest.param({"tools": tools_with(description="a" + LONE_SURROGATE)}, "tools[0].function.description",
                 id="description-surrogate"),
    pytest.param({"tools": tools_with(parameters="object")}, "tools[0].function.parameters", id="parameters-str"),
    pytest.param({"tools": tools_with(parameters=[])}, "tools[0].function.parameters", id="parameters-array"),
    pytest.param({"tools": tools_with(parameters={"x": [float("nan")]})}, "tools[0].function.parameters",
                 id="parameters-nan"),
    pytest.param({"tools": tools_with(parameters={"x": {"y": float("inf")}})}, "tools[0].function.parameters",
                 id="parameters-infinity"),
    pytest.param({"tools": tools_with(parameters={LONE_SURROGATE: 1})}, "tools[0].function.parameters",
                 id="parameters-surrogate-key"),
    pytest.param({"tools": tools_with(parameters={"enum": ["ok", LONE_SURROGATE]})}, "tools[0].function.parameters",
                 id="parameters-surrogate-value"),
    pytest.param({"tools": tools_with(strict="yes")}, "tools[0].function.strict", id="strict-str"),
    # tool_choice
    pytest.param({"tools": [F], "tool_choice": "any"}, "tool_choice", id="choice-unknown"),
    pytest.param({"tools": [F], "tool_choice": 1}, "tool_choice", id="choice-int"),
    pytest.param({"tools": [F], "tool_choice": ["auto"]}, "tool_choice", id="choice-array"),
    pytest.param({"tool_choice": "required"}, "tool_choice", id="required-without-tools"),
    pytest.param({"tools": [], "tool_choice": "required"}, "tool_choice", id="required-with-empty-tools"),
    pytest.param({"tools": [F], "tool_choice": {"function": {"name": "f"}}}, "tool_choice.type", id="named-no-type"),
    pytest.param({"tools": [F], "tool_choice": {"type": "tool", "function": {"name": "f"}}}, "tool_choice.type",
                 id="named-type"),
    pytest.param({"tools": [F], "tool_choice": {"type": "function"}}, "tool_choice.function", id="named-no-function"),
    pytest.param({"tools": [F], "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name",
                 id="named-no-name"),
    pytest.param({"tools": [F], "tool_choice": {"type": "function", "function": {"name": "a b"}}},
                 "tool_choice.function.name", id="named-bad-name"),
    pytest.param({"tools": [F], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                 "tool_choice.function.name", id="named-unknown"),
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice.function.name",
                 id="named-without-tools"),
    # parallel_tool_calls
    pytest.param({"parallel_tool_calls": "true"}, "parallel_tool_calls", id="parallel-str"),
    pytest.param({"parallel_tool_calls": 1}, "parallel_tool_calls", id="parallel-int"),
    # response_format
    pytest.param({"response_format": "json"}, "response_format", id="format-str"),
    pytest.param({"response_format": {}}, "response_format.type", id="format-no-type"),
    pytest.param({"response_format": {"type": "xml"}}, "response_format.type", id="format-type"),
    pytest.param({"response_format": {"type": ["text"]}}, "response_format.type", id="format-type-array"),
    pytest.param({"response_format": {"type": "json_schema"}}, "response_format.json_schema", id="schema-missing"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": "x"}},
                 "response_format.json_schema", id="json-schema-str"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
                 "response_format.json_schema.name", id="schema-no-name"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "a.b", "schema": SCHEMA}}},
                 "response_format.json_schema.name", id="schema-bad-name"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "C"}}},
                 "response_format.json_schema.schema", id="schema-no-schema"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "C", "schema": "{}"}}},
                 "response_format.json_schema.schema", id="schema-str"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "C", "schema": [SCHEMA]}}},
                 "response_format.json_schema.schema", id="schema-array"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "C", "schema": {
                     "minimum": float("-inf")}}}}, "response_format.json_schema.schema", id="schema-infinity"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "C", "schema": {
                     "title": LONE_SURROGATE}}}}, "response_format.json_schema.schema", id="schema-surrogate"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "C", "schema": {},
                                                                            "strict": 1}}},
                 "response_format.json_schema.strict", id="schema-strict"),
    pytest.param({"response_format": {"type": "json_schema", "json_schema": {"name": "C", "schema": {},
                                                                            "description": ["d"]}}},
                 "response_format.json_schema.description", id="schema-description"),
    # logprobs, top_logprobs
    pytest.param({"logprobs": 1}, "logprobs", id="logprobs-int"),
    pytest.param({"logprobs": "true"}, "logprobs", id="logprobs-str"),
    pytest.param({"top_logprobs": 5}, "top_logprobs", id="top-logprobs-alone"),
    pytest.param({"logprobs": False, "top_logprobs": 5}, "top_logprobs", id="top-logprobs-with-false"),
    pytest.param({"logprobs": True, "top_logprobs": 21}, "top_logprobs", id="top-logprobs-21"),
    pytest.param({"logprobs": True, "top_logprobs": -1}, "top_logprobs", id="top-logprobs-negative"),
    pytest.param({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs", id="top-logprobs-float"),
    pytest.param({"logprobs": True, "top_logprobs": True}, "top_logprobs", id="top-logprobs-bool"),
    # top_k, min_p, repetition_penalty, reasoning_effort
    pytest.param({"top_k": 0}, "top_k", id="top-k-0"),
    pytest.param({"top_k": -2}, "top_k", id="top-k-negative"),
    pytest.param({"top_k": 100001}, "top_k", id="top-k-large"),
    pytest.param({"top_k": HUGE}, "top_k", id="top-k-huge"),
    pytest.param({"top_k": 5.0}, "top_k", id="top-k-float"),
    pytest.param({"top_k": True}, "top_k", id="top-k-bool"),
    pytest.param({"top_k": "5"}, "top_k", id="top-k-str"),
    pytest.param({"min_p": -0.01}, "min_p", id="min-p-negative"),
    pytest.param({"min_p": 1.01}, "min_p", id="min-p-large"),
    pytest.param({"min_p": HUGE}, "min_p", id="min-p-huge-int"),
    pytest.param({"min_p": -HUGE}, "min_p", id="min-p-huge-negative-int"),
    pytest.param({"min_p": float("nan")}, "min_p", id="min-p-nan"),
    pytest.param({"min_p": float("inf")}, "min_p", id="min-p-infinity"),
    pytest.param({"min_p": "0.1"}, "min_p", id="min-p-str"),
    pytest.param({"min_p": True}, "min_p", id="min-p-bool"),
    pytest.param({"repetition_penalty": 0}, "repetition_penalty", id="repetition-0"),
    pytest.param({"repetition_penalty": -1}, "repetition_penalty", id="repetition-negative"),
    pytest.param({"repetition_penalty": 2.000001}, "repetition_penalty", id="repetition-large"),
    pytest.param({"repetition_penalty": HUGE}, "repetition_penalty", id="repetition-huge-int"),
    pytest.param({"repetition_penalty": float("-inf")}, "repetition_penalty", id="repetition-infinity"),
    pytest.param({"repetition_penalty": [1]}, "repetition_penalty", id="repetition-array"),
    pytest.param({"reasoning_effort": "max"}, "reasoning_effort", id="effort-unknown"),
    pytest.param({"reasoning_effort": "High"}, "reasoning_effort", id="effort-case"),
    pytest.param({"reasoning_effort": ""}, "reasoning_effort", id="effort-empty"),
    pytest.param({"reasoning_effort": ["low"]}, "reasoning_effort", id="effort-array"),
    pytest.param({"reasoning_effort": 1}, "reasoning_effort", id="effort-int"),
]


def check_rejection(error: ProtocolError, param: str) -> None:
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.param == param
    assert error.request_id == "q1"
    assert error.message
    assert param.split("[")[0].split(".")[0] in error.message
    assert len(error.message) < 300  # never echoes a huge input back


@pytest.mark.parametrize(("fields", "param"), REJECTED)
def test_rejected_fields_name_the_param(fields: dict[str, Any], param: str) -> None:
    check_rejection(rejection(frame(**fields)), param)


def calls(*call: Any) -> list[dict[str, Any]]:
    """A conversation whose third message is an assistant with these ``tool_calls``."""
    return [*USER, {"role": "assistant", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": list(call)}]


def call_with(**function: Any) -> dict[str, Any]:
    return {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}", **function}}


REJECTED_MESSAGES: list[Any] = [
    pytest.param([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls",
                 id="calls-on-user"),
    pytest.param([{**TOOL_ANSWER, "tool_calls": [CALL]}], "messages[0].tool_calls", id="calls-on-tool"),
    pytest.param([{"role": "system", "content": "x", "tool_calls": []}], "messages[0].tool_calls",
                 id="empty-calls-on-system"),
    pytest.param(calls(), "messages[2].tool_calls", id="calls-empty"),
    pytest.param([*USER, {"role": "assistant", "content": None, "tool_calls": CALL}], "messages[1].tool_calls",
                 id="calls-object"),
    pytest.param([*USER, {"role": "assistant", "content": None, "tool_calls": "call_1"}], "messages[1].tool_calls",
                 id="calls-str"),
    pytest.param(calls(*[CALL] * (MAX_TOOL_CALLS + 1)), "messages[2].tool_calls", id="calls-too-many"),
    pytest.param(calls(CALL, 5), "messages[2].tool_calls[1]", id="call-not-object"),
    pytest.param(calls(CALL, {"type": "function", "function": CALL["function"]}), "messages[2].tool_calls[1].id",
                 id="call-no-id"),
    pytest.param(calls({**CALL, "id": ""}), "messages[2].tool_calls[0].id", id="call-id-empty"),
    pytest.param(calls({**CALL, "id": "c" * 257}), "messages[2].tool_calls[0].id", id="call-id-long"),
    pytest.param(calls({**CALL, "id": 1}), "messages[2].tool_calls[0].id", id="call-id-int"),
    pytest.param(calls({**CALL, "id": LONE_SURROGATE}), "messages[2].tool_calls[0].id", id="call-id-surrogate"),
    pytest.param(calls({"id": "c", "function": CALL["function"]}), "messages[2].tool_calls[0].type",
                 id="call-no-type"),
    pytest.param(calls({**CALL, "type": "code"}), "messages[2].tool_calls[0].type", id="call-type"),
    pytest.param(calls({"id": "c", "type": "function"}), "messages[2].tool_calls[0].function", id="call-no-function"),
    pytest.param(calls({**CALL, "function": '{"name": "f"}'}), "messages[2].tool_calls[0].function",
                 id="call-function-str"),
    pytest.param(calls({**CALL, "function": {"arguments": "{}"}}), "messages[2].tool_calls[0].function.name",
                 id="call-no-name"),
    pytest.param(calls(call_with(name="a/b")), "messages[2].tool_calls[0].function.name", id="call-bad-name"),
    pytest.param(calls(call_with(name="a" * 65)), "messages[2].tool_calls[0].function.name", id="call-long-name"),
    pytest.param(calls({**CALL, "function": {"name": "f"}}), "messages[2].tool_calls[0].function.arguments",
                 id="call-no-arguments"),
    pytest.param(calls(call_with(arguments={"city": "Oslo"})), "messages[2].tool_calls[0].function.arguments",
                 id="call-arguments-object"),
    pytest.param(calls(call_with(arguments=None)), "messages[2].tool_calls[0].function.arguments",
                 id="call-arguments-null"),
    pytest.param(calls(call_with(arguments='{"q": "' + LONE_SURROGATE + '"}')),
                 "messages[2].tool_calls[0].function.arguments", id="call-arguments-surrogate"),
    pytest.param([*USER, {"role": "tool", "content": "12"}], "messages[1].tool_call_id", id="tool-without-id"),
    pytest.param([{**TOOL_ANSWER, "tool_call_id": None}], "messages[0].tool_call_id", id="tool-id-null"),
    pytest.param([{**TOOL_ANSWER, "tool_call_id": ""}], "messages[0].tool_call_id", id="tool-id-empty"),
    pytest.param([{**TOOL_ANSWER, "tool_call_id": "c" * 257}], "messages[0].tool_call_id", id="tool-id-long"),
    pytest.param([{**TOOL_ANSWER, "tool_call_id": 7}], "messages[0].tool_call_id", id="tool-id-int"),
    pytest.param([{**TOOL_ANSWER, "tool_call_id": LONE_SURROGATE}], "messages[0].tool_call_id",
                 id="tool-id-surrogate"),
    pytest.param([{"role": "user", "content": "x", "tool_call_id": "call_1"}], "messages[0].tool_call_id",
                 id="tool-id-on-user"),
    pytest.param([*USER, {"role": "assistant", "content": "x", "tool_call_id": "call_1"}], "messages[1].tool_call_id",
                 id="tool-id-on-assistant"),
]


@pytest.mark.parametrize(("messages", "param"), REJECTED_MESSAGES)
def test_rejected_message_fields_name_the_param(messages: list[Any], param: str) -> None:
    check_rejection(rejection(frame(messages)), param)


# --- limits ------------------------------------------------------------------------------------

def compact_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def with_schema(where: str, schema: Any) -> dict[str, Any]:
    if where == "tools[0].function.parameters":
        return {"tools": tools_with(parameters=schema)}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}


SCHEMA_PLACES = ["tools[0].function.parameters", "response_format.json_schema.schema"]


def test_tool_count_limit() -> None:
    limits = Limits(max_tools=2)
    assert len(parse(frame(tools=[F, G]), limits).chat_fields["tools"]) == 2
    check_rejection(rejection(frame(tools=[F, G, WEATHER]), limits), "tools")
    many = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]
    check_rejection(rejection(frame(tools=many), Limits()), "tools")
    assert len(parse(frame(tools=many[:128]), Limits()).chat_fields["tools"]) == 128


@pytest.mark.parametrize("where", SCHEMA_PLACES)
def test_schema_size_limit_counts_compact_utf8_bytes(where: str) -> None:
    schema = {"description": "é", "enum": [1, 2]}  # 32 characters, 33 bytes as compact JSON
    assert compact_size(schema) == 33
    assert parse(frame(**with_schema(where, schema)), Limits(max_schema_bytes=33)).chat_fields
    check_rejection(rejection(frame(**with_schema(where, schema)), Limits(max_schema_bytes=32)), where)


@pytest.mark.parametrize("where", SCHEMA_PLACES)
@pytest.mark.parametrize(("schema", "depth"), [
    ({}, 1),
    ({"a": 1}, 1),
    ({"a": {}}, 2),
    ({"a": []}, 2),
    ({"a": [{"b": "c"}]}, 3),
    ({"properties": {"x": {"type": "string"}}, "items": [1, 2]}, 3),
    ({"a": [[[]]]}, 4),
    ({"x": {}, "y": {"z": {"w": {}}}}, 4),
])
def test_schema_depth_limit(where: str, schema: Any, depth: int) -> None:
    assert parse(frame(**with_schema(where, schema)), Limits(max_schema_depth=depth)).chat_fields
    check_rejection(rejection(frame(**with_schema(where, schema)), Limits(max_schema_depth=depth - 1)), where)


@pytest.mark.parametrize("where", SCHEMA_PLACES)
def test_very_deep_schema_is_refused_without_recursion(where: str) -> None:
    deep = '{"a":' * 600 + "{}" + "}" * 600
    fields = json.dumps(with_schema(where, "DEEP")).replace('"DEEP"', deep)
    text = '{"type":"message","id":"q1","messages":[{"role":"user","content":"x"}],' + fields[1:]
    check_rejection(rejection(text, Limits()), where)
    # Without a depth limit worth the name, the walk (a loop, not recursion) still copes.
    assert parse(text, Limits(max_schema_depth=10**6)).chat_fields


def test_schema_limits_default_to_64_kib_and_32_deep() -> None:
    big = {"description": "x" * (65536 - len('{"description":""}'))}
    assert compact_size(big) == 65536
    assert parse(frame(**with_schema("tools[0].function.parameters", big)), Limits()).chat_fields
    big["description"] += "x"
    check_rejection(rejection(frame(**with_schema("tools[0].function.parameters", big)), Limits()),
                    "tools[0].function.parameters")
    nested: dict[str, Any] = {}
    for _ in range(31):
        nested = {"a": nested}
    assert parse(frame(**with_schema("response_format.json_schema.schema", nested)), Limits()).chat_fields
    check_rejection(rejection(frame(**with_schema("response_format.json_schema.schema", {"a": nested})), Limits()),
                    "response_format.json_schema.schema")


def test_errors_keep_the_request_id_and_integer_ids() -> None:
    text = json.dumps({"type": "message", "id": 9, "messages": USER, "top_k": 0})
    error = rejection(text)
    assert (error.request_id, error.param) == (9, "top_k")
    text = json.dumps({"type": "message", "messages": [{"role": "tool", "content": "x"}]})
    error = rejection(text)
    assert (error.request_id, error.param) == (None, "messages[0].tool_call_id")


# --- any JSON at all ----------------------------------------------------------------------------

TEXT = st.text(max_size=12) | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1,
                                      max_size=2)
LEAVES = (st.none() | st.booleans() | st.integers() | st.just(HUGE) | st.floats(allow_nan=True)
          | st.floats(-1, 25) | TEXT)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and objects of ``children`` (a named function: hypothesis cannot see into a lambda)."""
    return st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4)


ANY_JSON = st.recursive(LEAVES, containers, max_leaves=20)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A well-formed value or any JSON at all (hypothesis runs distinct inputs, so the small
    well-formed spaces are soon covered and the rest goes to malformed ones)."""
    return strategy | ANY_JSON


NAMES = maybe(st.sampled_from(["f", "g", "get_weather", "", "a b", "f\n"]))
SCHEMAS = maybe(st.dictionaries(TEXT, ANY_JSON, max_size=4))
FUNCTION = st.fixed_dictionaries(
    {"name": NAMES}, optional={"description": maybe(TEXT), "parameters": SCHEMAS, "strict": maybe(st.booleans())},
)
TOOL = st.fixed_dictionaries({"type": maybe(st.just("function")), "function": maybe(FUNCTION)})
TOOL_CHOICE = st.sampled_from(["auto", "none", "required"]) | st.fixed_dictionaries(
    {"type": maybe(st.just("function")), "function": maybe(st.fixed_dictionaries({"name": NAMES}))})
RESPONSE_FORMAT = st.fixed_dictionaries(
    {"type": maybe(st.sampled_from(["text", "json_object", "json_schema"]))},
    optional={"json_schema": maybe(st.fixed_dictionaries(
        {"name": NAMES, "schema": SCHEMAS}, optional={"strict": maybe(st.booleans()), "description": maybe(TEXT)}))},
)
SMALL_SCHEMAS = st.dictionaries(
    st.text(max_size=6), st.none() | st.booleans() | st.integers(-9, 9) | st.text(max_size=6), max_size=3
)


def tool_name(tool: dict[str, Any]) -> Any:
    return tool["function"]["name"]


#: Good tools within LIMITS_SMALL (distinct names, at most 2), sometimes three or garbage.
TOOLS = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "get_weather"])}, optional={"parameters": SMALL_SCHEMAS})}),
    max_size=2, unique_by=tool_name) | st.lists(TOOL, max_size=3)
REQUEST_FIELDS = {
    "tools": maybe(TOOLS), "tool_choice": maybe(TOOL_CHOICE),
    "parallel_tool_calls": maybe(st.booleans()), "response_format": maybe(RESPONSE_FORMAT),
    "logprobs": maybe(st.booleans()), "top_logprobs": maybe(st.integers(-1, 21)),
    "top_k": maybe(st.integers(-2, 100001)), "min_p": maybe(st.floats(-0.5, 1.5)),
    "repetition_penalty": maybe(st.floats(-0.5, 2.5)),
    "reasoning_effort": maybe(st.sampled_from(["none", "minimal", "low", "medium", "high", "x"])),
}
REQUEST_FRAME = st.fixed_dictionaries({"type": st.just("message"), "messages": st.just(USER)},
                                      optional=REQUEST_FIELDS)
CALL_STRATEGY = st.fixed_dictionaries({
    "id": maybe(st.text(min_size=1, max_size=8)), "type": maybe(st.just("function")),
    "function": maybe(st.fixed_dictionaries({"name": NAMES, "arguments": maybe(TEXT)})),
})
CALL_ID = maybe(st.text(min_size=1, max_size=8) | TEXT)
WELL_FORMED_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user"]), "content": st.text(max_size=8)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none() | st.text(max_size=8)},
                          optional={"tool_calls": maybe(st.lists(CALL_STRATEGY, min_size=1, max_size=3))}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": st.text(max_size=8), "tool_call_id": CALL_ID}),
)
ANY_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(sorted(ROLES)), "content": st.none() | st.text(max_size=8)},
    optional={"tool_calls": maybe(st.lists(CALL_STRATEGY, max_size=3)), "tool_call_id": CALL_ID},
)
MESSAGE = WELL_FORMED_MESSAGE | ANY_MESSAGE
LIMITS_SMALL = Limits(max_tools=2, max_schema_bytes=200, max_schema_depth=3)


def check_any_outcome(value: dict[str, Any]) -> str:
    """Parse ``value``: a ProtocolError naming a param, or a request whose engine body encodes."""
    outcome: ChatRequest | ProtocolError
    try:
        outcome = parse(json.dumps(value), LIMITS_SMALL)
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert outcome.code is ErrorCode.INVALID_REQUEST
        assert outcome.param
        assert len(outcome.message) < 300
        return "rejected"
    event = outcome
    engine_json(event)  # the engine body encodes: no NaN, no lone surrogate
    assert set(event.chat_fields) <= set(value)
    # Normalised fields and messages are a fixed point: sent again, they come back the same.
    again = parse(frame(list(event.messages), **event.chat_fields), LIMITS_SMALL)
    assert (again.chat_fields, again.messages) == (event.chat_fields, event.messages)
    return "accepted"


@settings(max_examples=500, deadline=None)
@given(REQUEST_FRAME)
def test_any_json_in_request_fields_is_parsed_or_a_protocol_error(value: dict[str, Any]) -> None:
    check_any_outcome(value)


ONE_FIELD = st.one_of(*(st.fixed_dictionaries({key: value}) for key, value in REQUEST_FIELDS.items()))


@settings(max_examples=500, deadline=None)
@given(ONE_FIELD, TOOLS)
def test_any_json_in_one_field_beside_good_tools_is_parsed_or_a_protocol_error(
    field: dict[str, Any], tools: list[dict[str, Any]]
) -> None:
    check_any_outcome({"type": "message", "messages": USER, "tools": tools, **field})


@settings(max_examples=300, deadline=None)
@given(st.lists(MESSAGE, min_size=1, max_size=4))
def test_any_json_in_message_fields_is_parsed_or_a_protocol_error(messages: list[dict[str, Any]]) -> None:
    check_any_outcome({"type": "message", "messages": messages})
