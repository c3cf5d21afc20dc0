"""Admission: the global CapacityLimiter in FIFO order, with queue positions reported as they move."""

from __future__ import annotations

import trio
import trio.testing

from trioai.admission import Admission


class Waiter:
    """One request going through admission, with the positions it was told."""

    def __init__(self, admission: Admission, name: str, order: list[str]) -> None:
        self.admission = admission
        self.name = name
        self.order = order
        self.positions: list[int] = []
        self.release = trio.Event()
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            async with self.admission.slot(self.positions.append):
                self.order.append(self.name)
                await self.release.wait()


async def test_fifo_admission_with_moving_positions(autojump_clock: trio.testing.MockClock) -> None:
    admission = Admission(1)
    order: list[str] = []
    a, b, c = (Waiter(admission, name, order) for name in "abc")
    async with trio.open_nursery() as nursery:
        for waiter in (a, b, c):
            nursery.start_soon(waiter.run)
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["a"]
        assert (admission.running, admission.queued) == (1, 2)
        assert a.positions == []  # admitted at once: never told a position
        assert b.positions == [1] and c.positions == [2]
        a.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b"]
        assert c.positions == [2, 1]
        assert (admission.running, admission.queued) == (1, 1)
        b.release.set()
        c.release.set()
    assert order == ["a", "b", "c"]
    assert (admission.running, admission.queued) == (0, 0)


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    admission = Admission(1)
    order: list[str] = []
    a, b, c = (Waiter(admission, name, order) for name in "abc")
    async with trio.open_nursery() as nursery:
        for waiter in (a, b, c):
            nursery.start_soon(waiter.run)
            await trio.testing.wait_all_tasks_blocked()
        b.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert c.positions == [2, 1]
        assert admission.queued == 1
        a.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "c"]
        c.release.set()
    assert (admission.running, admission.queued) == (0, 0)


async def test_a_cancelled_holder_frees_its_slot() -> None:
    admission = Admission(2)
    order: list[str] = []
    a, b, c = (Waiter(admission, name, order) for name in "abc")
    async with trio.open_nursery() as nursery:
        for waiter in (a, b, c):
            nursery.start_soon(waiter.run)
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b"] and c.positions == [1]
        a.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c"]
        assert (admission.running, admission.queued) == (2, 0)
        b.release.set()
        c.release.set()
    assert admission.limiter.borrowed_tokens == 0


class StepCounter(trio.abc.Instrument):
    """Counts the steps (runs between two schedule points) of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_free_capacity_is_taken_without_a_schedule_point() -> None:
    """A request that finds capacity goes straight on to the engine, in the same task step."""
    admission = Admission(1)
    counter = StepCounter(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(counter)
    try:
        async with admission.slot(lambda position: None):
            assert counter.steps == 0 and admission.running == 1
        await trio.lowlevel.checkpoint()
        assert counter.steps == 1  # the counter does see a schedule point
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert admission.running == 0
