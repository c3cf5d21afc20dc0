"""The state a server keeps that several instances may share: one small interface, two backends.

:class:`LocalState` keeps it in this process (the default: one process needs nothing else);
:class:`trioai.redisstate.RedisState` keeps it in Redis (``--redis URL``), so every instance sees
the same counters, leases, logs, slots and queues. Callers program against :class:`State`:

- **rate limits**: token buckets that refill evenly over :data:`WINDOW` (:meth:`State.take`);
- **leases**: who owns a key (a generation) until its time to live passes unless renewed;
- **records**: a small value under a key, expiring (a generation's request, a cancel flag);
- **event logs**: a generation's numbered frames (``seq`` from 1), bounded and expiring, read
  after a ``seq`` or followed live by another instance;
- **admission**: slots of a named pool of capacity N, each held under a lease (a dead holder's
  slot comes back when its lease runs out), and a FIFO queue of waiters with their positions.

Degraded mode: the Redis backend raises :class:`StateUnavailable` from every call when Redis
cannot be reached within its timeout (it never hangs), and the caller falls back to local state.
Times are seconds; the Redis backend reads Redis's clock, so every instance shares one clock.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import trio

if TYPE_CHECKING:
    from .config import Settings

#: Rate-limit buckets hold their ``per_minute`` and refill evenly over this many seconds.
WINDOW: Final = 60.0
#: Buckets tracked in process before those that are full again are forgotten.
MAX_LOCAL_BUCKETS: Final = 200_000
#: Claims or slots one renewal call carries at most (a Redis script's run blocks the server meanwhile).
RENEW_BATCH: Final = 256

LogEntry = tuple[int, str]
"""One entry of an event log: its ``seq`` (from 1, increasing) and its frame."""


def check_seqs(entries: Sequence[LogEntry]) -> None:
    """ValueError unless the entries' ``seq`` increase from 1 (a caller's bug, refused before any write)."""
    previous = 0
    for seq, _ in entries:
        if seq <= previous:
            raise ValueError(f"log entries need increasing seq from 1, got {seq} after {previous}")
        previous = seq


class StateUnavailable(Exception):
    """The shared state did not answer within its timeout (or refused): use local state instead."""


@dataclass(frozen=True, slots=True)
class Take:
    """One bucket's part in an atomic :meth:`State.take`.

    ``debit`` is taken first, always (it may leave the bucket in debt); then, only if every bucket
    of the call holds its ``need``, each bucket's ``amount`` is taken.
    """

    key: str
    per_minute: float  # capacity; refills at per_minute / WINDOW units per second
    amount: float = 0.0
    need: float = 0.0
    debit: float = 0.0


@dataclass(frozen=True, slots=True)
class Renewal:
    """One key's answer from :meth:`State.renew_claims`."""

    held: bool  # the owner holds the lease now (renewed, or taken back after it ran out); False: another does
    record_gone: bool  # the key's record had expired (held only): the owner should store it again
    flagged: bool  # the key's flag record exists (held only): e.g. a cancel asked on another instance


