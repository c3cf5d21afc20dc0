"""OpenAI's Responses API in WebSocket mode (``/v1/responses``), sans I/O: trioai's second wire codec.

The official ``openai`` SDK's ``client.responses.connect()`` (and its ``ResponsesWebSocketSession``
lanes) talks to trioai through this module, unchanged. Three pieces, none of which touches a socket
or a clock:

* :func:`parse_client_event` turns one client frame into a :class:`CreateResponse` (the core
  :class:`~trioai.protocol.ChatRequest` inside), a :class:`SteerResponse` or a :class:`CancelResponse`,
  or raises :class:`ResponsesError`, which carries the SDK's ``error`` event to send back.
* :class:`ResponseEncoder`, one per response, turns the generation core's neutral events
  (``Started``, ``Queued``, ``Token``, ``Reasoning``, ``ToolCall``, ``Done``, ``Cancelled``,
  ``Error``) into the JSON text frames the SDK types: ``response.created``, ``response.in_progress``,
  output items and their deltas, then exactly one terminal. It satisfies ``outbox.EventEncoder``.
* :class:`ResponseHistory`, one per connection, keeps recent responses (input and output items) for
  ``previous_response_id``, bounded in count and in bytes.

The mapping, in short:

* ``input`` (a string, or ``message`` / ``function_call`` / ``function_call_output`` / ``reasoning``
  items) becomes chat messages: consecutive ``function_call`` items join the assistant message before
  them as its ``tool_calls``; ``function_call_output`` becomes a ``tool`` message; ``reasoning`` items
  are accepted (clients replay ``response.output`` as input) and kept in history, but not sent to the
  engine: chat-completions engines take no earlier reasoning. ``instructions`` becomes a leading
  ``system`` message and, as at OpenAI, is not carried over by ``previous_response_id``.
* ``max_output_tokens`` → ``max_tokens``; ``tools`` (function tools only), ``tool_choice``,
  ``parallel_tool_calls``, ``text.format`` → ``response_format``, ``reasoning.effort`` →
  ``reasoning_effort``, ``top_logprobs`` / ``include: ["message.output_text.logprobs"]`` →
  ``logprobs`` / ``top_logprobs``, all validated by :mod:`trioai.chatfields`, so the limits are the
  ones ``/ws/chat`` has (error ``param`` values are renamed to the Responses fields).
* A field trioai cannot honour is refused with an error naming it (``param``), never dropped:
  ``background: true``, ``conversation``, ``prompt``, ``context_management``, ``moderation``,
  hosted tools (``web_search``, ``file_search``, ``code_interpreter``, ``mcp``...), ``truncation:
  "auto"``, ``include`` values other than ``message.output_text.logprobs``, ``reasoning.summary``,
  ``text.verbosity``, ``stream: false``, a ``service_tier`` other than ``auto``/``default``, and any
  field the SDK does not know (``unknown_parameter``). Accepted with no effect, because they change
  nothing a client can observe here: ``store`` (responses are kept per connection either way),
  ``user``, ``safety_identifier``, ``prompt_cache_key``, ``prompt_cache_retention``,
  ``max_tool_calls`` (it bounds built-in tools, which trioai has none of).

Events: ``sequence_number`` starts at 0 and increases by one per frame of a response, and every
frame carries ``stream_id`` when the ``response.create`` had one. ``Queued`` before ``Started``
sends ``response.created`` (status ``queued``) and ``response.queued``; ``Queued`` after it sends
nothing. Text is one ``message`` item (``output_item.added``, ``content_part.added``,
``output_text.delta``..., then ``output_text.done``, ``content_part.done``, ``output_item.done``);
reasoning is one ``reasoning`` item with a ``reasoning_text`` part (``reasoning_text.delta`` /
``.done``); each tool call (one per ``index``) is a ``function_call`` item
(``function_call_arguments.delta`` / ``.done``). A new kind of output closes the open message or
reasoning item; function calls stay open until the terminal (their fragments may interleave).
Item ids derive from the response id (``msg_<id>_<n>``...), so the encoder is deterministic.

Terminals: ``Done`` → ``response.completed``, or ``response.incomplete`` when ``finish_reason`` is
``length`` (``incomplete_details.reason`` ``max_output_tokens``) or ``content_filter``.
``Error`` → ``response.failed`` (``response.error``) once the response was created, else a bare
``error`` event (the SDK counts it as the request's terminal). **Cancelled** → ``response.incomplete``
with ``status: "cancelled"`` and ``incomplete_details: null``. The SDK's types accept ``cancelled`` in
any of the three terminal events, but its session and accumulators end a response only on
``response.completed``, ``response.failed`` or ``response.incomplete`` (a ``response.cancelled`` would
leave ``get_final_response()`` waiting forever), and of the three, ``incomplete`` says what a
cancelled response is: stopped early, its partial output valid, no error, and not a success to a
client that only looks at the event type. ``get_final_response()`` returns it like any incomplete one.

Errors: the Responses ``error`` event is ``{"type": "error", "status": <HTTP status>, "error":
{"type", "code", "message", "param"[, "headers"]}[, "stream_id"]}``. trioai's codes map to OpenAI's
where OpenAI has one (``rate_limited`` → ``rate_limit_exceeded`` 429 with a ``retry-after`` header,
``internal_error`` → ``server_error`` 500, ``invalid_request`` → ``invalid_value``, ``unknown_type``
→ ``invalid_value`` on ``type``, ``unknown_id`` → ``response_not_found`` 404); the others keep their
trioai code with an HTTP status (``overloaded`` 503, ``upstream_timeout`` 504...). Parsing uses
OpenAI's ``invalid_value``, ``missing_required_parameter``, ``unknown_parameter``,
``unsupported_parameter``, ``unsupported_value``, ``previous_response_not_found``, ``invalid_json``
and ``invalid_stream_id``. Inside ``response.failed`` the SDK allows only OpenAI's own codes:
``rate_limit_exceeded`` for ``rate_limited``, ``server_error`` for everything else.

Usage: ``input_tokens`` is the engine's ``prompt_tokens`` (0 when the engine reported none and
trioai counted deltas itself); cached and reasoning token details are 0 (not reported).
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from .chatfields import MAX_CALL_ID_LENGTH, MAX_TOOL_CALLS, NAME_RULE, is_encodable, parse_request_fields
from .errors import ErrorCode
from .protocol import (
    MAX_MODEL_LENGTH,
    Cancelled,
    ChatRequest,
    Done,
    Error,
    Limits,
    Queued,
    Reasoning,
    Sampling,
    ServerEvent,
    Started,
    Token,
    ToolCall,
    Usage,
    dumps,
)

__all__ = [
    "STEER_UNSUPPORTED",
    "CancelResponse",
    "ClientEvent",
    "CreateResponse",
    "ResponseEncoder",
    "ResponseHistory",
    "ResponsesError",
    "SteerResponse",
    "StoredResponse",
    "error_frame",
    "new_response_id",
    "parse_client_event",
    "steer_failed_frame",
]

#: The lane names the SDK's ``_session.py`` allows (checked with ``fullmatch``).
STREAM_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,256}")
_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_METADATA_PAIRS: Final = 16
MAX_METADATA_KEY: Final = 64
MAX_METADATA_VALUE: Final = 512
MAX_RESPONSE_ID_LENGTH: Final = 256
MAX_HINT_LENGTH: Final = 512  # user, safety_identifier, prompt_cache_key
DEFAULT_HISTORY_RESPONSES: Final = 16
DEFAULT_HISTORY_BYTES: Final = 4 * 1024 * 1024
LOGPROBS_INCLUDE: Final = "message.output_text.logprobs"
IMAGE_DETAILS: Final = ("low", "high", "auto", "original")
STEER_UNSUPPORTED: Final = ("trioai does not support steering: send response.cancel for the running response, "
                            "then a response.create with previous_response_id and the new input")

# --- errors ------------------------------------------------------------------------------------


class ResponsesError(Exception):
    """A client frame trioai cannot act on, or a request that failed before its response existed.

    Carries an OpenAI-style error (``error_type``, ``code``, ``message``, ``param``), the HTTP
    ``status`` it stands for, and the ``stream_id`` of the lane it belongs to (so the SDK routes it to
    that lane); :meth:`frame` is the ``error`` event to send. The connection stays usable.
    """

    def __init__(self, code: str, message: str, *, param: str | None = None,
                 error_type: str = "invalid_request_error", status: int = 400, stream_id: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type
        self.status = status
        self.stream_id = stream_id
        self.headers = dict(headers) if headers else None

    def event(self, sequence_number: int | None = None) -> dict[str, Any]:
        """The SDK's ``ResponseWsError`` as a dict."""
        error: dict[str, Any] = {"type": self.error_type, "code": self.code, "message": self.message,
                                 "param": self.param}
        if self.headers:
            error["headers"] = self.headers
        out: dict[str, Any] = {"type": "error"}
        if sequence_number is not None:
            out["sequence_number"] = sequence_number
        out["status"] = self.status
        out["error"] = error
        if self.stream_id is not None:
            out["stream_id"] = self.stream_id
        return out

    def frame(self, sequence_number: int | None = None) -> str:
        """The ``error`` event's JSON text frame."""
        return dumps(self.event(sequence_number))

    @classmethod
    def from_error(cls, error: Error, stream_id: str | None = None) -> ResponsesError:
        """The Responses form of a core ``Error`` (trioai's code mapped to OpenAI's where one exists)."""
        error_type, code, status = _ERROR_EVENT.get(error.code, ("server_error", error.code, 500))
        headers = None
        if error.retry_after is not None:
            headers = {"retry-after": str(max(1, math.ceil(error.retry_after)))}
        return cls(code, error.message, param=error.param, error_type=error_type, status=status,
                   stream_id=stream_id, headers=headers)


