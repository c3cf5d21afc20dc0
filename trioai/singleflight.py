"""One call in flight, its result shared: for look-ups that many tasks want at once.

The model name (asked of the engine when not configured) and the readiness check are wanted by
many tasks at the same moment. Asking the engine once per caller would queue them behind each
other (a lock held across a slow call makes the k-th caller wait k timeouts) or flood the engine.
:class:`SharedCall` runs the call once; every caller that arrives while it runs waits for that
same call; the outcome is then kept for ``ttl`` seconds (a success) or ``error_ttl`` (a failure),
so a failing engine is asked again soon but not by every caller.

Cancellation: the call runs in the task of the caller that started it. If that caller is
cancelled, the call is abandoned, nothing is cached, and the callers still waiting wake up; the
first of them starts the call again. ``trio.Cancelled`` is never cached or swallowed.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class SharedCall(Generic[T]):
    """Run ``call`` at most once at a time and share its outcome for a while."""

    __slots__ = ("_call", "ttl", "error_ttl", "_value", "_error", "_expires", "_running", "_waiters")

    def __init__(self, call: Callable[[], Awaitable[T]], *, ttl: float = math.inf, error_ttl: float = 1.0) -> None:
        self._call = call
        self.ttl = ttl
        self.error_ttl = error_ttl
        self._value: T | None = None
        self._error: Exception | None = None
        self._expires = -math.inf  # nothing cached yet
        self._running = False
        # Callers waiting for the call in flight, woken one after another in arrival order: each
        # hands on to the next as it leaves, so callers go on (e.g. into a FIFO queue) in the
        # order they came, which waking them all at once would shuffle.
        self._waiters = trio.lowlevel.ParkingLot()

    @property
    def in_flight(self) -> bool:
        """Whether a call is running now."""
        return self._running

    def forget(self) -> None:
        """Drop the cached outcome: the next :meth:`get` calls again."""
        self._expires = -math.inf

    async def get(self) -> T:
        """The cached outcome if still fresh; else the outcome of the (one) call in flight."""
        if trio.current_time() < self._expires:
            await trio.lowlevel.checkpoint()
            return self._cached()
        while self._running:
            await self._waiters.park()
            if trio.current_time() < self._expires:
                self._waiters.unpark()  # the next in line
                return self._cached()
            # The call was cancelled, so nothing is cached: this caller runs it; the rest wait on.
        self._running = True
        try:
            value = await self._call()
        except Exception as exc:  # not Cancelled: a cancelled call caches nothing
            self._value, self._error = None, exc
            self._expires = trio.current_time() + self.error_ttl
            raise
        else:
            self._value, self._error = value, None
            self._expires = trio.current_time() + self.ttl
            return value
        finally:
            self._running = False
            self._waiters.unpark()

    def _cached(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
