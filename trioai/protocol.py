"""The client protocol of ``/ws/chat``, sans I/O.

Client frames are parsed and validated into frozen events by :func:`parse_client_event`, which
raises only :class:`~trioai.errors.ProtocolError`; server events are frozen dataclasses turned into
JSON text by :func:`encode`. Nothing here touches a socket or a clock, so it is tested synchronously.

Compatibility: a client written for the plain format (``message`` without ``id``, then ``start``,
``token``… and ``done``; ``cancel`` → ``cancelled``) keeps working, because every field added since
(``id``, ``usage``, ``queued``…) is an extra key or an extra event such clients ignore.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from .chatfields import parse_message_fields, parse_request_fields
from .errors import ErrorCode, ProtocolError

RequestId: TypeAlias = str | int
JSONScalar: TypeAlias = str | int | float | bool | None

ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_ID_LENGTH: Final = 128
MAX_MODEL_LENGTH: Final = 256
MAX_RESUME_TOKEN_LENGTH: Final = 128
MAX_STOP_SEQUENCES: Final = 8
MAX_STOP_LENGTH: Final = 256
# Content parts are passed through to the engine; this bounds how deep we walk them.
MAX_PART_DEPTH: Final = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a ``message`` event must respect; set from the server's configuration."""

    max_messages: int = 256
    max_tokens_limit: int = 8192
    default_max_tokens: int | None = None
    max_tools: int = 128
    max_schema_bytes: int = 65536
    max_schema_depth: int = 32


# --- client events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sampling:
    """Optional sampling fields passed through to the engine unchanged."""

    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def to_payload(self) -> dict[str, Any]:
        """The fields that were set, as OpenAI request keys."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if name == "stop" else value
        return out


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """``message``: start a generation. ``id`` is None when the client sent none."""

    id: RequestId | None
    messages: tuple[Mapping[str, Any], ...]
    max_tokens: int | None
    sampling: Sampling = field(default_factory=Sampling)
    #: Validated chat-completions fields passed to the engine as they are (tools, response_format, ...).
    chat_fields: Mapping[str, Any] = field(default_factory=dict)
    resumable: bool | None = None  # None: the server's default
    model: str | None = None  # None: the server's default model


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """``cancel``: stop one generation, or every active one when ``id`` is None.

    With ``resume_token``, the generation may be on any connection, or on none (detached).
    """

    id: RequestId | None
    resume_token: str | None = None


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """``resume``: attach this connection to a resumable generation, replaying events after ``after``."""

    id: RequestId
    resume_token: str
    after: int


@dataclass(frozen=True, slots=True)
class PingRequest:
    """``ping``: answered by ``pong`` (browsers cannot send WebSocket pings)."""

    id: RequestId | None


@dataclass(frozen=True, slots=True)
class ModelsRequest:
    """``models``: list the models this server serves and whether each has a healthy engine."""

    id: RequestId | None


ClientEvent: TypeAlias = ChatRequest | CancelRequest | PingRequest | ResumeRequest | ModelsRequest


# --- server events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """``start``: the request was accepted; its id (assigned if the client sent none)."""

    id: RequestId
    model: str
    resume_token: str | None = None  # only for a resumable generation


@dataclass(frozen=True, slots=True)
class Queued:
    """``queued``: waiting for engine capacity; ``position`` 1 is next in line."""

    id: RequestId
    position: int


@dataclass(frozen=True, slots=True)
class Token:
    """``token``: generated text, one or more engine deltas in order."""

    id: RequestId
    content: str
    logprobs: tuple[Any, ...] | None = None  # the engine's entries for this text, when asked


@dataclass(frozen=True, slots=True)
class Reasoning:
    """``reasoning``: the model's thinking, apart from its answer, one or more deltas in order."""

    id: RequestId
    content: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """``tool_call``: one fragment of a function call; fragments of one ``index`` concatenate."""

    id: RequestId
    index: int
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class AssembledToolCall:
    """One whole function call of a finished generation (``done.tool_calls``)."""

    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Failover:
    """``failover``: the engine ``from_engine`` failed mid-answer and ``to_engine`` continues it after
    the event numbered ``at_seq`` (informational: the text simply goes on)."""

    id: RequestId
    from_engine: str
    to_engine: str
    at_seq: int


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of ``models``: a model, the engines that serve it, and whether one is healthy."""

    id: str
    engines: tuple[str, ...]
    healthy: bool


@dataclass(frozen=True, slots=True)
class Models:
    """``models``: the answer to a ``models`` request."""

    id: RequestId | None
    data: tuple[ModelInfo, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one generation.

    ``source`` is ``"engine"`` when the engine reported them, ``"gateway"`` when the engine sent no
    usage and trioai counted content deltas itself (then ``prompt_tokens`` is None).
    """

    prompt_tokens: int | None
    completion_tokens: int
    source: str = "engine"