#: trioai code → (OpenAI error type, code, HTTP status) for ``error`` events.
_ERROR_EVENT: Final[dict[str, tuple[str, str, int]]] = {
    ErrorCode.INVALID_JSON: ("invalid_request_error", "invalid_json", 400),
    ErrorCode.INVALID_REQUEST: ("invalid_request_error", "invalid_value", 400),
    ErrorCode.UNKNOWN_TYPE: ("invalid_request_error", "invalid_value", 400),
    ErrorCode.UNSUPPORTED_FRAME: ("invalid_request_error", "unsupported_frame", 400),
    ErrorCode.DUPLICATE_ID: ("invalid_request_error", "duplicate_id", 409),
    ErrorCode.UNKNOWN_ID: ("invalid_request_error", "response_not_found", 404),
    ErrorCode.NOTHING_TO_CANCEL: ("invalid_request_error", "nothing_to_cancel", 400),
    ErrorCode.TOO_MANY_STREAMS: ("invalid_request_error", "too_many_streams", 429),
    ErrorCode.RESUME_NOT_FOUND: ("invalid_request_error", "resume_not_found", 404),
    ErrorCode.RESUMED_ELSEWHERE: ("invalid_request_error", "resumed_elsewhere", 409),
    ErrorCode.OVERLOADED: ("server_error", "overloaded", 503),
    ErrorCode.RATE_LIMITED: ("requests", "rate_limit_exceeded", 429),
    ErrorCode.UPSTREAM_UNAVAILABLE: ("server_error", "upstream_unavailable", 503),
    ErrorCode.UPSTREAM_TIMEOUT: ("server_error", "upstream_timeout", 504),
    ErrorCode.UPSTREAM_OVERLOADED: ("server_error", "upstream_overloaded", 503),
    ErrorCode.UPSTREAM_ERROR: ("server_error", "upstream_error", 502),
    ErrorCode.UPSTREAM_DISCONNECTED: ("server_error", "upstream_disconnected", 502),
    ErrorCode.INTERNAL_ERROR: ("server_error", "server_error", 500),
    ErrorCode.SHUTTING_DOWN: ("server_error", "shutting_down", 503),
}


def error_frame(error: Error, stream_id: str | None = None) -> str:
    """The ``error`` frame for a core ``Error`` raised outside an encoder (admission, rate limit, drain)."""
    return ResponsesError.from_error(error, stream_id).frame()


# --- client events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateResponse:
    """``response.create``: one response to generate (or, with ``generate`` false, only to store).

    ``request.id`` is the new response id. ``input_items`` is the whole input in Responses item
    form, ``previous_response_id``'s chain included (``instructions`` excluded): what
    :meth:`ResponseHistory.store` keeps. ``echo`` holds the response object's request fields
    (``tools``, ``tool_choice``, ``text``, ...) in their Responses form.
    """

    request: ChatRequest
    stream_id: str | None
    model: str | None
    metadata: Mapping[str, str]
    generate: bool
    input_items: tuple[Mapping[str, Any], ...]
    previous_response_id: str | None = None
    instructions: str | None = None
    echo: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The response id (``resp_...``)."""
        return str(self.request.id)


@dataclass(frozen=True, slots=True)
class SteerResponse:
    """``response.steer``: answered with :func:`steer_failed_frame` (trioai does not steer)."""

    previous_response_id: str
    input: str | list[Any]


@dataclass(frozen=True, slots=True)
class CancelResponse:
    """``response.cancel`` (a trioai extension): stop the response ``response_id``, or the one on ``stream_id``."""

    response_id: str | None
    stream_id: str | None


ClientEvent: TypeAlias = CreateResponse | CancelResponse | SteerResponse


def new_response_id() -> str:
    """A fresh response id: ``resp_`` and 24 hex digits."""
    return "resp_" + secrets.token_hex(12)


# --- history -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One response kept for ``previous_response_id``: its whole input and its output, as items."""

    input_items: tuple[Mapping[str, Any], ...]
    output_items: tuple[Mapping[str, Any], ...]
    size: int  # UTF-8 bytes of both, as compact JSON


