"""Who may connect: API keys and allowed origins, checked at the WebSocket handshake, sans I/O.

A client presents its key in one of three ways, because browsers cannot set headers on a
WebSocket:

- ``Authorization: Bearer KEY``;
- a subprotocol ``bearer.KEY`` offered beside the protocol's own :data:`SUBPROTOCOL` (the server
  selects ``trioai.v1`` and never echoes the key back);
- a ``token=KEY`` query parameter (the server never logs query strings).

Keys are compared in constant time. :func:`check_handshake` returns the decision; the server turns
a :class:`Rejection` into an HTTP status before any upgrade.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs

SUBPROTOCOL: Final = "trioai.v1"
BEARER_PREFIX: Final = "bearer."


class KeyFileError(ValueError):
    """The API keys file cannot be used."""


@dataclass(frozen=True)
class KeySet:
    """The accepted API keys (stored as SHA-256 digests, compared in constant time)."""

    digests: frozenset[bytes]

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> KeySet:
        """A key set from plain keys."""
        return cls(frozenset(_digest(k) for k in keys))

    @classmethod
    def load(cls, path: str | Path) -> KeySet:
        """One key per line; blank lines and ``#`` comments are ignored, and so is a UTF-8 BOM."""
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read API keys file {path}: {exc}") from None
        keys = [line.strip() for line in text.splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
        if not keys:
            raise KeyFileError(f"API keys file {path} holds no key")
        return cls.from_keys(keys)

    def identify(self, key: str) -> str | None:
        """A short, loggable id of ``key`` if it is accepted (never the key itself)."""
        digest = _digest(key)
        found = False
        for known in self.digests:  # every entry compared, so timing reveals nothing
            found |= hmac.compare_digest(digest, known)
        return digest.hex()[:8] if found else None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Accepted:
    """The handshake may proceed."""

    key_id: str | None  # None when no keys are configured
    subprotocol: str | None


@dataclass(frozen=True)
class Rejection:
    """The handshake is refused with this HTTP status and body."""

    status: int
    reason: str


def check_handshake(
    *,
    keys: KeySet | None,
    allowed_origins: Sequence[str],
    headers: Sequence[tuple[bytes, bytes]],
    subprotocols: Sequence[str],
    target: str,
) -> Accepted | Rejection:
    """Decide a handshake from its request head alone."""
    header = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}
    origin = header.get("origin")
    if allowed_origins and origin is not None and origin not in allowed_origins:
        return Rejection(403, "origin not allowed")
    offered = [p for p in subprotocols if not p.startswith(BEARER_PREFIX)]
    selected = SUBPROTOCOL if SUBPROTOCOL in offered else None
    if keys is None:
        return Accepted(None, selected)
    for candidate in _presented_keys(header.get("authorization"), subprotocols, target):
        key_id = keys.identify(candidate)
        if key_id is not None:
            return Accepted(key_id, selected)
    return Rejection(401, "missing or invalid API key")


def _presented_keys(authorization: str | None, subprotocols: Sequence[str], target: str) -> list[str]:
    found = []
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            found.append(credentials.strip())
    found += [p[len(BEARER_PREFIX):] for p in subprotocols if p.startswith(BEARER_PREFIX)]
    query = target.partition("?")[2]
    if query:
        found += parse_qs(query).get("token", [])
    return found
