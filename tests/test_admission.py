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


class Recorder:
    """A waiter's report callback that checks each position against the line as it is then."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.positions: list[int] = []
        self.scope = trio.CancelScope()

    def __call__(self, position: int) -> None:
        self.positions.append(position)

    async def run(self, release: trio.Event) -> None:
        with self.scope:
            async with self.admission.slot(self):
                await release.wait()


async def test_positions_are_reported_on_a_scale_so_the_cost_per_request_is_flat() -> None:
    """With n waiters, each departure tells O(log n) waiters, not all n (issue: O(n²) wake-ups)."""
    n = 400
    admission = Admission(1)
    releases = [trio.Event() for _ in range(n + 1)]
    recorders = [Recorder(admission) for _ in range(n + 1)]
    async with trio.open_nursery() as nursery:
        for recorder, release in zip(recorders, releases, strict=True):
            nursery.start_soon(recorder.run, release)
            await trio.testing.wait_all_tasks_blocked()
        assert admission.queued == n
        for release in releases:
            release.set()
            await trio.testing.wait_all_tasks_blocked()
    waiters = recorders[1:]
    total = sum(len(r.positions) for r in waiters)
    # Every value up to 10 plus ~10 per decade: far from the n²/2 = 80,000 reports of one per move.
    assert total <= n * 30, total
    last = waiters[-1].positions
    assert last[0] == n and last[-1] == 1
    assert last == sorted(last, reverse=True) and len(set(last)) == len(last)
    assert [p for p in last if p <= 10] == list(range(10, 0, -1))  # near the front, every move
    assert {12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300} <= set(last)
    for recorder in waiters:
        assert recorder.positions[-1] == 1


async def test_positions_stay_exact_when_waiters_leave_from_the_middle() -> None:
    admission = Admission(1)
    holder_release = trio.Event()
    recorders = [Recorder(admission) for _ in range(30)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Recorder(admission).run, holder_release)
        await trio.testing.wait_all_tasks_blocked()
        for recorder in recorders:
            nursery.start_soon(recorder.run, trio.Event())
            await trio.testing.wait_all_tasks_blocked()
        assert [r.positions for r in recorders[:3]] == [[1], [2], [3]]
        for recorder in recorders[5:25]:  # twenty leave from the middle of the line
            recorder.scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        remaining = recorders[:5] + recorders[25:]
        for index, recorder in enumerate(remaining):
            # Whoever stands at a reported position was told it; nobody was told a wrong one.
            if index + 1 <= 10:
                assert recorder.positions[-1] == index + 1
            assert recorder.positions[-1] >= index + 1
        assert admission.queued == 10
        nursery.cancel_scope.cancel()
    assert (admission.running, admission.queued) == (0, 0)
