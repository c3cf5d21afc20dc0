"""Admission across instances (``--redis``): capacity and the queue held in shared state.

Without shared state nothing here runs: each instance admits with its own
:class:`~trioai.admission.Admission`. With it, every admission unit (the one engine of a single-engine
server, else each model) is also a pool of slots in the state, with a FIFO queue of the same name:

- A request takes one slot of its unit's pool (capacity: the unit's, as the local admission counts it)
  under a lease of ``--lease-seconds``, renewed by one task per instance (:meth:`Cluster.run`) while
  it runs, given back when it ends. A dead instance's slots come back when their leases run out.
- A free slot is taken with one round trip, no wait (a newcomer takes it only if fewer requests wait
  than slots are free: no jumping the queue). Otherwise the request joins the unit's queue, is told
  its cluster-wide position, and asks again: every :func:`poll_interval` (50 ms at the head, longer
  further back, at most a quarter of the lease so that its place is renewed in time), or at once
  when a request of this instance gave a slot of that pool back. Cross-instance hand-over thus
  costs at most 50 ms at the head of the line; a Redis notification channel would save that at the
  price of a publish per release and a subscriber connection per instance.
- The local admission stays inside, as each instance's own bound: a request takes its local slot
  after its cluster slot (so it does not wait there while the cluster has room, and positions stay
  the cluster's), and the local ``max_queue`` counts this instance's cluster waiters too.
- Engines shared by several models (or models on several engines) also get one slot per request of
  ``engine:{name}`` (:meth:`Cluster.take`, no queue), taken by :meth:`trioai.enginepool.EnginePool.engine_for`,
  as the engine's local ``in_flight`` bounds it within one instance.
- Shared state unavailable (:class:`~trioai.state.StateUnavailable`, which the state logs once each
  way): the request is admitted by the local admission alone, as without ``--redis``; requests
  started after it is back are counted across instances again. A running request is never stopped
  because its slot could not be renewed.

Positions a client is told never go up and follow the reporting scale of :mod:`trioai.admission`.
"""

from __future__ import annotations

import bisect
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import trio

from .admission import REPORTED_POSITIONS, Admission
from .state import RENEW_BATCH, State, StateUnavailable

log = logging.getLogger("trioai.cluster")

#: How often the head of the line asks for a slot (seconds); further back, this times its position.
POLL_MIN: Final = 0.05
#: The longest wait between two asks of one waiter (and at most a quarter of the lease).
POLL_MAX: Final = 1.0
#: Longest wait for giving a slot back or leaving a queue (the lease frees it anyway).
RELEASE_TIMEOUT: Final = 0.5


def poll_interval(position: int, lease: float) -> float:
    """Seconds a waiter at ``position`` waits before asking again."""
    return min(POLL_MAX, lease / 4, POLL_MIN * max(1, position))


class PositionTeller:
    """Tells a waiter its queue position: the first one, then only lower ones that reached or passed a
    value of :data:`~trioai.admission.REPORTED_POSITIONS` since the last told (positions never go up)."""

    __slots__ = ("report", "told")

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report
        self.told = 0  # 0: nothing told yet

    def __call__(self, position: int) -> None:
        """A position now (``report`` is called if it is news by the rule above)."""
        told = self.told
        if told and (position >= told or not passed_reported(position, told)):
            return
        self.told = position
        self.report(position)


def passed_reported(position: int, before: int) -> bool:
    """Whether moving from ``before`` to ``position`` (lower) reached a reported value."""
    return bisect.bisect_left(REPORTED_POSITIONS, position) < bisect.bisect_left(REPORTED_POSITIONS, before)


