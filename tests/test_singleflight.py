"""SharedCall: one call in flight, its outcome shared, callers released in arrival order."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioai.singleflight import SharedCall


class Calls:
    """A call that takes ``seconds``, counting how often it ran; fails while ``fail`` is set."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self.count = 0
        self.fail = False

    async def __call__(self) -> int:
        self.count += 1
        await trio.sleep(self.seconds)
        if self.fail:
            raise LookupError(f"failure {self.count}")
        return self.count


async def test_callers_share_one_call_and_go_on_in_arrival_order(autojump_clock: trio.abc.Clock) -> None:
    calls = Calls()
    shared = SharedCall(calls, ttl=10.0)
    order: list[int] = []

    async def caller(n: int) -> None:
        assert await shared.get() == 1
        order.append(n)  # no schedule point between the result and this: the order is the wake order

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(caller, n)
            await trio.testing.wait_all_tasks_blocked()
    assert calls.count == 1
    assert order == list(range(20))
    await trio.sleep(11.0)  # past the ttl: asked again
    assert await shared.get() == 2


async def test_a_failure_is_shared_for_error_ttl_then_asked_again(autojump_clock: trio.abc.Clock) -> None:
    calls = Calls()
    calls.fail = True
    shared = SharedCall(calls, error_ttl=2.0)
    for _ in range(3):
        with pytest.raises(LookupError, match="failure 1"):
            await shared.get()
    assert calls.count == 1
    await trio.sleep(2.5)
    calls.fail = False
    assert await shared.get() == 2


async def test_a_cancelled_call_caches_nothing_and_the_next_caller_runs_it(autojump_clock: trio.abc.Clock) -> None:
    calls = Calls()
    shared = SharedCall(calls)
    results: list[int] = []
    runner = trio.CancelScope()

    async def first_caller() -> None:
        with runner:
            await shared.get()

    async def caller() -> None:
        results.append(await shared.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_caller)  # runs the call
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(caller)  # waits for it
        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        assert shared.in_flight and calls.count == 1
        runner.cancel()  # the call is abandoned mid-way
    assert calls.count == 2  # the first waiter ran it again; the second shared that outcome
    assert results == [2, 2]