@dataclass(frozen=True, slots=True)
class Done:
    """``done``: the generation ended normally (terminal)."""

    id: RequestId
    finish_reason: str | None
    usage: Usage
    ttft_ms: float | None
    tokens_per_s: float | None
    tool_calls: tuple[AssembledToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Cancelled:
    """``cancelled``: the generation was stopped at the client's request (terminal)."""

    id: RequestId


@dataclass(frozen=True, slots=True)
class Error:
    """``error``: terminal for the request ``id``; with ``id`` None it concerns the connection."""

    id: RequestId | None
    code: str
    message: str
    param: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    """``pong``: the answer to ``ping``, echoing its id."""

    id: RequestId | None


ServerEvent: TypeAlias = (Started | Queued | Token | Reasoning | ToolCall | Done | Cancelled | Error | Pong | Failover
                          | Models)
TERMINAL_EVENTS: Final = (Done, Cancelled, Error)


def error_from(exc: ProtocolError) -> Error:
    """The ``error`` event that answers a :class:`ProtocolError`."""
    return Error(exc.request_id, exc.code.value, exc.message, exc.param)


# --- parsing ---------------------------------------------------------------------------------


def parse_client_event(data: str | bytes, limits: Limits) -> ClientEvent:
    """Parse one WebSocket message into a client event.

    Raises :class:`ProtocolError` (and nothing else) for anything that is not a valid event:
    binary frames, invalid or too deeply nested JSON, unknown types, wrong field types or values.
    """
    if not isinstance(data, str):
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_FRAME, "binary frames are not supported: send JSON as text frames"
        )
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        # RecursionError is what deeply nested arrays raise; it is not a ValueError.
        raise ProtocolError(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {_short(exc)}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "an event must be a JSON object", param="type")
    request_id = _parse_id(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            "field 'type' must be a string",
            param="type",
            request_id=request_id,
        )
    if kind == "message":
        return _parse_message(obj, request_id, limits)
    if kind == "cancel":
        token = obj.get("resume_token")
        if token is not None:
            token = _resume_token(token, request_id)
            if request_id is None:
                raise ProtocolError(ErrorCode.INVALID_REQUEST, "a cancel with 'resume_token' needs its 'id'",
                                    param="id")
        return CancelRequest(request_id, token)
    if kind == "resume":
        return _parse_resume(obj, request_id)
    if kind == "ping":
        return PingRequest(request_id)
    if kind == "models":
        return ModelsRequest(request_id)
    raise ProtocolError(
        ErrorCode.UNKNOWN_TYPE,
        f"unknown event type {_short(kind)!r}; expected 'message', 'cancel', 'resume', 'ping' or 'models'",
        param="type",
        request_id=request_id,
    )


def _parse_resume(obj: dict[str, Any], request_id: RequestId | None) -> ResumeRequest:
    if request_id is None:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "field 'id' is required to resume", param="id")
    token = _resume_token(obj.get("resume_token"), request_id)
    after = obj.get("after", 0)
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 2**53:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "field 'after' must be a non-negative integer (a seq)",
                            param="after", request_id=request_id)
    return ResumeRequest(request_id, token, after)


def _resume_token(token: Any, request_id: RequestId | None) -> str:
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_RESUME_TOKEN_LENGTH or not token.isascii():
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "field 'resume_token' must be the token 'start' gave",
                            param="resume_token", request_id=request_id)
    return token


def _parse_id(obj: dict[str, Any]) -> RequestId | None:
    raw = obj.get("id")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "field 'id' must be a string or an integer", param="id")
    if isinstance(raw, str):
        if not 1 <= len(raw) <= MAX_ID_LENGTH:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"field 'id' must be 1 to {MAX_ID_LENGTH} characters", param="id"
            )
        _require_encodable(raw, "id", None)
    elif not -(2**63) <= raw < 2**63:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "field 'id' is out of range", param="id")
    return raw