class Cluster:
    """This instance's part in cluster-wide admission: its holder ids and the slots it holds."""

    def __init__(self, state: State, lease: float) -> None:
        self.state = state
        self.lease = lease
        self.instance = secrets.token_hex(6)
        self.held: dict[str, str] = {}  # holder -> pool, renewed by run()
        self.calls = 0  # state calls made (a measure of its cost per request)
        self.local_fallbacks = 0  # admissions (or renewals) done without the state: it was unavailable
        self.lost = 0  # slots found expired at renewal (the state was away longer than a lease)
        self._next = 0
        self._freed: dict[str, trio.Event] = {}  # pool -> set when this instance gives one of its slots back

    def holder(self) -> str:
        """A holder id no other request of any instance uses."""
        self._next += 1
        return f"{self.instance}:{self._next}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every slot this instance holds, three times per lease, until cancelled (a service task)."""
        task_status.started()
        while True:
            await trio.sleep(self.lease / 3)
            await self.renew_all()

    async def renew_all(self) -> None:
        """One renewal round, :data:`RENEW_BATCH` slots per round trip (a slot found expired is
        taken again, even past the capacity)."""
        held = list(self.held.items())
        for start in range(0, len(held), RENEW_BATCH):
            batch = held[start:start + RENEW_BATCH]
            try:
                self.calls += 1
                renewed = await self.state.renew_slots([(pool, holder) for holder, pool in batch], self.lease)
                for (holder, pool), kept in zip(batch, renewed, strict=True):
                    if kept or holder not in self.held:
                        continue
                    self.lost += 1
                    self.calls += 1
                    # Its request still runs on the engine: count it again, even past the capacity.
                    await self.state.acquire_slot(pool, 1 << 30, holder, self.lease)
            except StateUnavailable:
                self.local_fallbacks += 1
                return  # down: every call would fail at once; the next round tries again

    async def acquire(self, pool: str, capacity: int, tell: Callable[[int], None],
                      waiting: Callable[[int], None]) -> str | None:
        """Hold a slot of ``pool`` in FIFO order (waiting in the queue of the same name, positions told
        through ``tell``); its holder id, or None when the state is unavailable (admit locally).
        ``waiting(+1/-1)`` counts this instance's waiters."""
        state = self.state
        holder = self.holder()
        granted = joined = False
        try:
            self.calls += 1
            if await state.acquire_slot(pool, capacity, holder, self.lease, queue=pool):
                granted = True
                self.held[holder] = pool
                return holder
            self.calls += 1
            position = await state.join_queue(pool, holder, self.lease)
            joined = True
            waiting(1)
            try:
                tell(position)
                renewed = trio.current_time()
                moved_up = False
                while True:
                    if moved_up:
                        moved_up = False
                    else:
                        await self._wait_turn(pool, position, capacity)
                    if position <= capacity:
                        self.calls += 1
                        if await state.acquire_slot(pool, capacity, holder, self.lease, queue=pool):
                            granted = True
                            self.held[holder] = pool
                            return holder
                        if position == 1 and trio.current_time() - renewed < self.lease / 4:
                            continue  # first in line: nothing to learn, and its place is fresh
                    self.calls += 1
                    found = await state.queue_position(pool, holder, self.lease)
                    if found is None:  # its place expired (the state was slow or away): back in line
                        self.calls += 1
                        found = await state.join_queue(pool, holder, self.lease)
                    # Just came within reach of a free slot: ask for it at once, not after another wait.
                    moved_up = found <= capacity < position
                    position = found
                    renewed = trio.current_time()
                    tell(position)
            finally:
                waiting(-1)
        except StateUnavailable:
            self.local_fallbacks += 1
            return None
        finally:
            if not granted:  # cancelled, or the state went away: leave no trace (the lease would clear it)
                await self._forget(pool, holder, joined)

    async def _wait_turn(self, pool: str, position: int, capacity: int) -> None:
        delay = poll_interval(position, self.lease)
        if position > capacity:
            await trio.sleep(delay)
            return
        freed = self._freed.get(pool)
        if freed is None:
            freed = self._freed[pool] = trio.Event()
        with trio.move_on_after(delay):
            await freed.wait()

    async def _forget(self, pool: str, holder: str, joined: bool) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            try:
                if joined:
                    self.calls += 1
                    await self.state.leave_queue(pool, holder)
                self.calls += 1
                await self.state.release_slot(pool, holder)  # in case an acquire got through unanswered
            except StateUnavailable:
                pass

    async def take(self, pool: str, capacity: int) -> tuple[bool, str | None]:
        """Try to hold a slot of ``pool`` now, no queue: (True, holder); (False, None) when it is full;
        (True, None) when the state is unavailable (go on locally)."""
        holder = self.holder()
        try:
            self.calls += 1
            if not await self.state.acquire_slot(pool, capacity, holder, self.lease):
                return False, None
        except StateUnavailable:
            self.local_fallbacks += 1
            return True, None
        self.held[holder] = pool
        return True, holder

    async def release(self, pool: str, holder: str) -> None:
        """Give ``holder``'s slot back (shielded, bounded: a slot not given back expires with its lease)."""
        self.held.pop(holder, None)
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            try:
                self.calls += 1
                await self.state.release_slot(pool, holder)
            except StateUnavailable:
                pass
        freed = self._freed.pop(pool, None)
        if freed is not None:
            freed.set()  # this instance's waiters at the head ask at once


class ClusterAdmission(Admission):
    """A unit's admission across instances: a slot of the cluster pool ``pool``, then the local one."""

    def __init__(self, capacity: int, cluster: Cluster, pool: str) -> None:
        super().__init__(capacity)
        self.cluster = cluster
        self.pool = pool
        self.cluster_waiting = 0  # this instance's requests in the cluster queue

    @property
    def queued(self) -> int:
        """How many of this instance's requests wait for capacity now (cluster queue or local)."""
        return self.cluster_waiting + len(self._waiting)

    @property
    def full(self) -> bool:
        """Whether a new request would have to wait (as far as this instance knows)."""
        return self.cluster_waiting > 0 or super().full

    def take_now(self) -> object | None:
        """None: a cluster slot is a round trip to the shared state (:meth:`slot` takes it)."""
        return None

    def _count_waiting(self, change: int) -> None:
        self.cluster_waiting += change

    @asynccontextmanager
    async def slot(self, report_position: Callable[[int], None]) -> AsyncIterator[None]:
        """Hold a cluster slot (None: unavailable, local only) and then a local one, for the body."""
        tell = PositionTeller(report_position)
        capacity = int(self.limiter.total_tokens)
        holder = await self.cluster.acquire(self.pool, capacity, tell, self._count_waiting)
        try:
            async with super().slot(tell):
                yield
        finally:
            if holder is not None:
                await self.cluster.release(self.pool, holder)
