"""Admission to the engine: a global ``trio.CapacityLimiter`` plus each waiter's queue position.

The limiter is FIFO (a released token goes to the longest waiter, and ``acquire_nowait`` never
jumps the queue), so a waiter's position is its index in the line of waiters, plus one.

Telling positions costs O(log n) per departure, not O(n): a waiter is told its position when it
joins and again each time the position reaches a value of :data:`REPORTED_POSITIONS` (every value
up to 10, then 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, ... — a 1-1.2-1.5-2-2.5-3-4-5-6-8 scale).
Positions fall by at most one per departure, so every waiter passes through each of those values
below the one it started at, and on a departure only the waiters standing at one of those values
(one each) can need a report. No task per waiter, no wake-up of the whole line: with 2,000 waiters
each departure looks at ~40 places and a waiter receives ~40 ``queued`` events in all.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import trio

_SCALE: Final = (10, 12, 15, 20, 25, 30, 40, 50, 60, 80)


def _reported_positions(limit: int) -> tuple[int, ...]:
    values = list(range(1, 10))
    decade = 1
    while decade * 10 <= limit:
        values.extend(step * decade for step in _SCALE)
        decade *= 10
    return tuple(v for v in values if v <= limit)


#: The positions a waiter is told when it reaches them (besides its first position).
REPORTED_POSITIONS: Final = _reported_positions(10**7)


class _Waiter:
    __slots__ = ("ticket", "report", "told")

    def __init__(self, ticket: int, report: Callable[[int], None]) -> None:
        self.ticket = ticket
        self.report = report
        self.told = 0  # the last position reported


class Admission:
    """At most ``capacity`` generations run upstream at once; the rest wait in line."""

    def __init__(self, capacity: int) -> None:
        self.limiter = trio.CapacityLimiter(capacity)
        self._waiting: list[_Waiter] = []  # in arrival order (ascending tickets)
        self._next_ticket = 0

    @property
    def queued(self) -> int:
        """How many requests wait for capacity now."""
        return len(self._waiting)

    @property
    def full(self) -> bool:
        """Whether a new request would have to wait."""
        return self.limiter.available_tokens == 0 or bool(self._waiting)

    @property
    def running(self) -> int:
        """How many requests hold capacity now."""
        return int(self.limiter.borrowed_tokens)

    @asynccontextmanager
    async def slot(self, report_position: Callable[[int], None]) -> AsyncIterator[None]:
        """Hold one unit of capacity for the body; wait in line first if there is none.

        While waiting, ``report_position(n)`` is called with the position on joining (1 is next in
        line) and again as it moves (see the module docstring for which values are reported). It
        is never called when capacity is free at once. It must not block: it is called from the
        task of whichever request left the line.

        Free capacity is taken without a schedule point, unlike ``CapacityLimiter.acquire``: the
        body (a request to the engine) checkpoints on its own I/O at once, and in a burst of new
        requests each extra yield makes every request wait for a pass over all the others before
        it is sent (one fewer: burst TTFT p50 83 → 79 ms over 64 requests, docs/benchmarks.md).
        """
        borrower = self._take_free()
        if borrower is None:
            borrower = object()
            await self._wait_in_line(borrower, report_position)
        try:
            yield
        finally:
            self.release(borrower)

    def take_now(self) -> object | None:
        """One unit of capacity if it is free now (nobody waits and a token is left), as the
        borrower to :meth:`release` it with; else None. No schedule point."""
        return self._take_free()

    def _take_free(self) -> object | None:
        borrower = object()
        try:
            self.limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            return None
        return borrower

    def release(self, borrower: object) -> None:
        """Give back the unit :meth:`take_now` (or :meth:`slot`) took for ``borrower``."""
        self.limiter.release_on_behalf_of(borrower)

    async def _wait_in_line(self, borrower: object, report_position: Callable[[int], None]) -> None:
        waiter = _Waiter(self._next_ticket, report_position)
        self._next_ticket += 1
        self._waiting.append(waiter)
        waiter.told = len(self._waiting)
        report_position(waiter.told)
        try:
            # Cancelled here, the token was not handed over (trio's park is all or nothing).
            await self.limiter.acquire_on_behalf_of(borrower)
        finally:
            index = bisect.bisect_left(self._waiting, waiter.ticket, key=_ticket)
            del self._waiting[index]
            self._report_moves(index)

    def _report_moves(self, start: int) -> None:
        """Everyone from ``start`` on moved up one place: tell those now at a reported position."""
        waiting = self._waiting
        for position in REPORTED_POSITIONS:
            if position > len(waiting):
                return
            if position > start:  # ahead of the one who left: nobody there moved
                waiter = waiting[position - 1]
                if waiter.told != position:
                    waiter.told = position
                    waiter.report(position)


def _ticket(waiter: _Waiter) -> int:
    return waiter.ticket
