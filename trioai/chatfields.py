"""The chat-completions fields beyond text, sans I/O: validated, then passed to the engine as they are.

``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``, ``logprobs``,
``top_logprobs``, ``top_k``, ``min_p``, ``repetition_penalty``, ``reasoning_effort`` on a
``message``; ``tool_calls`` on assistant messages and ``tool_call_id`` on tool messages.
docs/protocol.md has the rules. Each failure is raised through the ``invalid(param, message)``
callable the caller passes (it builds the ``ProtocolError`` with the request's id), so this module
knows nothing of events or ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import Limits

Invalid = Callable[[str, str], Exception]


def parse_request_fields(obj: dict[str, Any], limits: Limits, invalid: Invalid) -> dict[str, Any]:
    """The validated chat fields of a ``message`` (only those present), as engine request keys."""
    return {}


def parse_message_fields(raw: dict[str, Any], role: str, invalid: Invalid) -> dict[str, Any]:
    """The validated extra fields of one entry of ``messages`` (``tool_calls``, ``tool_call_id``).

    ``invalid`` takes a suffix of the message's param (``".tool_calls[0].id"``) and a message.
    """
    return {}