class ResponseHistory:
    """A connection's recent responses, least recently used first out.

    Bounded to ``max_responses`` entries and ``max_bytes`` (the compact JSON of every entry's items;
    entries of one chain repeat their common prefix, so this over-counts memory, never under).
    A response larger than ``max_bytes`` alone is not kept: chaining from it answers
    ``previous_response_not_found``, as OpenAI does for an evicted response.
    """

    def __init__(self, max_responses: int = DEFAULT_HISTORY_RESPONSES,
                 max_bytes: int = DEFAULT_HISTORY_BYTES) -> None:
        if max_responses < 1 or max_bytes < 1:
            raise ValueError("history bounds must be positive")
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def store(self, response_id: str, input_items: Sequence[Mapping[str, Any]],
              output_items: Sequence[Mapping[str, Any]]) -> bool:
        """Keep a response (replacing one of the same id); False when it alone exceeds ``max_bytes``."""
        self.discard(response_id)
        size = _items_size(input_items) + _items_size(output_items)
        if size > self.max_bytes:
            return False
        self._entries[response_id] = StoredResponse(tuple(input_items), tuple(output_items), size)
        self._bytes += size
        while len(self._entries) > self.max_responses or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, now the most recently used; None when unknown or evicted."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def discard(self, response_id: str) -> None:
        """Forget a response (nothing happens when it is not kept)."""
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._bytes -= entry.size

    @property
    def bytes(self) -> int:
        """The size every kept response counts for."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._entries


def _items_size(items: Sequence[Mapping[str, Any]]) -> int:
    return sum(len(dumps(dict(item)).encode("utf-8")) for item in items)


# --- parsing -----------------------------------------------------------------------------------

#: Every top-level field of the SDK's ``ResponseCreate`` (``responses_client_event.py``).
_CREATE_FIELDS: Final = frozenset({
    "type", "access_programs", "background", "background_options", "context_management", "conversation",
    "generate", "image", "include", "input", "instructions", "max_output_tokens", "max_tool_calls", "metadata",
    "model", "moderation", "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier", "store",
    "stream", "stream_id", "stream_options", "temperature", "text", "tool_choice", "tools", "top_logprobs", "top_p",
    "truncation", "user",
})
#: Fields refused whenever they are set, with why.
_UNSUPPORTED_FIELDS: Final = {
    "access_programs": "access programs are an OpenAI account feature",
    "background_options": "background responses are not supported over WebSocket",
    "context_management": "trioai does not compact context",
    "conversation": "trioai has no conversations: chain responses with previous_response_id",
    "image": "request-level image options are not supported",
    "moderation": "trioai does not run moderation",
    "prompt": "trioai has no stored prompt templates",
    "prompt_cache_options": "prompt cache options are not supported",
}
_INPUT_ITEM_TYPES: Final = ("message", "function_call", "function_call_output", "reasoning")
_FUNCTION_TOOL_FIELDS: Final = frozenset({"type", "name", "parameters", "strict", "description", "defer_loading",
                                          "allowed_callers", "async", "output_schema"})


class _Errors:
    """Builds the ``ResponsesError`` of one frame, with the frame's lane (``stream_id``) when it is valid."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: str | None) -> None:
        self.stream_id = stream_id

    def error(self, code: str, param: str | None, message: str, status: int = 400) -> ResponsesError:
        return ResponsesError(code, message, param=param, status=status, stream_id=self.stream_id)

    def invalid(self, param: str, message: str) -> ResponsesError:
        return self.error("invalid_value", param, message)

    def missing(self, param: str) -> ResponsesError:
        return self.error("missing_required_parameter", param, f"missing required parameter '{param}'")

    def unknown(self, param: str) -> ResponsesError:
        return self.error("unknown_parameter", param, f"unknown parameter '{param}'")

    def unsupported(self, param: str, why: str) -> ResponsesError:
        return self.error("unsupported_parameter", param, f"parameter '{param}' is not supported: {why}")

    def unsupported_value(self, param: str, why: str) -> ResponsesError:
        return self.error("unsupported_value", param, f"unsupported value for '{param}': {why}")


def parse_client_event(data: str | bytes, limits: Limits, history: ResponseHistory, *,
                       new_id: Callable[[], str] = new_response_id) -> ClientEvent:
    """Parse one WebSocket message of the Responses API into a client event.

    Raises :class:`ResponsesError` (and nothing else) for anything trioai cannot act on. ``history``
    resolves ``previous_response_id``; ``new_id`` makes the response id (injectable for tests).
    """
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ResponsesError("invalid_json", "a binary frame must hold UTF-8 JSON text") from None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: too deeply nested arrays
        raise ResponsesError("invalid_json", f"frame is not valid JSON: {_short(exc)}") from None
    if not isinstance(obj, dict):
        raise ResponsesError("invalid_value", "an event must be a JSON object with a 'type'", param="type")
    raw_stream_id = obj.get("stream_id")
    errors = _Errors(raw_stream_id if isinstance(raw_stream_id, str) and STREAM_ID.fullmatch(raw_stream_id)
                     else None)
    kind = obj.get("type")
    if kind == "response.create":
        return _parse_create(obj, limits, history, new_id, errors)
    if kind == "response.steer":
        return _parse_steer(obj, errors)
    if kind == "response.cancel":
        return _parse_cancel(obj, errors)
    if not isinstance(kind, str):
        raise errors.missing("type") if kind is None else errors.invalid("type", "field 'type' must be a string")
    raise errors.invalid("type", f"unknown event type {_short(kind)!r}; expected 'response.create', "
                                 "'response.steer' or 'response.cancel'")


def _parse_steer(obj: dict[str, Any], errors: _Errors) -> SteerResponse:
    for key in obj:
        if key not in ("type", "previous_response_id", "input"):
            raise errors.unknown(key)
    previous = obj.get("previous_response_id")
    if previous is None:
        raise errors.missing("previous_response_id")
    previous = _string(previous, "previous_response_id", errors, MAX_RESPONSE_ID_LENGTH, minimum=1)
    value = obj.get("input")
    if value is None:
        raise errors.missing("input")
    if isinstance(value, str):
        return SteerResponse(previous, _string(value, "input", errors))
    if not isinstance(value, list) or not value or not all(isinstance(item, dict) for item in value):
        raise errors.invalid("input", "field 'input' must be a string or a non-empty array of input items")
    _require_plain(value, "input", errors)
    return SteerResponse(previous, value)


def _parse_cancel(obj: dict[str, Any], errors: _Errors) -> CancelResponse:
    for key in obj:
        if key not in ("type", "response_id", "stream_id"):
            raise errors.unknown(key)
    response_id = obj.get("response_id")
    stream_id = obj.get("stream_id")
    if (response_id is None) == (stream_id is None):
        raise errors.error("missing_required_parameter", "response_id",
                           "response.cancel needs exactly one of 'response_id' and 'stream_id'")
    if response_id is not None:
        return CancelResponse(_string(response_id, "response_id", errors, MAX_RESPONSE_ID_LENGTH), None)
    return CancelResponse(None, _stream_id(stream_id, errors))


def _stream_id(value: Any, errors: _Errors) -> str:
    if not isinstance(value, str) or not STREAM_ID.fullmatch(value):
        raise errors.error("invalid_stream_id", "stream_id",
                           "field 'stream_id' must be 1 to 256 ASCII letters, digits, '_', '-' or '.'")
    return value


