"""Admission to the engine: a global ``trio.CapacityLimiter`` plus each waiter's queue position.

The limiter is FIFO (a released token goes to the longest waiter, and ``acquire_nowait`` never
jumps the queue), so a waiter's position is the number of tickets taken before its own that are
still waiting, plus one. The limiter's ``statistics()`` gives totals; positions need the tickets.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio


class Admission:
    """At most ``capacity`` generations run upstream at once; the rest wait in line."""

    def __init__(self, capacity: int) -> None:
        self.limiter = trio.CapacityLimiter(capacity)
        self._waiting: list[int] = []  # tickets of waiters, ascending = arrival order
        self._next_ticket = 0
        self._moved = trio.Event()

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

        While waiting, ``report_position(n)`` is called with 1 for next-in-line, and again each time
        the position changes. It is never called when capacity is free at once.

        Free capacity is taken without a schedule point, unlike ``CapacityLimiter.acquire``: the
        body (a request to the engine) checkpoints on its own I/O at once, and in a burst of new
        requests each extra yield makes every request wait for a pass over all the others before
        it is sent (one fewer: burst TTFT p50 83 → 79 ms over 64 requests, docs/benchmarks.md).
        """
        borrower = object()
        try:
            self.limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self._wait_in_line(borrower, report_position)
        try:
            yield
        finally:
            self.limiter.release_on_behalf_of(borrower)

    async def _wait_in_line(self, borrower: object, report_position: Callable[[int], None]) -> None:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._waiting.append(ticket)
        acquired = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_positions, ticket, report_position)
                await self.limiter.acquire_on_behalf_of(borrower)
                acquired = True
                nursery.cancel_scope.cancel()
        except BaseException:
            # Cancelled after the limiter handed us a token: give it back, then re-raise.
            if acquired:
                self.limiter.release_on_behalf_of(borrower)
            raise
        finally:
            del self._waiting[bisect.bisect_left(self._waiting, ticket)]
            self._moved.set()
            self._moved = trio.Event()

    async def _report_positions(self, ticket: int, report_position: Callable[[int], None]) -> None:
        last = 0
        while True:
            position = bisect.bisect_left(self._waiting, ticket) + 1
            if position != last:
                report_position(position)
                last = position
            await self._moved.wait()