class State(Protocol):
    """What the core needs from shared state (see the module docstring)."""

    #: Whether the last call reached the state (always True in process): a /readyz or metric detail.
    available: bool

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the backend's resources until cancelled (a service task); started once usable."""
        ...

    async def take(self, takes: Sequence[Take]) -> float:
        """Apply ``takes`` atomically: 0.0 if every ``need`` was there (amounts taken), else
        the seconds until it would be (nothing but the debits taken)."""
        ...

    async def acquire_lease(self, key: str, owner: str, ttl: float) -> bool:
        """Make ``owner`` hold ``key`` for ``ttl`` s unless another owner holds it (True if held now)."""
        ...

    async def renew_claims(self, claims: Sequence[tuple[str, str]], owner: str, *, lease_ttl: float,
                           record_ttl: float) -> list[Renewal]:
        """For each ``(key, flag)`` of ``claims``, in one atomic step (one round trip): unless another
        owner holds ``key``'s lease, ``owner`` holds it for ``lease_ttl`` s from now (taken back if it
        had run out) and ``key``'s record expires ``record_ttl`` s from now; and whether the record
        ``flag`` exists. Each key's answer, in order."""
        ...

    async def lease_owner(self, key: str) -> str | None:
        """The owner holding ``key`` now, if any."""
        ...

    async def put_record(self, key: str, value: str, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` s (replacing what was there)."""
        ...

    async def get_record(self, key: str) -> str | None:
        """The value stored under ``key``, if it has not expired."""
        ...

    async def claim(self, key: str, owner: str, value: str, *, lease_ttl: float, record_ttl: float) -> bool:
        """:meth:`acquire_lease` and, if ``owner`` holds ``key`` now, :meth:`put_record` of ``value``:
        one atomic step (False: another owner holds it, and nothing changed)."""
        ...

    async def append(self, log: str, entries: Sequence[LogEntry], *, ttl: float, maxlen: int) -> bool:
        """Add ``entries`` (increasing ``seq``, else ValueError) to ``log``, which keeps about its last
        ``maxlen`` entries and expires ``ttl`` s after its last append (also renewed by no entries).
        False (nothing added) if the log already holds a ``seq`` at or past the first one: another
        writer got there first."""
        ...

    async def append_many(self, appends: Sequence[tuple[str, Sequence[LogEntry]]], *, ttl: float,
                          maxlen: int) -> list[bool]:
        """:meth:`append` to several logs in one round trip; each one's answer, in order (a log named
        twice: its second part is judged after its first). ValueError for any log's seqs: nothing written."""
        ...

    async def read(self, log: str, after: int, limit: int = 1000) -> list[LogEntry]:
        """Up to ``limit`` entries of ``log`` with ``seq`` > ``after``, oldest first."""
        ...

    async def follow(self, log: str, after: int, wait: float, limit: int = 1000) -> list[LogEntry]:
        """As :meth:`read`, but when there is nothing yet, wait up to ``wait`` s for an append
        (``[]`` when none came)."""
        ...

    async def acquire_slot(self, pool: str, capacity: int, holder: str, ttl: float, *,
                           queue: str | None = None) -> bool:
        """Hold one of ``capacity`` slots of ``pool`` for ``ttl`` s (True), or none is free (False).

        With ``queue``: only if ``holder`` is among that queue's first waiters that the free slots
        can take (FIFO across instances); it then leaves the queue.
        """
        ...

    async def renew_slots(self, slots: Sequence[tuple[str, str]], ttl: float) -> list[bool]:
        """For each ``(pool, holder)`` of ``slots``, in one round trip: extend ``holder``'s slot of
        ``pool`` to ``ttl`` s from now; False where it lost it (expired)."""
        ...

    async def release_slot(self, pool: str, holder: str) -> None:
        """Give ``holder``'s slot back (nothing if it has none)."""
        ...

    async def slots_held(self, pool: str) -> int:
        """How many slots of ``pool`` are held now (expired ones not counted)."""
        ...

    async def join_queue(self, queue: str, waiter: str, ttl: float) -> int:
        """Put ``waiter`` at the end of ``queue`` (kept ``ttl`` s unless renewed); its position (1: next)."""
        ...

    async def queue_position(self, queue: str, waiter: str, ttl: float) -> int | None:
        """``waiter``'s position now (1: next), renewing its stay for ``ttl`` s; None if not queued."""
        ...

    async def leave_queue(self, queue: str, waiter: str) -> None:
        """Take ``waiter`` out of ``queue`` (nothing if it is not there)."""
        ...

    async def queue_length(self, queue: str) -> int:
        """How many waiters ``queue`` holds (expired ones not counted)."""
        ...


# -- rate-limit buckets, sans I/O ------------------------------------------------------------------


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


class Buckets:
    """Token buckets by key, in process: :meth:`take` is :meth:`State.take` with the time passed in.

    At most about ``limit`` buckets: past it, those that have refilled are forgotten (they would
    start full anyway).
    """

    def __init__(self, limit: int = MAX_LOCAL_BUCKETS) -> None:
        self.limit = limit
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, takes: Sequence[Take], now: float) -> float:
        """See :meth:`State.take`; ``now`` in seconds on any clock that only goes forward."""
        buckets = [self._bucket(t.key, t.per_minute, now) for t in takes]
        wait = 0.0
        for take, bucket in zip(takes, buckets, strict=True):
            bucket.refill(now)
            bucket.level -= take.debit
            wait = max(wait, bucket.wait_for(take.need))
        if wait == 0.0:
            for take, bucket in zip(takes, buckets, strict=True):
                bucket.level -= take.amount
        return wait

    def _bucket(self, key: str, per_minute: float, now: float) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.limit:
                self._forget_rested(now)
            bucket = self.buckets[key] = TokenBucket(per_minute / WINDOW, per_minute, per_minute, now)
        return bucket

    def _forget_rested(self, now: float) -> None:
        for key, bucket in list(self.buckets.items()):
            bucket.refill(now)
            if bucket.level >= bucket.capacity:
                del self.buckets[key]


# -- the in-process backend -------------------------------------------------------------------------


class _Log:
    __slots__ = ("entries", "expires", "changed")

    def __init__(self) -> None:
        self.entries: collections.deque[LogEntry] = collections.deque()
        self.expires = math.inf
        self.changed = trio.Event()  # set (and replaced) at each append


class LocalState:
    """:class:`State` in this process's memory: what one instance uses without Redis.

    ``clock`` gives the time in seconds (default :func:`trio.current_time`; tests pass their own).
    Expired leases, records, slots and waiters are dropped when their key is next used; expired logs when
    any log is appended to (a log that is never written again is dropped by the next writer).
    """

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self.clock = clock
        self.available = True
        self._buckets = Buckets()
        self._leases: dict[str, tuple[str, float]] = {}
        self._records: dict[str, tuple[str, float]] = {}
        self._logs: dict[str, _Log] = {}  # by last append, oldest first
        self._slots: dict[str, dict[str, float]] = {}
        self._queues: dict[str, dict[str, float]] = {}  # waiter -> deadline, in arrival order

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to hold: started, and returns."""
        task_status.started()

    async def take(self, takes: Sequence[Take]) -> float:
        """See :meth:`State.take`."""
        return self._buckets.take(takes, self.clock())

    async def acquire_lease(self, key: str, owner: str, ttl: float) -> bool:
        """See :meth:`State.acquire_lease`."""
        now = self.clock()
        held = self._leases.get(key)
        if held is not None and held[1] > now and held[0] != owner:
            return False
        self._leases[key] = (owner, now + ttl)
        if len(self._leases) > 1024 and len(self._leases) & 1023 == 0:
            self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
        return True

    async def renew_claims(self, claims: Sequence[tuple[str, str]], owner: str, *, lease_ttl: float,
                           record_ttl: float) -> list[Renewal]:
        """See :meth:`State.renew_claims` (no checkpoint in between: atomic)."""
        now = self.clock()
        answers = []
        for key, flag in claims:
            if not await self.acquire_lease(key, owner, lease_ttl):
                answers.append(Renewal(held=False, record_gone=False, flagged=False))
                continue
            value, expires = self._records.get(key, ("", -math.inf))
            live = expires > now
            if live:
                self._records[key] = (value, now + record_ttl)
            answers.append(Renewal(held=True, record_gone=not live, flagged=await self.get_record(flag) is not None))
        return answers

    async def lease_owner(self, key: str) -> str | None:
        """See :meth:`State.lease_owner`."""
        held = self._leases.get(key)
        if held is None or held[1] <= self.clock():
            return None
        return held[0]

    async def put_record(self, key: str, value: str, ttl: float) -> None:
        """See :meth:`State.put_record`."""
        now = self.clock()
        self._records[key] = (value, now + ttl)
        if len(self._records) > 1024 and len(self._records) & 1023 == 0:
            self._records = {k: v for k, v in self._records.items() if v[1] > now}

    async def get_record(self, key: str) -> str | None:
        """See :meth:`State.get_record`."""
        record = self._records.get(key)
        if record is None or record[1] <= self.clock():
            return None
        return record[0]

    async def claim(self, key: str, owner: str, value: str, *, lease_ttl: float, record_ttl: float) -> bool:
        """See :meth:`State.claim` (no checkpoint in between: atomic)."""
        if not await self.acquire_lease(key, owner, lease_ttl):
            return False
        await self.put_record(key, value, record_ttl)
        return True

    async def append(self, log: str, entries: Sequence[LogEntry], *, ttl: float, maxlen: int) -> bool:
        """See :meth:`State.append`."""
        check_seqs(entries)
        return self._append(log, entries, ttl, maxlen)

    async def append_many(self, appends: Sequence[tuple[str, Sequence[LogEntry]]], *, ttl: float,
                          maxlen: int) -> list[bool]:
        """See :meth:`State.append_many`."""
        for _, entries in appends:
            check_seqs(entries)
        return [self._append(log, entries, ttl, maxlen) for log, entries in appends]

    def _append(self, log: str, entries: Sequence[LogEntry], ttl: float, maxlen: int) -> bool:
        """:meth:`append` of entries already checked."""
        now = self.clock()
        self._drop_expired_logs(now)
        state = self._logs.pop(log, None) or _Log()
        self._logs[log] = state  # now the most recently appended
        if entries and state.entries and entries[0][0] <= state.entries[-1][0]:
            return False
        state.entries.extend(entries)
        while len(state.entries) > maxlen:
            state.entries.popleft()
        state.expires = now + ttl
        if entries:
            state.changed.set()
            state.changed = trio.Event()
        return True

    async def read(self, log: str, after: int, limit: int = 1000) -> list[LogEntry]:
        """See :meth:`State.read`."""
        state = self._live_log(log)
        if state is None:
            return []
        return [entry for entry in state.entries if entry[0] > after][:limit]

    async def follow(self, log: str, after: int, wait: float, limit: int = 1000) -> list[LogEntry]:
        """See :meth:`State.follow`."""
        with trio.move_on_after(wait):
            while True:
                entries = await self.read(log, after, limit)
                if entries:
                    return entries
                state = self._logs.get(log)
                if state is None:  # not written yet: wait for its first append
                    state = self._logs[log] = _Log()
                    state.expires = self.clock() + wait
                await state.changed.wait()
        return []

    def _live_log(self, log: str) -> _Log | None:
        state = self._logs.get(log)
        if state is not None and state.expires <= self.clock():
            del self._logs[log]
            state.changed.set()
            return None
        return state

    def _drop_expired_logs(self, now: float) -> None:
        for log, state in list(self._logs.items()):
            if state.expires > now:
                return  # the rest were appended to later (ttl is about the same for all)
            del self._logs[log]
            state.changed.set()  # its followers look again

    async def acquire_slot(self, pool: str, capacity: int, holder: str, ttl: float, *,
                           queue: str | None = None) -> bool:
        """See :meth:`State.acquire_slot`."""
        now = self.clock()
        slots = self._live(self._slots, pool, now)
        if holder in slots:
            slots[holder] = now + ttl
            return True
        free = capacity - len(slots)
        if free <= 0:
            return False
        if queue is not None:
            waiters = self._live(self._queues, queue, now)
            if holder in waiters:
                if list(waiters).index(holder) >= free:
                    return False
                del waiters[holder]
            elif waiters and len(waiters) >= free:
                return False  # the queue's first waiters come first
        slots[holder] = now + ttl
        return True

    async def renew_slots(self, slots: Sequence[tuple[str, str]], ttl: float) -> list[bool]:
        """See :meth:`State.renew_slots`."""
        now = self.clock()
        renewed = []
        for pool, holder in slots:
            held = self._live(self._slots, pool, now)
            if holder in held:
                held[holder] = now + ttl
            renewed.append(holder in held)
        return renewed

    async def release_slot(self, pool: str, holder: str) -> None:
        """See :meth:`State.release_slot`."""
        self._slots.get(pool, {}).pop(holder, None)

    async def slots_held(self, pool: str) -> int:
        """See :meth:`State.slots_held`."""
        return len(self._live(self._slots, pool, self.clock()))

    async def join_queue(self, queue: str, waiter: str, ttl: float) -> int:
        """See :meth:`State.join_queue`."""
        now = self.clock()
        waiters = self._live(self._queues, queue, now)
        waiters[waiter] = now + ttl  # one already in line keeps its place
        return list(waiters).index(waiter) + 1

    async def queue_position(self, queue: str, waiter: str, ttl: float) -> int | None:
        """See :meth:`State.queue_position`."""
        now = self.clock()
        waiters = self._live(self._queues, queue, now)
        if waiter not in waiters:
            return None
        waiters[waiter] = now + ttl  # a dict keeps the order of first insertion
        return list(waiters).index(waiter) + 1

    async def leave_queue(self, queue: str, waiter: str) -> None:
        """See :meth:`State.leave_queue`."""
        self._queues.get(queue, {}).pop(waiter, None)

    async def queue_length(self, queue: str) -> int:
        """See :meth:`State.queue_length`."""
        return len(self._live(self._queues, queue, self.clock()))

    @staticmethod
    def _live(table: dict[str, dict[str, float]], name: str, now: float) -> dict[str, float]:
        """``table[name]`` without its expired members (created empty if missing)."""
        members = table.setdefault(name, {})
        for member in [m for m, deadline in members.items() if deadline <= now]:
            del members[member]
        return members


# -- construction -----------------------------------------------------------------------------------


def make_state(settings: Settings) -> State:
    """The state of a server with ``settings``: Redis's with ``--redis``, else in process.

    Start its :meth:`State.run` in a service nursery (``await nursery.start(state.run)``). The Redis
    client is imported only here, so a server without ``--redis`` runs without it installed.
    """
    if settings.redis is None:
        return LocalState()
    from .redisstate import RedisState

    return RedisState(settings.redis)