def _parse_message(obj: dict[str, Any], request_id: RequestId | None, limits: Limits) -> ChatRequest:
    def invalid(param: str, message: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_REQUEST, message, param=param, request_id=request_id)

    raw_messages = obj.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise invalid("messages", "field 'messages' must be a non-empty array")
    if len(raw_messages) > limits.max_messages:
        raise invalid("messages", f"field 'messages' has more than {limits.max_messages} entries")
    messages = tuple(_parse_chat_message(m, i, request_id) for i, m in enumerate(raw_messages))

    max_tokens = _max_tokens(obj, "max_tokens", limits, invalid)
    alias = _max_tokens(obj, "max_completion_tokens", limits, invalid)
    if alias is not None:
        if max_tokens is not None and max_tokens != alias:
            raise invalid("max_completion_tokens", "fields 'max_tokens' and 'max_completion_tokens' disagree")
        max_tokens = alias
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    n = obj.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise invalid("n", "field 'n' must be 1: one stream per id (send several messages with their own ids)")

    sampling = Sampling(
        temperature=_number(obj, "temperature", 0.0, 2.0, invalid),
        top_p=_number(obj, "top_p", 0.0, 1.0, invalid),
        stop=_stop(obj, invalid),
        seed=_seed(obj, invalid),
        presence_penalty=_number(obj, "presence_penalty", -2.0, 2.0, invalid),
        frequency_penalty=_number(obj, "frequency_penalty", -2.0, 2.0, invalid),
    )
    resumable = obj.get("resumable")
    if resumable is not None and not isinstance(resumable, bool):
        raise invalid("resumable", "field 'resumable' must be true or false")
    model = obj.get("model")
    if model is not None:
        if not isinstance(model, str) or not 1 <= len(model) <= MAX_MODEL_LENGTH:
            raise invalid("model", f"field 'model' must be a string of 1 to {MAX_MODEL_LENGTH} characters")
        _require_encodable(model, "model", request_id)
    return ChatRequest(request_id, messages, max_tokens, sampling, parse_request_fields(obj, limits, invalid),
                       resumable, model)


def _max_tokens(obj: dict[str, Any], name: str, limits: Limits, invalid: Any) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"field '{name}' must be an integer")
    if not 1 <= value <= limits.max_tokens_limit:
        raise invalid(name, f"field '{name}' must be between 1 and {limits.max_tokens_limit}")
    return value


def _parse_chat_message(raw: Any, index: int, request_id: RequestId | None) -> Mapping[str, Any]:
    param = f"messages[{index}]"

    def invalid(suffix: str, message: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_REQUEST, message, param=param + suffix, request_id=request_id)

    if not isinstance(raw, dict):
        raise invalid("", f"{param} must be an object with 'role' and 'content'")
    role = raw.get("role")
    if role not in ROLES:
        raise invalid(".role", f"{param}.role must be one of {', '.join(sorted(ROLES))}")
    content = raw.get("content")
    if isinstance(content, str):
        _require_encodable(content, param + ".content", request_id)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid(".content", f"{param}.content parts must be objects with a string 'type'")
            _require_plain_json(part, param + ".content", request_id, MAX_PART_DEPTH)
    elif not (content is None and role == "assistant"):
        raise invalid(".content", f"{param}.content must be a string or an array of content parts")
    message: dict[str, Any] = {"role": role, "content": content}
    name = raw.get("name")
    if name is not None:
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise invalid(".name", f"{param}.name must be a string of 1 to 64 characters")
        _require_encodable(name, param + ".name", request_id)
        message["name"] = name
    message.update(parse_message_fields(raw, role, invalid))
    return message


def _number(obj: dict[str, Any], name: str, low: float, high: float, invalid: Any) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    # An int is compared as it is: math.isfinite would overflow on a 400-digit integer.
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise invalid(name, f"field '{name}' must be a number")
    if not low <= value <= high:
        raise invalid(name, f"field '{name}' must be between {low:g} and {high:g}")
    return float(value)


def _stop(obj: dict[str, Any], invalid: Any) -> tuple[str, ...] | None:
    value = obj.get("stop")
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or not 1 <= len(items) <= MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_LENGTH for s in items)
    ):
        raise invalid(
            "stop",
            f"field 'stop' must be a string or 1 to {MAX_STOP_SEQUENCES} strings "
            f"of 1 to {MAX_STOP_LENGTH} characters",
        )
    for s in items:
        _require_encodable(s, "stop", None)
    return tuple(items)


def _seed(obj: dict[str, Any], invalid: Any) -> int | None:
    value = obj.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**64:
        raise invalid("seed", "field 'seed' must be a 64-bit integer")
    return value


def _require_encodable(text: str, param: str, request_id: RequestId | None) -> None:
    # json.loads accepts lone surrogates ("\ud800"), which cannot be encoded as UTF-8 later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"{param} contains an unpaired UTF-16 surrogate",
            param=param,
            request_id=request_id,
        ) from None


def _require_plain_json(value: Any, param: str, request_id: RequestId | None, depth: int) -> None:
    if isinstance(value, str):
        _require_encodable(value, param, request_id)
        return
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float) and math.isfinite(value):
        return
    if depth > 0 and isinstance(value, dict):
        for key, item in value.items():
            _require_encodable(key, param, request_id)
            _require_plain_json(item, param, request_id, depth - 1)
        return
    if depth > 0 and isinstance(value, list):
        for item in value:
            _require_plain_json(item, param, request_id, depth - 1)
        return
    raise ProtocolError(
        ErrorCode.INVALID_REQUEST, f"{param} is nested too deeply or holds a non-finite number",
        param=param, request_id=request_id,
    )