def _parse_create(obj: dict[str, Any], limits: Limits, history: ResponseHistory, new_id: Callable[[], str],
                  errors: _Errors) -> CreateResponse:
    stream_id = None if obj.get("stream_id") is None else _stream_id(obj["stream_id"], errors)
    for key in obj:
        if key not in _CREATE_FIELDS:
            raise errors.unknown(key)
    for name, why in _UNSUPPORTED_FIELDS.items():
        if obj.get(name) is not None:
            raise errors.unsupported(name, why)
    echo = _transport_fields(obj, errors)
    logprobs = _include(obj.get("include"), errors)

    model = obj.get("model")
    if model is not None:
        model = _string(model, "model", errors, MAX_MODEL_LENGTH)
    metadata = _metadata(obj.get("metadata"), errors)
    generate = True if obj.get("generate") is None else _bool(obj["generate"], "generate", errors)
    instructions = obj.get("instructions")
    if instructions is not None:
        instructions = _string(instructions, "instructions", errors)

    previous_id = obj.get("previous_response_id")
    chain: list[Mapping[str, Any]] = []
    if previous_id is not None:
        previous_id = _string(previous_id, "previous_response_id", errors, MAX_RESPONSE_ID_LENGTH)
        stored = history.get(previous_id)
        if stored is None:
            raise errors.error("previous_response_not_found", "previous_response_id",
                               f"previous response with id {_short(previous_id)!r} not found on this connection")
        chain = [*stored.input_items, *stored.output_items]
    items = [*chain, *_input_items(obj.get("input"), errors)]
    messages = _chat_messages(instructions, items, errors)
    if len(messages) > limits.max_messages:
        raise errors.invalid("input", f"the input makes more than {limits.max_messages} messages "
                                      "(previous_response_id's chain included)")
    if generate and not messages:
        raise errors.missing("input")

    max_tokens = obj.get("max_output_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise errors.invalid("max_output_tokens", "field 'max_output_tokens' must be an integer")
        if not 1 <= max_tokens <= limits.max_tokens_limit:
            raise errors.invalid("max_output_tokens",
                                 f"field 'max_output_tokens' must be between 1 and {limits.max_tokens_limit}")
        echo["max_output_tokens"] = max_tokens
    else:
        max_tokens = limits.default_max_tokens
    sampling = Sampling(temperature=_number(obj.get("temperature"), "temperature", 0.0, 2.0, errors),
                        top_p=_number(obj.get("top_p"), "top_p", 0.0, 1.0, errors))
    echo["temperature"] = sampling.temperature
    echo["top_p"] = sampling.top_p
    chat_fields = _chat_fields(obj, logprobs, limits, errors, echo)
    request = ChatRequest(new_id(), tuple(messages), max_tokens, sampling, chat_fields, resumable=False, model=model)
    return CreateResponse(request, stream_id, model, metadata, generate, tuple(items), previous_id, instructions,
                          echo)


def _transport_fields(obj: dict[str, Any], errors: _Errors) -> dict[str, Any]:
    """Fields with nothing to generate from: checked, refused where trioai cannot do what they ask."""
    echo: dict[str, Any] = {}
    if obj.get("background") is not None and _bool(obj["background"], "background", errors):
        raise errors.unsupported_value("background", "background responses are not supported over WebSocket")
    if obj.get("stream") is not None and not _bool(obj["stream"], "stream", errors):
        raise errors.unsupported_value("stream", "WebSocket mode always streams; omit 'stream'")
    options = obj.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise errors.invalid("stream_options", "field 'stream_options' must be an object")
        for key in options:
            if key != "include_obfuscation":
                raise errors.unknown(f"stream_options.{key}")
        if options.get("include_obfuscation") is not None and _bool(
                options["include_obfuscation"], "stream_options.include_obfuscation", errors):
            raise errors.unsupported_value("stream_options.include_obfuscation", "trioai does not obfuscate streams")
    truncation = obj.get("truncation")
    if truncation is not None:
        if truncation == "auto":
            raise errors.unsupported_value("truncation", "trioai does not truncate input; use \"disabled\"")
        if truncation != "disabled":
            raise errors.invalid("truncation", "field 'truncation' must be \"disabled\" or \"auto\"")
    tier = obj.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str):
            raise errors.invalid("service_tier", "field 'service_tier' must be a string")
        if tier not in ("auto", "default"):
            raise errors.unsupported_value("service_tier", "trioai has one service tier: \"auto\" or \"default\"")
    if obj.get("store") is not None:
        _bool(obj["store"], "store", errors)  # the SDK's Response has no 'store' to echo it in
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        if obj.get(name) is not None:
            echo[name] = _string(obj[name], name, errors, MAX_HINT_LENGTH)
    retention = obj.get("prompt_cache_retention")
    if retention is not None and retention not in ("in_memory", "24h"):
        raise errors.invalid("prompt_cache_retention", "field 'prompt_cache_retention' must be \"in_memory\" or "
                                                       "\"24h\"")
    calls = obj.get("max_tool_calls")
    if calls is not None:
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise errors.invalid("max_tool_calls", "field 'max_tool_calls' must be a non-negative integer")
        echo["max_tool_calls"] = calls
    return echo


def _include(value: Any, errors: _Errors) -> bool:
    """Whether ``include`` asks for logprobs; any other value is refused."""
    if value is None:
        return False
    if not isinstance(value, list):
        raise errors.invalid("include", "field 'include' must be an array of strings")
    logprobs = False
    for index, entry in enumerate(value):
        param = f"include[{index}]"
        if not isinstance(entry, str):
            raise errors.invalid(param, f"field '{param}' must be a string")
        if entry != LOGPROBS_INCLUDE:
            raise errors.unsupported_value(param, f"trioai can include only \"{LOGPROBS_INCLUDE}\", "
                                                  f"not {_short(entry)!r}")
        logprobs = True
    return logprobs


def _metadata(value: Any, errors: _Errors) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.invalid("metadata", "field 'metadata' must be an object of string values")
    if len(value) > MAX_METADATA_PAIRS:
        raise errors.invalid("metadata", f"field 'metadata' has more than {MAX_METADATA_PAIRS} pairs")
    for key, text in value.items():
        if not is_encodable(key) or len(key) > MAX_METADATA_KEY:
            raise errors.invalid("metadata", f"metadata keys must be at most {MAX_METADATA_KEY} characters")
        _string(text, f"metadata.{key}", errors, MAX_METADATA_VALUE)
    return dict(value)


# --- input items -------------------------------------------------------------------------------


