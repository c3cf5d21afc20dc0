"""The exceptions trioai raises, and the error codes clients see.

Exception tree::

    TrioaiError
    ├── ProtocolError    the client sent something we cannot act on (its fault, like wsproto's
    │                    RemoteProtocolError); carries the ``error`` event to send back. The
    │                    connection stays usable.
    └── UpstreamError    the engine failed one request (connect refused, HTTP error, timeout,
                         stream cut short, in-stream error object); carries the code the client sees
                         and whether retrying could help. Other streams are unaffected.

Every error a client can receive has a stable ``code`` from :class:`ErrorCode`; the message is for
humans and may change.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Stable ``code`` values of ``error`` events (documented in docs/protocol.md)."""

    # The client's fault: fix the request and send it again.
    INVALID_JSON = "invalid_json"
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_FRAME = "unsupported_frame"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_ID = "unknown_id"
    NOTHING_TO_CANCEL = "nothing_to_cancel"
    TOO_MANY_STREAMS = "too_many_streams"
    RESUME_NOT_FOUND = "resume_not_found"
    RESUMED_ELSEWHERE = "resumed_elsewhere"
    MODEL_NOT_FOUND = "model_not_found"
    # Capacity: retry later (after ``retry_after`` seconds when given).
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    # The engine's side: retry later, or report.
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_OVERLOADED = "upstream_overloaded"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_DISCONNECTED = "upstream_disconnected"
    # The gateway itself.
    INTERNAL_ERROR = "internal_error"
    SHUTTING_DOWN = "shutting_down"


class TrioaiError(Exception):
    """Base class of every exception trioai raises on purpose."""


class ProtocolError(TrioaiError):
    """A client event that cannot be acted on.

    ``request_id`` is the offending request's id when the frame carried a valid one, so the error
    event can be matched to it; ``param`` names the field at fault.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        request_id: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.request_id = request_id


class UpstreamError(TrioaiError):
    """The engine failed one request.

    ``retryable`` is true where the same request may succeed later (connection refused, 503, 429,
    timeouts); ``status`` is the engine's HTTP status when there was one; ``retry_after`` is the
    engine's ``Retry-After`` in seconds when it sent one.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        self.param = param
        self.retry_after = retry_after
