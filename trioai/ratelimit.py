"""Per-client rate limits (requests and generated tokens per minute): token buckets, in this
process or shared by every instance through the state (``--redis``).

A client is its API key id, or its IP address when no keys are configured. A request is let in when
the client's request bucket holds one request and its token bucket is not in debt; the tokens a
generation produced are debited when it ends (so one long answer can overdraw, and the next
request waits until the debt is paid back). The buckets are :class:`trioai.state.Take`\\ s: the
same arithmetic in process (:class:`trioai.state.Buckets`) and in Redis (one Lua script).

With a shared state, a debit is queued and sent by :meth:`RateLimiter.run` (a service task), or
with the client's next request, whichever comes first. When the shared state is unavailable the
limiter counts in process (``degraded``, logged once) and goes back to the shared counters as soon
as a call succeeds again; what was counted meanwhile stays local.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import trio

from .state import Buckets, State, StateUnavailable, Take

log = logging.getLogger(__name__)

MAX_TRACKED_CLIENTS: Final = 100_000
#: Tokens per minute a client needs in its bucket to start a request: any positive balance.
_ANY: Final = 1e-9


class RateLimiter:
    """Requests per minute and tokens per minute, per client; ``None`` means unlimited.

    ``state``: where the counters live when shared (None: this process only). It may also be set
    after construction, before the server takes requests.
    """

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None,
                 state: State | None = None) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.state = state
        self.degraded = False  # the shared state failed the last call: counting in process
        self.local_fallbacks = 0  # calls counted in process because the shared state was unavailable
        self._local = Buckets(limit=2 * MAX_TRACKED_CLIENTS)
        self._debits: dict[str, int] = {}  # tokens not yet sent to the shared state, per client
        self._debits_queued = trio.Event()

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    async def admit(self, client: str, now: float) -> float:
        """Take one request for ``client``: 0.0 if admitted, else the seconds to wait first.

        ``now``: :func:`trio.current_time` (the in-process clock; the shared state uses its own).
        """
        if not self.enabled:
            return 0.0
        takes = []
        if self.tokens_per_minute is not None:
            debit = self._debits.pop(client, 0)
            takes.append(Take(_tokens_key(client), self.tokens_per_minute, need=_ANY, debit=debit))
        if self.requests_per_minute is not None:
            takes.append(Take(_requests_key(client), self.requests_per_minute, amount=1.0, need=1.0))
        return await self._take(takes, now)

    def debit_tokens(self, client: str, tokens: int, now: float) -> None:
        """Charge the tokens a finished generation produced (never blocks: a shared debit is queued)."""
        if self.tokens_per_minute is None or not tokens:
            return
        if self.state is None or (client not in self._debits and len(self._debits) >= MAX_TRACKED_CLIENTS):
            # No shared state, or nothing sends the queue (run() not started): count it here.
            self._local.take([Take(_tokens_key(client), self.tokens_per_minute, debit=tokens)], now)
            return
        self._debits[client] = self._debits.get(client, 0) + tokens
        self._debits_queued.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued debits to the shared state as they come, until cancelled (a service task)."""
        task_status.started()
        while True:
            await self._debits_queued.wait()
            self._debits_queued = trio.Event()
            while self._debits and self.tokens_per_minute is not None:
                client, tokens = self._debits.popitem()
                take = Take(_tokens_key(client), self.tokens_per_minute, debit=tokens)
                await self._take([take], trio.current_time())

    async def _take(self, takes: Sequence[Take], now: float) -> float:
        """Shared if there is a state and it answers; in process otherwise."""
        if self.state is not None:
            try:
                wait = await self.state.take(takes)
            except StateUnavailable:
                self.local_fallbacks += 1
                if not self.degraded:
                    self.degraded = True
                    log.warning("rate limits: shared state unavailable, counting in this process until it is back")
            else:
                if self.degraded:
                    self.degraded = False
                    log.warning("rate limits: shared state back, counting across instances again")
                return wait
        return self._local.take(takes, now)


def _requests_key(client: str) -> str:
    # One Redis Cluster hash tag per client: both buckets of a take live on one node.
    return f"rl:{{{client}}}:requests"


def _tokens_key(client: str) -> str:
    return f"rl:{{{client}}}:tokens"