def _input_items(value: Any, errors: _Errors) -> list[dict[str, Any]]:
    """The ``input`` in normalized item form (known keys only)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": _string(value, "input", errors)}]
    if not isinstance(value, list):
        raise errors.invalid("input", "field 'input' must be a string or an array of input items")
    items: list[dict[str, Any]] = []
    for index, raw in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(raw, dict):
            raise errors.invalid(param, f"'{param}' must be an input item object")
        kind = raw.get("type")
        if kind is None and "role" in raw:
            kind = "message"
        if kind == "message":
            items.append(_message_item(raw, param, errors))
        elif kind == "function_call":
            items.append(_function_call_item(raw, param, errors))
        elif kind == "function_call_output":
            items.append(_function_output_item(raw, param, errors))
        elif kind == "reasoning":
            _known_keys(raw, param, ("type", "id", "summary", "content", "encrypted_content", "status"), errors)
            items.append({"type": "reasoning"})
        elif kind is None:
            raise errors.missing(f"{param}.type")
        elif kind == "item_reference":
            raise errors.unsupported_value(f"{param}.type", "item references are not supported: send the item "
                                                            "itself, or chain with previous_response_id")
        elif isinstance(kind, str):
            raise errors.unsupported_value(f"{param}.type", f"input items of type {_short(kind)!r} are not "
                                                            f"supported; trioai takes {', '.join(_INPUT_ITEM_TYPES)}")
        else:
            raise errors.invalid(f"{param}.type", f"'{param}.type' must be a string")
    return items


def _known_keys(raw: dict[str, Any], param: str, known: Sequence[str], errors: _Errors) -> None:
    for key in raw:
        if key not in known:
            raise errors.unknown(f"{param}.{key}")


def _message_item(raw: dict[str, Any], param: str, errors: _Errors) -> dict[str, Any]:
    _known_keys(raw, param, ("type", "role", "content", "id", "status", "phase"), errors)
    role = raw.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise errors.invalid(f"{param}.role", f"'{param}.role' must be user, system, developer or assistant")
    content = raw.get("content")
    if content is None:
        raise errors.missing(f"{param}.content")
    if isinstance(content, str):
        return {"type": "message", "role": role, "content": _string(content, f"{param}.content", errors)}
    if not isinstance(content, list) or not content:
        raise errors.invalid(f"{param}.content", f"'{param}.content' must be a string or a non-empty array of "
                                                 "content parts")
    parts = [_content_part(part, f"{param}.content[{index}]", role, errors) for index, part in enumerate(content)]
    return {"type": "message", "role": role, "content": parts}


def _content_part(raw: Any, param: str, role: str, errors: _Errors) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise errors.invalid(param, f"'{param}' must be a content part object")
    kind = raw.get("type")
    if kind in ("input_text", "output_text"):
        known = ("type", "text", "prompt_cache_breakpoint") if kind == "input_text" else (
            "type", "text", "annotations", "logprobs")
        _known_keys(raw, param, known, errors)
        return {"type": kind, "text": _string(raw.get("text"), f"{param}.text", errors)}
    if kind == "refusal" and role == "assistant":
        _known_keys(raw, param, ("type", "refusal"), errors)
        return {"type": "refusal", "refusal": _string(raw.get("refusal"), f"{param}.refusal", errors)}
    if kind == "input_image" and role == "user":
        _known_keys(raw, param, ("type", "image_url", "file_id", "detail", "prompt_cache_breakpoint"), errors)
        if raw.get("file_id") is not None:
            raise errors.unsupported(f"{param}.file_id", "trioai has no file store: send 'image_url' (a URL or a "
                                                         "data: URL)")
        url = raw.get("image_url")
        if url is None:
            raise errors.missing(f"{param}.image_url")
        part = {"type": "input_image", "image_url": _string(url, f"{param}.image_url", errors)}
        detail = raw.get("detail")
        if detail is not None:
            if detail not in IMAGE_DETAILS:
                raise errors.invalid(f"{param}.detail", f"'{param}.detail' must be one of {', '.join(IMAGE_DETAILS)}")
            part["detail"] = detail
        return part
    if kind in ("input_text", "output_text", "refusal", "input_image", "input_file", "input_audio"):
        raise errors.unsupported_value(f"{param}.type", f"content parts of type {kind!r} are not supported in "
                                                        f"{role} messages")
    if isinstance(kind, str):
        raise errors.invalid(f"{param}.type", f"unknown content part type {_short(kind)!r}")
    raise errors.missing(f"{param}.type") if kind is None else errors.invalid(f"{param}.type", "must be a string")


def _function_call_item(raw: dict[str, Any], param: str, errors: _Errors) -> dict[str, Any]:
    _known_keys(raw, param, ("type", "call_id", "name", "arguments", "id", "status", "caller", "namespace", "async"),
                errors)
    _direct_caller(raw, param, errors)
    if raw.get("async"):
        raise errors.unsupported_value(f"{param}.async", "asynchronous function calls are not supported")
    name = raw.get("name")
    if name is None:
        raise errors.missing(f"{param}.name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise errors.invalid(f"{param}.name", f"'{param}.name' must be {NAME_RULE}")
    arguments = raw.get("arguments")
    if arguments is None:
        raise errors.missing(f"{param}.arguments")
    return {"type": "function_call", "call_id": _call_id(raw.get("call_id"), param, errors), "name": name,
            "arguments": _string(arguments, f"{param}.arguments", errors)}


def _function_output_item(raw: dict[str, Any], param: str, errors: _Errors) -> dict[str, Any]:
    _known_keys(raw, param, ("type", "call_id", "output", "id", "status", "caller", "name", "namespace"), errors)
    _direct_caller(raw, param, errors)
    output = raw.get("output")
    if output is None:
        raise errors.missing(f"{param}.output")
    if isinstance(output, list):
        texts: list[str] = []
        for index, part in enumerate(output):
            part_param = f"{param}.output[{index}]"
            if not isinstance(part, dict) or part.get("type") != "input_text":
                raise errors.unsupported_value(part_param, "function call output parts must be input_text "
                                                           "(a tool message holds text only)")
            _known_keys(part, part_param, ("type", "text", "prompt_cache_breakpoint"), errors)
            texts.append(_string(part.get("text"), f"{part_param}.text", errors))
        output = "".join(texts)
    return {"type": "function_call_output", "call_id": _call_id(raw.get("call_id"), param, errors),
            "output": _string(output, f"{param}.output", errors)}


def _direct_caller(raw: dict[str, Any], param: str, errors: _Errors) -> None:
    caller = raw.get("caller")
    if caller is not None and (not isinstance(caller, dict) or caller.get("type") != "direct"):
        raise errors.unsupported_value(f"{param}.caller", "only direct calls are supported")
    if raw.get("namespace") is not None:
        raise errors.unsupported(f"{param}.namespace", "trioai has no namespaced tools")


def _call_id(value: Any, param: str, errors: _Errors) -> str:
    if value is None:
        raise errors.missing(f"{param}.call_id")
    return _string(value, f"{param}.call_id", errors, MAX_CALL_ID_LENGTH, minimum=1)


def _chat_messages(instructions: str | None, items: Sequence[Mapping[str, Any]],
                   errors: _Errors) -> list[dict[str, Any]]:
    """The chat-completions messages of ``instructions`` and input items (reasoning items left out)."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    turn: dict[str, Any] | None = None  # the assistant message the next function calls join
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = item["role"]
            if role == "assistant":
                turn = {"role": "assistant", "content": _assistant_text(item["content"])}
                messages.append(turn)
            else:
                messages.append({"role": role, "content": _chat_content(item["content"])})
                turn = None
        elif kind == "function_call":
            if turn is None:
                turn = {"role": "assistant", "content": None}
                messages.append(turn)
            calls = turn.setdefault("tool_calls", [])
            if len(calls) >= MAX_TOOL_CALLS:
                raise errors.invalid("input", f"field 'input' has more than {MAX_TOOL_CALLS} function calls in a row")
            calls.append({"id": item["call_id"], "type": "function",
                          "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            turn = None
        # "reasoning": not sent to the engine, and it does not end the assistant's turn.
    return messages


def _assistant_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["refusal"] if part["type"] == "refusal" else part["text"] for part in content)


def _chat_content(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if len(content) == 1 and content[0]["type"] != "input_image":
        return str(content[0]["text"])
    parts: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "input_image":
            image: dict[str, Any] = {"url": part["image_url"]}
            if "detail" in part:
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            parts.append({"type": "text", "text": part["text"]})
    return parts


# --- request fields ----------------------------------------------------------------------------

#: Chat-completions param names (as chatfields reports them) → the Responses fields they came from.
_RENAMES: Final = (
    (re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"tool_choice\.function\."), "tool_choice."),
    (re.compile(r"response_format\.json_schema"), "text.format"),
    (re.compile(r"response_format"), "text.format"),
    (re.compile(r"reasoning_effort"), "reasoning.effort"),
)


def _rename(text: str) -> str:
    for pattern, replacement in _RENAMES:
        text = pattern.sub(replacement, text)
    return text


def _chat_fields(obj: dict[str, Any], logprobs: bool, limits: Limits, errors: _Errors,
                 echo: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions fields of a ``response.create``, validated by chatfields; fills ``echo``."""
    chat: dict[str, Any] = {}
    if obj.get("tools") is not None:
        chat["tools"] = _tools(obj["tools"], errors)
    choice = obj.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = _tool_choice(choice, errors)
    if obj.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = obj["parallel_tool_calls"]
    text = obj.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise errors.invalid("text", "field 'text' must be an object")
        _known_keys(text, "text", ("format", "verbosity"), errors)
        if text.get("verbosity") is not None:
            raise errors.unsupported("text.verbosity", "the engine has no verbosity setting")
        if text.get("format") is not None:
            chat["response_format"] = _text_format(text["format"], errors)
    reasoning = obj.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise errors.invalid("reasoning", "field 'reasoning' must be an object")
        _known_keys(reasoning, "reasoning", ("effort", "summary", "generate_summary", "context", "mode"), errors)
        for key in ("summary", "generate_summary", "context", "mode"):
            if reasoning.get(key) is not None:
                raise errors.unsupported(f"reasoning.{key}", "trioai relays the model's reasoning as reasoning "
                                                             "text; only 'reasoning.effort' is supported")
        if reasoning.get("effort") is not None:
            chat["reasoning_effort"] = reasoning["effort"]
    top = obj.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int):
            raise errors.invalid("top_logprobs", "field 'top_logprobs' must be an integer from 0 to 20")
        logprobs = logprobs or top > 0
    if logprobs:
        chat["logprobs"] = True
        if top is not None:
            chat["top_logprobs"] = top

    def invalid(param: str, message: str) -> ResponsesError:
        return errors.invalid(_rename(param), _rename(message))

    fields = parse_request_fields(chat, limits, invalid)
    echo["tools"] = [_echo_tool(tool) for tool in fields.get("tools", [])]
    echo["tool_choice"] = _echo_tool_choice(choice)
    echo["parallel_tool_calls"] = fields.get("parallel_tool_calls", True)
    echo["text"] = {"format": _echo_format(fields.get("response_format"))}
    echo["reasoning"] = {"effort": fields.get("reasoning_effort"), "summary": None}
    echo["top_logprobs"] = fields.get("top_logprobs")
    return fields


def _tools(value: Any, errors: _Errors) -> list[Any]:
    """Responses function tools in chat shape (chatfields validates their values)."""
    if not isinstance(value, list):
        raise errors.invalid("tools", "field 'tools' must be an array of function tools")
    tools: list[Any] = []
    for index, raw in enumerate(value):
        param = f"tools[{index}]"
        if not isinstance(raw, dict):
            raise errors.invalid(param, f"'{param}' must be a tool object")
        kind = raw.get("type")
        if kind != "function":
            if isinstance(kind, str):
                raise errors.unsupported_value(f"{param}.type", f"tools of type {_short(kind)!r} are not supported: "
                                                                "trioai serves function tools only")
            raise errors.missing(f"{param}.type") if kind is None else errors.invalid(f"{param}.type",
                                                                                       "must be a string")
        _known_keys(raw, param, tuple(_FUNCTION_TOOL_FIELDS), errors)
        if raw.get("defer_loading"):
            raise errors.unsupported_value(f"{param}.defer_loading", "trioai has no tool search")
        if raw.get("async"):
            raise errors.unsupported_value(f"{param}.async", "asynchronous function calls are not supported")
        callers = raw.get("allowed_callers")
        if callers is not None and callers != ["direct"]:
            raise errors.unsupported_value(f"{param}.allowed_callers", "only direct calls are supported")
        if raw.get("output_schema") is not None:
            raise errors.unsupported(f"{param}.output_schema", "the engine takes no output schema for tools")
        if raw.get("name") is None:
            raise errors.missing(f"{param}.name")
        function = {key: raw[key] for key in ("name", "description", "parameters", "strict")
                    if raw.get(key) is not None}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any, errors: _Errors) -> Any:
    if isinstance(value, str) or not isinstance(value, dict):
        return value  # chatfields checks the strings and refuses other types
    kind = value.get("type")
    if kind == "function":
        _known_keys(value, "tool_choice", ("type", "name"), errors)
        if value.get("name") is None:
            raise errors.missing("tool_choice.name")
        return {"type": "function", "function": {"name": value["name"]}}
    if isinstance(kind, str):
        raise errors.unsupported_value("tool_choice.type", f"tool_choice of type {_short(kind)!r} is not "
                                                           "supported: use \"none\", \"auto\", \"required\" or "
                                                           "{\"type\": \"function\", \"name\": ...}")
    raise errors.missing("tool_choice.type") if kind is None else errors.invalid("tool_choice.type",
                                                                                  "must be a string")


def _text_format(value: Any, errors: _Errors) -> Any:
    if not isinstance(value, dict):
        raise errors.invalid("text.format", "field 'text.format' must be an object with a 'type'")
    kind = value.get("type")
    if kind in ("text", "json_object"):
        _known_keys(value, "text.format", ("type",), errors)
        return {"type": kind}
    if kind == "json_schema":
        _known_keys(value, "text.format", ("type", "name", "schema", "description", "strict"), errors)
        if value.get("name") is None:
            raise errors.missing("text.format.name")
        spec = {key: value[key] for key in ("name", "schema", "description", "strict") if value.get(key) is not None}
        return {"type": "json_schema", "json_schema": spec}
    raise errors.invalid("text.format.type", "field 'text.format.type' must be \"text\", \"json_schema\" or "
                                             "\"json_object\"")


def _echo_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    out: dict[str, Any] = {"type": "function", "name": function["name"]}
    if "description" in function:
        out["description"] = function["description"]
    out["parameters"] = function.get("parameters")
    out["strict"] = function.get("strict")
    return out


def _echo_tool_choice(value: Any) -> Any:
    if value is None:
        return "auto"
    if isinstance(value, dict):
        return {"type": "function", "name": value["name"]}
    return value


def _echo_format(value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {"type": "text"}
    if value["type"] != "json_schema":
        return {"type": value["type"]}
    spec = value["json_schema"]
    return {"type": "json_schema", **spec}


# --- small checks ------------------------------------------------------------------------------


def _string(value: Any, param: str, errors: _Errors, maximum: int | None = None, minimum: int = 0) -> str:
    if not isinstance(value, str):
        raise errors.invalid(param, f"field '{param}' must be a string")
    if not is_encodable(value):
        raise errors.invalid(param, f"field '{param}' contains an unpaired UTF-16 surrogate")
    if len(value) < minimum or (maximum is not None and len(value) > maximum):
        raise errors.invalid(param, f"field '{param}' must be {minimum} to {maximum} characters")
    return value


def _bool(value: Any, param: str, errors: _Errors) -> bool:
    if not isinstance(value, bool):
        raise errors.invalid(param, f"field '{param}' must be true or false")
    return value


def _number(value: Any, param: str, low: float, high: float, errors: _Errors) -> float | None:
    if value is None:
        return None
    # An int is compared as it is: math.isfinite would overflow on a 400-digit integer.
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise errors.invalid(param, f"field '{param}' must be a number")
    if not low <= value <= high:
        raise errors.invalid(param, f"field '{param}' must be between {low:g} and {high:g}")
    return float(value)


def _require_plain(value: Any, param: str, errors: _Errors) -> None:
    """Every string UTF-8, every number finite (so the value can be sent back as JSON)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not is_encodable(node):
                raise errors.invalid(param, f"field '{param}' contains an unpaired UTF-16 surrogate")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise errors.invalid(param, f"field '{param}' holds a non-finite number")
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _short(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- steering ----------------------------------------------------------------------------------


def steer_failed_frame(steer: SteerResponse, *, code: str = "steering_not_supported", message: str = STEER_UNSUPPORTED,
                       stream_id: str | None = None, sequence_number: int = 0) -> str:
    """The SDK's ``response.steer.failed`` event answering ``steer``, which returns its input uncommitted.

    ``stream_id``: the lane of the steered response, when it is known and its create had one.
    """
    event: dict[str, Any] = {
        "type": "response.steer.failed",
        "sequence_number": sequence_number,
        "error": {"type": "invalid_request_error", "code": code, "message": message},
        "steer": {"previous_response_id": steer.previous_response_id, "input": steer.input},
    }
    if stream_id is not None:
        event["stream_id"] = stream_id
    return dumps(event)


# --- encoding ----------------------------------------------------------------------------------

#: ``Done.finish_reason`` values that end a response as ``incomplete``, with their reason.
_INCOMPLETE_REASONS: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}


class _Item:
    """One output item of a response being encoded."""

    __slots__ = ("index", "kind", "id", "id_json", "parts", "logprobs", "part_logprobs", "call_id", "name", "final")

    def __init__(self, index: int, kind: str, item_id: str) -> None:
        self.index = index
        self.kind = kind  # "message", "reasoning" or "function_call"
        self.id = item_id
        self.id_json = dumps(item_id)
        self.parts: list[str] = []
        self.logprobs: list[dict[str, Any]] = []  # output_text.done's form
        self.part_logprobs: list[dict[str, Any]] = []  # the output_text part's form
        self.call_id = ""
        self.name = ""
        self.final: dict[str, Any] | None = None  # the item once done


class ResponseEncoder:
    """Turns one response's neutral core events into the Responses API's JSON text frames.

    Feed :meth:`encode` the generation's events in order (it returns the frames for each, maybe none);
    after the terminal it returns nothing more. ``model`` is the model the response object names;
    ``created_at`` its Unix time. :meth:`warmup` stands for the whole stream of a ``generate: false``
    create. :meth:`output_items` gives the output for :meth:`ResponseHistory.store`.

    ``on_finished``, when given, is called once with the encoder right after it encodes the terminal
    (the outbox encodes when the writer takes an entry, which can be after the generation ended):
    the moment to store the response in the history, e.g. unless ``status`` is ``"failed"`` or None.
    """

    def __init__(self, create: CreateResponse, model: str, created_at: int, *,
                 on_finished: Callable[[ResponseEncoder], None] | None = None) -> None:
        self.create = create
        self.on_finished = on_finished
        self.model = model
        self.created_at = created_at
        self.status: str | None = None  # the terminal status once there is one ("completed", "cancelled", ...)
        self.finished = False
        self._seq = 0
        self._created = False
        self._in_progress = False
        self._items: list[_Item] = []
        self._text: _Item | None = None
        self._reasoning: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._tail = "}" if create.stream_id is None else ',"stream_id":' + dumps(create.stream_id) + "}"
        suffix = create.id.removeprefix("resp_")
        self._suffix = suffix
        echo = create.echo
        self._static: dict[str, Any] = {
            "background": False,
            "instructions": create.instructions,
            "max_output_tokens": echo.get("max_output_tokens"),
            "max_tool_calls": echo.get("max_tool_calls"),
            "model": model,
            "parallel_tool_calls": echo.get("parallel_tool_calls", True),
            "previous_response_id": create.previous_response_id,
            "reasoning": echo.get("reasoning", {"effort": None, "summary": None}),
            "service_tier": "default",
            "temperature": echo.get("temperature"),
            "text": echo.get("text", {"format": {"type": "text"}}),
            "tool_choice": echo.get("tool_choice", "auto"),
            "tools": echo.get("tools", []),
            "top_logprobs": echo.get("top_logprobs"),
            "top_p": echo.get("top_p"),
            "truncation": "disabled",
            "user": echo.get("user"),
            "metadata": dict(create.metadata),
        }
        for name in ("safety_identifier", "prompt_cache_key"):
            if name in echo:
                self._static[name] = echo[name]

    # --- public ---

    def encode(self, event: ServerEvent) -> list[str]:
        """The frames for one core event (none after the terminal, or for events with no Responses form)."""
        if self.finished:
            return []
        if type(event) is Token:
            if not event.content and not event.logprobs:
                return []
            return self._token(event)
        if type(event) is Reasoning:
            return self._reasoning_delta(event.content) if event.content else []
        if type(event) is ToolCall:
            return self._tool_call(event)
        if type(event) is Started:
            return self._ensure_started()
        if type(event) is Queued:
            if self._created:
                return []
            frames = self._ensure_created("queued")
            frames.append(self._lifecycle("response.queued", "queued"))
            return frames
        if type(event) is Done:
            return self._done(event)
        if type(event) is Cancelled:
            frames = self._ensure_created("in_progress")
            frames += self._close_all("incomplete")
            frames.append(self._terminal("response.incomplete", "cancelled"))
            return frames
        if type(event) is Error:
            return self._error(event)
        return []

    def warmup(self) -> list[str]:
        """The whole stream of a ``generate: false`` response: created, in progress, completed, no output."""
        if self.finished or self._created:
            raise RuntimeError("warmup() is the whole stream of a response that has sent nothing yet")
        frames = self._ensure_started()
        frames.append(self._terminal("response.completed", "completed"))
        return frames

    def output_items(self) -> tuple[dict[str, Any], ...]:
        """The finished output items, in output order (all of them once the terminal is encoded)."""
        return tuple(item.final for item in self._items if item.final is not None)

    # --- frames ---

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _frame(self, kind: str, fields: dict[str, Any]) -> str:
        event: dict[str, Any] = {"type": kind, "sequence_number": self._next_seq(), **fields}
        if self.create.stream_id is not None:
            event["stream_id"] = self.create.stream_id
        return dumps(event)

    def _delta(self, kind: str, item: _Item, delta: str, extra: str = "") -> str:
        # The per-token path: built by concatenation, like protocol.encode_token.
        return ('{"type":"' + kind + '","sequence_number":' + str(self._next_seq()) + ',"item_id":' + item.id_json
                + ',"output_index":' + str(item.index) + extra + ',"delta":' + dumps(delta) + self._tail)

    def _response(self, status: str, output: list[dict[str, Any]], *, usage: dict[str, Any] | None = None,
                  error: dict[str, Any] | None = None, incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.create.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": incomplete, "output": output, "usage": usage, **self._static}

    def _lifecycle(self, kind: str, status: str) -> str:
        return self._frame(kind, {"response": self._response(status, [])})

    def _ensure_created(self, status: str) -> list[str]:
        if self._created:
            return []
        self._created = True
        return [self._lifecycle("response.created", status)]

    def _terminal(self, kind: str, status: str, *, usage: dict[str, Any] | None = None,
                  error: dict[str, Any] | None = None, incomplete: dict[str, Any] | None = None) -> str:
        self.finished = True
        self.status = status
        output = list(self.output_items())
        text = self._frame(kind, {"response": self._response(status, output, usage=usage, error=error,
                                                             incomplete=incomplete)})
        self._finished()
        return text

    def _finished(self) -> None:
        if self.on_finished is not None:
            callback, self.on_finished = self.on_finished, None
            callback(self)

    # --- items ---

    def _open(self, kind: str, prefix: str) -> _Item:
        index = len(self._items)
        item = _Item(index, kind, f"{prefix}_{self._suffix}_{index}")
        self._items.append(item)
        return item

    def _token(self, event: Token) -> list[str]:
        frames = self._ensure_started()
        if self._reasoning is not None:
            frames += self._close(self._reasoning, "completed")
        item = self._text
        if item is None:
            item = self._text = self._open("message", "msg")
            frames.append(self._frame("response.output_item.added", {"output_index": item.index, "item": {
                "id": item.id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}}))
            frames.append(self._frame("response.content_part.added", {
                "item_id": item.id, "output_index": item.index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}))
        delta_logprobs, part_logprobs = _logprobs(event.logprobs)
        item.logprobs += delta_logprobs
        item.part_logprobs += part_logprobs
        item.parts.append(event.content)
        frames.append(self._delta("response.output_text.delta", item, event.content,
                                  ',"content_index":0,"logprobs":' + dumps(delta_logprobs)))
        return frames

    def _reasoning_delta(self, text: str) -> list[str]:
        frames = self._ensure_started()
        if self._text is not None:
            frames += self._close(self._text, "completed")
        item = self._reasoning
        if item is None:
            item = self._reasoning = self._open("reasoning", "rs")
            frames.append(self._frame("response.output_item.added", {"output_index": item.index, "item": {
                "id": item.id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}}))
            frames.append(self._frame("response.content_part.added", {
                "item_id": item.id, "output_index": item.index, "content_index": 0,
                "part": {"type": "reasoning_text", "text": ""}}))
        item.parts.append(text)
        frames.append(self._delta("response.reasoning_text.delta", item, text, ',"content_index":0'))
        return frames

    def _tool_call(self, event: ToolCall) -> list[str]:
        frames = self._ensure_started()
        for open_item in (self._text, self._reasoning):
            if open_item is not None:
                frames += self._close(open_item, "completed")
        item = self._calls.get(event.index)
        if item is None:
            item = self._calls[event.index] = self._open("function_call", "fc")
            item.call_id = event.call_id or f"call_{self._suffix}_{item.index}"
            item.name = event.name or ""
            frames.append(self._frame("response.output_item.added", {"output_index": item.index, "item": {
                "id": item.id, "type": "function_call", "call_id": item.call_id, "name": item.name,
                "arguments": "", "status": "in_progress"}}))
        elif not item.name and event.name:
            item.name = event.name
        if event.arguments:
            item.parts.append(event.arguments)
            frames.append(self._delta("response.function_call_arguments.delta", item, event.arguments))
        return frames

    def _ensure_started(self) -> list[str]:
        """``created`` (unless sent) and ``in_progress``, once: on ``Started``, or on output before it."""
        if self._in_progress:
            return []
        self._in_progress = True
        frames = self._ensure_created("in_progress")
        frames.append(self._lifecycle("response.in_progress", "in_progress"))
        return frames

    def _close(self, item: _Item, status: str) -> list[str]:
        """The done events of an open item, which is final from here on."""
        frames: list[str] = []
        text = "".join(item.parts)
        base = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            self._text = None
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": item.part_logprobs}
            frames.append(self._frame("response.output_text.done", {
                **base, "content_index": 0, "text": text, "logprobs": item.logprobs}))
            frames.append(self._frame("response.content_part.done", {**base, "content_index": 0, "part": part}))
            item.final = {"id": item.id, "type": "message", "role": "assistant", "status": status, "content": [part]}
        elif item.kind == "reasoning":
            self._reasoning = None
            part = {"type": "reasoning_text", "text": text}
            frames.append(self._frame("response.reasoning_text.done", {**base, "content_index": 0, "text": text}))
            frames.append(self._frame("response.content_part.done", {**base, "content_index": 0, "part": part}))
            item.final = {"id": item.id, "type": "reasoning", "summary": [], "content": [part], "status": status}
        else:
            frames.append(self._frame("response.function_call_arguments.done", {**base, "arguments": text}))
            item.final = {"id": item.id, "type": "function_call", "call_id": item.call_id, "name": item.name,
                          "arguments": text, "status": status}
        frames.append(self._frame("response.output_item.done", {"output_index": item.index, "item": item.final}))
        return frames

    def _close_all(self, status: str) -> list[str]:
        frames: list[str] = []
        for item in self._items:
            if item.final is None:
                frames += self._close(item, status)
        return frames

    # --- terminals ---

    def _done(self, event: Done) -> list[str]:
        frames = self._ensure_started()
        calls = [self._calls[index] for index in sorted(self._calls)]
        if event.tool_calls and not calls:  # an engine that sent whole calls only at the end
            for position, whole in enumerate(event.tool_calls):
                frames += self._tool_call(ToolCall(event.id, position, whole.call_id, whole.name, ""))
            calls = [self._calls[index] for index in sorted(self._calls)]
        if len(calls) == len(event.tool_calls):
            for item, whole in zip(calls, event.tool_calls, strict=True):
                # The assembled call is authoritative; the call_id stays the one output_item.added named.
                item.parts = [whole.arguments]
                if whole.name:
                    item.name = whole.name
        reason = _INCOMPLETE_REASONS.get(event.finish_reason or "")
        status = "completed" if reason is None else "incomplete"
        frames += self._close_all(status)
        usage = _usage(event.usage)
        if reason is None:
            frames.append(self._terminal("response.completed", "completed", usage=usage))
        else:
            frames.append(self._terminal("response.incomplete", "incomplete", usage=usage,
                                         incomplete={"reason": reason}))
        return frames

    def _error(self, event: Error) -> list[str]:
        if not self._created:
            # Before the response exists: the request's error, the SDK's terminal for this create.
            self.finished = True
            text = ResponsesError.from_error(event, self.create.stream_id).frame(self._next_seq())
            self._finished()
            return [text]
        frames = self._close_all("incomplete")
        code = "rate_limit_exceeded" if event.code == ErrorCode.RATE_LIMITED else "server_error"
        error_type = _ERROR_EVENT.get(event.code, ("server_error", "", 500))[0]
        error = {"code": code, "message": event.message, "param": event.param, "type": error_type}
        frames.append(self._terminal("response.failed", "failed", error=error))
        return frames


def _usage(usage: Usage) -> dict[str, Any]:
    prompt = usage.prompt_tokens or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + usage.completion_tokens}


def _logprobs(entries: tuple[Any, ...] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Chat-completions logprob entries in the Responses forms: (delta/done events', output_text part's)."""
    events: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for entry in entries or ():
        head = _logprob(entry)
        if head is None:
            continue
        tops = [top for top in map(_logprob, entry.get("top_logprobs") or ()) if top is not None]
        events.append({"token": head[0], "logprob": head[1],
                       "top_logprobs": [{"token": t, "logprob": p} for t, p, _ in tops]})
        parts.append({"token": head[0], "bytes": head[2], "logprob": head[1],
                      "top_logprobs": [{"token": t, "bytes": b, "logprob": p} for t, p, b in tops]})
    return events, parts


def _logprob(entry: Any) -> tuple[str, float, list[int]] | None:
    if not isinstance(entry, dict):
        return None
    token, logprob, raw = entry.get("token"), entry.get("logprob"), entry.get("bytes")
    if not isinstance(token, str) or isinstance(logprob, bool) or not isinstance(logprob, int | float):
        return None
    logprob = float(logprob)
    if not math.isfinite(logprob):
        return None
    if isinstance(raw, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in raw):
        data: list[int] = raw
    else:
        data = list(token.encode("utf-8", "replace"))
    return token, logprob, data
