"""The chat-completions fields beyond text, sans I/O: validated, then passed to the engine as they are.

``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``, ``logprobs``,
``top_logprobs``, ``top_k``, ``min_p``, ``repetition_penalty``, ``reasoning_effort`` on a
``message``; ``tool_calls`` on assistant messages and ``tool_call_id`` on tool messages.
docs/protocol.md has the rules. Each failure is raised through the ``invalid(param, message)``
callable the caller passes (it builds the ``ProtocolError`` with the request's id), so this module
knows nothing of events or ids.

A ``null`` field counts as absent, as for the sampling fields. Objects are rebuilt with their known
keys only, so the engine never sees a key nobody validated.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .protocol import Limits

Invalid = Callable[[str, str], Exception]

#: Tool and function names, as OpenAI allows them.
NAME_RULE: Final = "1 to 64 characters of A-Z a-z 0-9 _ -"
_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Longest ``tool_calls[].id`` and ``tool_call_id``.
MAX_CALL_ID_LENGTH: Final = 256
#: Most ``tool_calls`` in one message: ``Limits.max_tools``'s default (message parsing gets no limits).
MAX_TOOL_CALLS: Final = 128
TOOL_CHOICES: Final = ("none", "auto", "required")
RESPONSE_FORMATS: Final = ("text", "json_object", "json_schema")
REASONING_EFFORTS: Final = ("none", "minimal", "low", "medium", "high")
MAX_TOP_LOGPROBS: Final = 20
MAX_TOP_K: Final = 100_000


# --- request fields ----------------------------------------------------------------------------


def parse_request_fields(obj: dict[str, Any], limits: Limits, invalid: Invalid) -> dict[str, Any]:
    """The validated chat fields of a ``message`` (only those present), as engine request keys.

    ``tools: []`` is the same as no tools, and ``tool_choice`` ``"none"``/``"auto"`` without tools
    means nothing: both are dropped (vLLM refuses a ``tool_choice`` without ``tools``).
    """
    out: dict[str, Any] = {}
    tools = _tools(obj.get("tools"), limits, invalid)
    if tools:
        out["tools"] = tools
    names = {tool["function"]["name"] for tool in tools}
    choice = _tool_choice(obj.get("tool_choice"), names, bool(tools), invalid)
    if choice is not None and tools:
        out["tool_choice"] = choice
    parallel = obj.get("parallel_tool_calls")
    if parallel is not None:
        out["parallel_tool_calls"] = _bool(parallel, "parallel_tool_calls", invalid)
    response_format = obj.get("response_format")
    if response_format is not None:
        out["response_format"] = _response_format(response_format, limits, invalid)
    out.update(_logprobs(obj, invalid))
    top_k = obj.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or not (top_k == -1 or 1 <= top_k <= MAX_TOP_K):
            raise invalid("top_k", f"field 'top_k' must be an integer, -1 (off) or 1 to {MAX_TOP_K}")
        out["top_k"] = top_k
    min_p = obj.get("min_p")
    if min_p is not None:
        _require_number(min_p, "min_p", invalid)
        if not 0 <= min_p <= 1:
            raise invalid("min_p", "field 'min_p' must be between 0 and 1")
        out["min_p"] = float(min_p)
    penalty = obj.get("repetition_penalty")
    if penalty is not None:
        _require_number(penalty, "repetition_penalty", invalid)
        if not 0 < penalty <= 2:
            raise invalid("repetition_penalty", "field 'repetition_penalty' must be greater than 0 and at most 2")
        out["repetition_penalty"] = float(penalty)
    effort = obj.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise invalid("reasoning_effort", f"field 'reasoning_effort' must be one of {_choices(REASONING_EFFORTS)}")
        out["reasoning_effort"] = effort
    return out


def _tools(value: Any, limits: Limits, invalid: Invalid) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tools", "field 'tools' must be an array of function tools")
    if len(value) > limits.max_tools:
        raise invalid("tools", f"field 'tools' has more than {limits.max_tools} entries")
    tools: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(value):
        param = f"tools[{index}]"
        if not isinstance(raw, dict):
            raise invalid(param, f"field '{param}' must be an object {{\"type\": \"function\", \"function\": {{...}}}}")
        if raw.get("type") != "function":
            raise invalid(param + ".type", f"field '{param}.type' must be \"function\"")
        function = raw.get("function")
        if not isinstance(function, dict):
            raise invalid(param + ".function", f"field '{param}.function' must be an object with a 'name'")
        name = _name(function.get("name"), param + ".function.name", invalid)
        if name in seen:
            raise invalid(
                param + ".function.name", f"field '{param}.function.name' repeats the name of tools[{seen[name]}]"
            )
        seen[name] = index
        spec: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            spec["description"] = _string(description, param + ".function.description", invalid)
        parameters = function.get("parameters")
        if parameters is not None:
            spec["parameters"] = _schema(parameters, param + ".function.parameters", limits, invalid)
        strict = function.get("strict")
        if strict is not None:
            spec["strict"] = _bool(strict, param + ".function.strict", invalid)
        tools.append({"type": "function", "function": spec})
    return tools


def _tool_choice(value: Any, names: set[str], has_tools: bool, invalid: Invalid) -> str | dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str) and value in TOOL_CHOICES:
        if value == "required" and not has_tools:
            raise invalid("tool_choice", "field 'tool_choice' is \"required\" but 'tools' is empty or missing")
        return value
    if not isinstance(value, dict):
        raise invalid(
            "tool_choice",
            f"field 'tool_choice' must be one of {_choices(TOOL_CHOICES)} "
            'or {"type": "function", "function": {"name": ...}}',
        )
    if value.get("type") != "function":
        raise invalid("tool_choice.type", "field 'tool_choice.type' must be \"function\"")
    function = value.get("function")
    if not isinstance(function, dict):
        raise invalid("tool_choice.function", "field 'tool_choice.function' must be an object with a 'name'")
    name = _name(function.get("name"), "tool_choice.function.name", invalid)
    if name not in names:
        raise invalid(
            "tool_choice.function.name", f"field 'tool_choice.function.name' names {name!r}, not one of 'tools'"
        )
    return {"type": "function", "function": {"name": name}}


def _response_format(value: Any, limits: Limits, invalid: Invalid) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid("response_format", "field 'response_format' must be an object with a 'type'")
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise invalid(
            "response_format.type", f"field 'response_format.type' must be one of {_choices(RESPONSE_FORMATS)}"
        )
    if kind != "json_schema":
        return {"type": kind}
    param = "response_format.json_schema"
    raw = value.get("json_schema")
    if not isinstance(raw, dict):
        raise invalid(param, f"field '{param}' must be an object with 'name' and 'schema'")
    spec: dict[str, Any] = {"name": _name(raw.get("name"), param + ".name", invalid)}
    description = raw.get("description")
    if description is not None:
        spec["description"] = _string(description, param + ".description", invalid)
    schema = raw.get("schema")
    if schema is None:
        raise invalid(param + ".schema", f"field '{param}.schema' is required: a JSON Schema object")
    spec["schema"] = _schema(schema, param + ".schema", limits, invalid)
    strict = raw.get("strict")
    if strict is not None:
        spec["strict"] = _bool(strict, param + ".strict", invalid)
    return {"type": "json_schema", "json_schema": spec}


def _logprobs(obj: dict[str, Any], invalid: Invalid) -> dict[str, Any]:
    out: dict[str, Any] = {}
    logprobs = obj.get("logprobs")
    if logprobs is not None:
        out["logprobs"] = _bool(logprobs, "logprobs", invalid)
    top = obj.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise invalid("top_logprobs", f"field 'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        if logprobs is not True:
            raise invalid("top_logprobs", "field 'top_logprobs' needs \"logprobs\": true")
        out["top_logprobs"] = top
    return out


# --- message fields ----------------------------------------------------------------------------


def parse_message_fields(raw: dict[str, Any], role: str, invalid: Invalid) -> dict[str, Any]:
    """The validated extra fields of one entry of ``messages`` (``tool_calls``, ``tool_call_id``).

    ``invalid`` takes a suffix of the message's param (``".tool_calls[0].id"``) and a message.
    """
    out: dict[str, Any] = {}
    calls = raw.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise invalid(".tool_calls", f"'tool_calls' in messages is only allowed on role assistant, not {role}")
        out["tool_calls"] = _tool_calls(calls, invalid)
    call_id = raw.get("tool_call_id")
    if role == "tool":
        if call_id is None:
            raise invalid(".tool_call_id", "a message of role tool in messages needs the 'tool_call_id' it answers")
        out["tool_call_id"] = _call_id(call_id, ".tool_call_id", invalid)
    elif call_id is not None:
        raise invalid(".tool_call_id", f"'tool_call_id' in messages is only allowed on role tool, not {role}")
    return out


def _tool_calls(value: Any, invalid: Invalid) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid(".tool_calls", "'tool_calls' in messages must be a non-empty array of calls")
    if len(value) > MAX_TOOL_CALLS:
        raise invalid(".tool_calls", f"'tool_calls' in messages has more than {MAX_TOOL_CALLS} entries")
    calls: list[dict[str, Any]] = []
    for index, raw in enumerate(value):
        suffix = f".tool_calls[{index}]"
        if not isinstance(raw, dict):
            raise invalid(suffix, f"'{suffix[1:]}' in messages must be an object with 'id', 'type' and 'function'")
        call_id = _call_id(raw.get("id"), suffix + ".id", invalid)
        if raw.get("type") != "function":
            raise invalid(suffix + ".type", f"'{suffix[1:]}.type' in messages must be \"function\"")
        function = raw.get("function")
        if not isinstance(function, dict):
            raise invalid(suffix + ".function", f"'{suffix[1:]}.function' in messages must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise invalid(suffix + ".function.name", f"'{suffix[1:]}.function.name' in messages must be {NAME_RULE}")
        arguments = function.get("arguments")
        if not isinstance(arguments, str) or not is_encodable(arguments):
            raise invalid(
                suffix + ".function.arguments",
                f"'{suffix[1:]}.function.arguments' in messages must be a string (the JSON text of the arguments)",
            )
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _call_id(value: Any, suffix: str, invalid: Invalid) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CALL_ID_LENGTH or not is_encodable(value):
        raise invalid(suffix, f"'{suffix[1:]}' in messages must be a string of 1 to {MAX_CALL_ID_LENGTH} characters")
    return value


# --- shared checks -----------------------------------------------------------------------------


def _schema(value: Any, param: str, limits: Limits, invalid: Invalid) -> dict[str, Any]:
    """A JSON Schema object within the depth and size limits, every string UTF-8, every number finite.

    The walk is iterative and stops at the depth limit; ``{}`` is 1 deep, each nested object or array
    one more. The size is that of the compact JSON in UTF-8 bytes.
    """
    if not isinstance(value, dict):
        raise invalid(param, f"field '{param}' must be a JSON Schema object")
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_schema_depth:
            raise invalid(param, f"field '{param}' is nested more than {limits.max_schema_depth} deep")
        if isinstance(node, dict):
            if not all(isinstance(key, str) and is_encodable(key) for key in node):
                raise invalid(param, f"field '{param}' has a key that is not valid UTF-8 text")
            children: Any = node.values()
        else:
            children = node
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif isinstance(child, str):
                if not is_encodable(child):
                    raise invalid(param, f"field '{param}' has a string that is not valid UTF-8 text")
            elif isinstance(child, float):
                if not math.isfinite(child):
                    raise invalid(param, f"field '{param}' holds a non-finite number")
            elif not (child is None or isinstance(child, int)):
                raise invalid(param, f"field '{param}' is not plain JSON")
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise invalid(param, f"field '{param}' is not plain JSON") from None
    if size > limits.max_schema_bytes:
        raise invalid(param, f"field '{param}' is larger than {limits.max_schema_bytes} bytes as compact JSON")
    return value


def _name(value: Any, param: str, invalid: Invalid) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise invalid(param, f"field '{param}' must be {NAME_RULE}")
    return value


def _string(value: Any, param: str, invalid: Invalid) -> str:
    if not isinstance(value, str) or not is_encodable(value):
        raise invalid(param, f"field '{param}' must be a string of valid UTF-8 text")
    return value


def _bool(value: Any, param: str, invalid: Invalid) -> bool:
    if not isinstance(value, bool):
        raise invalid(param, f"field '{param}' must be true or false")
    return value


def _require_number(value: Any, param: str, invalid: Invalid) -> None:
    # Not math.isfinite(value) on an int: a 400-digit one overflows float(). Compare ranges as is.
    if isinstance(value, bool) or not isinstance(value, int | float) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise invalid(param, f"field '{param}' must be a number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_encodable(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8: ``json.loads`` accepts lone surrogates (``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(f'"{v}"' for v in values)