def _short(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- encoding --------------------------------------------------------------------------------

#: Compact JSON text, non-ASCII kept, no NaN or Infinity: every frame, and the engine request body.
#: One encoder, built once (``json.dumps`` with options builds a new one per call).
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def encode_id(request_id: RequestId | None) -> str:
    """The JSON text of an id, computed once per stream so tokens need not re-encode it."""
    return dumps(request_id)


def encode_token(id_json: str, content: str, logprobs: list[Any] | tuple[Any, ...] | None = None,
                 deltas: int = 1) -> str:
    """The ``token`` frame: the per-token hot path, so built by concatenation.

    ``id_json`` is the id's JSON text, optionally followed by more fields (``"r1","seq":3``): so are
    the other ``encode_*`` functions' first arguments. ``deltas``: how many engine deltas the text
    joins, sent when more than one (a continuation after a takeover counts the tokens already
    produced from it).
    """
    if logprobs is None:
        if deltas == 1:
            return '{"type":"token","id":' + id_json + ',"content":' + dumps(content) + "}"
        return '{"type":"token","id":' + id_json + ',"content":' + dumps(content) + ',"deltas":' + str(deltas) + "}"
    return ('{"type":"token","id":' + id_json + ',"content":' + dumps(content) + ',"logprobs":'
            + dumps(list(logprobs)) + ("}" if deltas == 1 else ',"deltas":' + str(deltas) + "}"))


def encode_reasoning(id_json: str, content: str) -> str:
    """The ``reasoning`` frame, built like ``token``'s."""
    return '{"type":"reasoning","id":' + id_json + ',"content":' + dumps(content) + "}"


def encode_tool_call(id_json: str, index: int, call_id: str | None, name: str | None, arguments: str) -> str:
    """The ``tool_call`` frame; ``call_id`` and ``name`` only when the fragment carries them."""
    head = '{"type":"tool_call","id":' + id_json + ',"index":' + str(index)
    if call_id is not None:
        head += ',"call_id":' + dumps(call_id)
    if name is not None:
        head += ',"name":' + dumps(name)
    return head + ',"arguments":' + dumps(arguments) + "}"


def encode(event: ServerEvent, seq: int | None = None) -> str:
    """The JSON text frame of a server event; ``seq``, when given, right after its id."""
    head = encode_id(getattr(event, "id", None))
    if seq is not None:
        head += ',"seq":' + str(seq)
    if type(event) is Token:
        return encode_token(head, event.content, event.logprobs)
    if type(event) is Reasoning:
        return encode_reasoning(head, event.content)
    if type(event) is ToolCall:
        return encode_tool_call(head, event.index, event.call_id, event.name, event.arguments)
    out = _as_dict(event)
    if seq is not None:
        out = {"type": out["type"], "id": out["id"], "seq": seq} | out
    return dumps(out)


def _as_dict(event: ServerEvent) -> dict[str, Any]:
    match event:
        case Started(id=i, model=model):
            started: dict[str, Any] = {"type": "start", "id": i, "model": model}
            if event.resume_token is not None:
                started["resume_token"] = event.resume_token
            return started
        case Queued(id=i, position=position):
            return {"type": "queued", "id": i, "position": position}
        case Done():
            usage = event.usage
            return {
                "type": "done",
                "id": event.id,
                "finish_reason": event.finish_reason,
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": (
                        None if usage.prompt_tokens is None else usage.prompt_tokens + usage.completion_tokens
                    ),
                    "source": usage.source,
                },
                "ttft_ms": _round(event.ttft_ms),
                "tokens_per_s": _round(event.tokens_per_s),
            } | ({"tool_calls": [
                {"call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in event.tool_calls
            ]} if event.tool_calls else {})
        case Cancelled(id=i):
            return {"type": "cancelled", "id": i}
        case Error():
            out: dict[str, Any] = {"type": "error", "id": event.id, "code": event.code, "message": event.message}
            if event.param is not None:
                out["param"] = event.param
            if event.retry_after is not None:
                out["retry_after"] = event.retry_after
            return out
        case Pong(id=i):
            return {"type": "pong", "id": i}
        case Failover(id=i):
            return {"type": "failover", "id": i, "from": event.from_engine, "to": event.to_engine,
                    "at_seq": event.at_seq}
        case Models(id=i, data=data):
            return {"type": "models", "id": i, "data": [
                {"id": m.id, "engines": list(m.engines), "healthy": m.healthy} for m in data]}
        case Token(id=i, content=content):
            return {"type": "token", "id": i, "content": content}
    raise TypeError(f"not a server event: {event!r}")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
