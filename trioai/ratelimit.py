"""Per-client rate limits (requests and generated tokens per minute), sans I/O: token buckets.

A client is its API key id, or its IP address when no keys are configured. A request is let in when
the client's request bucket holds one request and its token bucket is not in debt; the tokens a
generation produced are debited when it ends (so one long answer can overdraw, and the next
request waits until the debt is paid back). Time is passed in, so tests need no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_TRACKED_CLIENTS: Final = 100_000


@dataclass
class TokenBucket:
    """``capacity`` units, refilled at ``rate`` units per second; may go negative (debt)."""

    rate: float
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        """Add what accrued since the last update."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 if it is now); call :meth:`refill` first."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate


@dataclass
class _Client:
    requests: TokenBucket | None
    tokens: TokenBucket | None


class RateLimiter:
    """Requests per minute and tokens per minute, per client; ``None`` means unlimited."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clients: dict[str, _Client] = {}

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def admit(self, client: str, now: float) -> float:
        """Take one request for ``client``: 0.0 if admitted, else the seconds to wait first."""
        if not self.enabled:
            return 0.0
        state = self._state(client, now)
        waits = []
        if state.tokens is not None:
            state.tokens.refill(now)
            waits.append(state.tokens.wait_for(1e-9))  # any positive balance will do
        if state.requests is not None:
            state.requests.refill(now)
            waits.append(state.requests.wait_for(1.0))
        wait = max(waits)
        if wait == 0.0 and state.requests is not None:
            state.requests.level -= 1.0
        return wait

    def debit_tokens(self, client: str, tokens: int, now: float) -> None:
        """Charge the tokens a finished generation produced."""
        if self.tokens_per_minute is None or not tokens:
            return
        bucket = self._state(client, now).tokens
        assert bucket is not None
        bucket.refill(now)
        bucket.level -= tokens

    def _state(self, client: str, now: float) -> _Client:
        state = self._clients.get(client)
        if state is None:
            if len(self._clients) >= MAX_TRACKED_CLIENTS:
                self._forget_rested(now)
            state = self._clients[client] = _Client(
                _bucket(self.requests_per_minute, now), _bucket(self.tokens_per_minute, now)
            )
        return state

    def _forget_rested(self, now: float) -> None:
        """Drop clients whose buckets have refilled: they would start full anyway."""
        for client, state in list(self._clients.items()):
            buckets = [b for b in (state.requests, state.tokens) if b is not None]
            for bucket in buckets:
                bucket.refill(now)
            if all(b.level >= b.capacity for b in buckets):
                del self._clients[client]


def _bucket(per_minute: int | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    return TokenBucket(rate=per_minute / 60.0, capacity=float(per_minute), level=float(per_minute), updated=now)
