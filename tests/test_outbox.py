"""The per-connection outbox: order, coalescing, bounds and backpressure, with no socket involved."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from trioai.outbox import (
    CloseFrame,
    Outbox,
    RelaySample,
    StreamSender,
    arm_relay_sample,
    flush_deferred,
    take_relay_sample,
)
from trioai.protocol import Cancelled, Done, Pong, Started, Usage


async def next_frame(outbox: Outbox) -> str | CloseFrame:
    """What the session's writer does: the next frame, waiting while there is none."""
    while (frame := outbox.pop()) is None:
        await outbox.wait()
    assert not isinstance(frame, list)  # several frames per entry only for another wire protocol
    return frame


async def next_text(outbox: Outbox) -> str:
    """The next frame, which must be a text frame (not a close)."""
    frame = await next_frame(outbox)
    assert isinstance(frame, str), frame
    return frame


async def token(sender: StreamSender, content: str) -> None:
    """What the gateway does with a delta: queue it, and wait for the writer when over the bound."""
    if sender.put_token(content):
        await sender.drained()


async def drain(outbox: Outbox) -> list[Any]:
    """Every frame queued now, decoded (CloseFrame kept as is), without ``seq`` (checked on its own)."""
    frames: list[Any] = []
    while len(outbox):
        frame = await next_frame(outbox)
        if isinstance(frame, CloseFrame):
            frames.append(frame)
        else:
            event = json.loads(frame)
            event.pop("seq", None)
            frames.append(event)
    return frames


async def test_frames_keep_fifo_order_across_streams_and_control() -> None:
    outbox = Outbox()
    a, b = outbox.stream("a"), outbox.stream("b")
    a.event(Started("a", "m"))
    await token(a, "x")
    b.event(Started("b", "m"))
    await outbox.send_control(Pong(1))
    await token(b, "y")
    assert await drain(outbox) == [
        {"type": "start", "id": "a", "model": "m"},
        {"type": "token", "id": "a", "content": "x"},
        {"type": "start", "id": "b", "model": "m"},
        {"type": "pong", "id": 1},
        {"type": "token", "id": "b", "content": "y"},
    ]


async def test_unsent_tokens_coalesce_in_order_and_the_terminal_comes_last() -> None:
    outbox = Outbox()
    a = outbox.stream("a")
    for piece in ["Hel", "lo", ", ", "wor", "ld"]:
        await token(a, piece)
    a.event(Done("a", "stop", Usage(1, 5), 1.0, 2.0))
    frames = await drain(outbox)
    assert frames[0] == {"type": "token", "id": "a", "content": "Hello, world", "deltas": 5}
    assert [f["type"] for f in frames] == ["token", "done"]
    # Tokens after the slot was taken start a new frame.
    b = outbox.stream("b")
    await token(b, "1")
    assert await drain(outbox) == [{"type": "token", "id": "b", "content": "1"}]
    await token(b, "2")
    assert await drain(outbox) == [{"type": "token", "id": "b", "content": "2"}]


async def test_nothing_after_a_terminal_event() -> None:
    outbox = Outbox()
    a = outbox.stream("a")
    a.event(Cancelled("a"))
    assert a.finished
    with pytest.raises(RuntimeError):
        await token(a, "late")
    with pytest.raises(RuntimeError):
        a.event(Cancelled("a"))
    a.queued(3)  # ignored after the end
    assert await drain(outbox) == [{"type": "cancelled", "id": "a"}]


async def test_queue_positions_keep_only_the_latest() -> None:
    outbox = Outbox()
    a = outbox.stream("a")
    for position in (5, 4, 3):
        a.queued(position)
    assert await drain(outbox) == [{"type": "queued", "id": "a", "position": 3}]
    a.queued(2)
    assert await drain(outbox) == [{"type": "queued", "id": "a", "position": 2}]


async def test_a_full_stream_waits_and_resumes_when_drained() -> None:
    outbox = Outbox(stream_buffer_bytes=10)
    slow = outbox.stream("slow")
    other = outbox.stream("other")
    done = trio.Event()

    async def producer() -> None:
        await token(slow, "0123456789")  # reaches the bound: waits for the writer
        await token(slow, "more")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        # Another stream and control events are not held up by the full one.
        await token(other, "free")
        await outbox.send_control(Pong(None))
        frames = [json.loads(await next_text(outbox)) for _ in range(3)]
        assert frames == [
            {"type": "token", "id": "slow", "seq": 1, "content": "0123456789"},
            {"type": "token", "id": "other", "seq": 1, "content": "free"},
            {"type": "pong", "id": None},  # a connection's event: no seq
        ]
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set()
    assert await drain(outbox) == [{"type": "token", "id": "slow", "content": "more"}]


async def test_control_events_wait_when_max_control_are_unsent() -> None:
    outbox = Outbox(max_control=2)
    sent = 0

    async def receiver() -> None:
        nonlocal sent
        for i in range(3):
            await outbox.send_control(Pong(i))
            sent += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == 2  # the third waits
        assert json.loads(await next_text(outbox)) == {"type": "pong", "id": 0}
        await trio.testing.wait_all_tasks_blocked()
        assert sent == 3
    assert [f["id"] for f in await drain(outbox)] == [1, 2]


async def test_next_frame_waits_for_a_frame() -> None:
    outbox = Outbox()
    got: list[str] = []

    async def writer() -> None:
        frame = await next_frame(outbox)
        assert isinstance(frame, str)
        got.append(frame)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        outbox.stream("a").event(Started("a", "m"))
    assert json.loads(got[0])["type"] == "start"


async def test_close_comes_after_everything_queued_before_it() -> None:
    outbox = Outbox()
    a = outbox.stream("a")
    await token(a, "last words")
    outbox.close(1001, "bye")
    outbox.close(1000, "again")  # only the first close counts
    a.event(Cancelled("a"))  # dropped: the socket is closing
    await outbox.send_control(Pong(None))  # dropped too, without waiting
    assert await drain(outbox) == [{"type": "token", "id": "a", "content": "last words"},
                                   CloseFrame(1001, "bye")]


def unsent_chars(outbox: Outbox) -> int:
    """Characters the outbox holds right now, counted from its items (independent of its own counter)."""
    total = 0
    for item in outbox._items or ():
        parts = getattr(item, "parts", None)
        text = getattr(item, "text", None)
        frame = getattr(item, "frame", None)
        if parts is not None:
            total += sum(len(p) for p in parts)
        elif isinstance(text, str):
            total += len(text)
        elif isinstance(frame, str):
            total += len(frame)
        elif hasattr(item, "position"):
            total += 40  # a queue position: the outbox's fixed estimate
    return total


async def test_all_streams_of_a_connection_share_one_byte_bound() -> None:
    """Finished streams' unsent text counts: a new stream's tokens wait until the writer catches up."""
    outbox = Outbox(stream_buffer_bytes=1 << 20, connection_buffer_bytes=8192)
    for i in range(3):  # three finished answers of 3,000 characters nobody has read yet
        sender = outbox.stream(i)
        sender.put_token("x" * 3000)  # the generation would wait after the third; it ends instead
        sender.event(Done(i, "stop", Usage(1, 1), None, None))
    assert outbox.full and outbox.queued_bytes == unsent_chars(outbox) > 8192
    fourth = outbox.stream(4)
    progressed = trio.Event()

    async def producer() -> None:
        await fourth.wait_for_room()  # what a new request does before its start
        progressed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not progressed.is_set()
        assert fourth.put_token("y")  # over the connection's bound: the caller must wait
        while outbox.full:
            await next_text(outbox)
        await trio.testing.wait_all_tasks_blocked()
        assert progressed.is_set()
    await drain(outbox)
    assert outbox.queued_bytes == 0 == unsent_chars(outbox)


async def test_the_byte_count_follows_every_kind_of_frame() -> None:
    outbox = Outbox()
    a = outbox.stream("a")
    a.event(Started("a", "m"))
    await token(a, "abc")
    a.queued(3)
    await outbox.send_control(Pong(7))
    await token(a, "de")
    assert outbox.queued_bytes == unsent_chars(outbox)
    while len(outbox):
        await next_frame(outbox)
        assert outbox.queued_bytes == unsent_chars(outbox)
    assert outbox.queued_bytes == 0


# --- deltas written by their generation task (issue 19) ------------------------------------------


class FakeConnection:
    """A connection that writes at once (as wsframing.ServerConnection on a free socket), recording each write."""

    def __init__(self) -> None:
        self.free = True
        self.writes: list[list[str]] = []

    def can_write_now(self) -> bool:
        return self.free

    def write_now(self, messages: list[str]) -> None:
        assert self.free, "written while the socket was busy"
        self.writes.append(list(messages))


def direct_outbox() -> tuple[Outbox, FakeConnection, list[str]]:
    """An outbox using a FakeConnection; the list records each writer start it asks for."""
    started: list[str] = []

    def start_writer() -> bool:
        started.append("writer")
        return True

    outbox = Outbox(start_writer=start_writer)
    connection = FakeConnection()
    outbox.use_connection(connection)
    return outbox, connection, started


def decoded(write: list[str]) -> list[tuple[str, str | None]]:
    return [(event["type"], event.get("content")) for event in map(json.loads, write)]


async def test_a_delta_waits_for_its_task_and_goes_out_in_one_write_without_the_writer() -> None:
    outbox, connection, started = direct_outbox()
    a = outbox.stream("a")
    a.event(Started("a", "m"))  # not a delta: the writer is asked for, as before
    assert started == ["writer"]
    outbox.writer_running = False  # as if it had not run yet
    started.clear()
    assert not a.put_token("x")  # one engine read's delta (a paced engine: one per read)
    assert started == []  # no writer for a delta
    assert connection.writes == []  # nothing written before the task flushes
    flush_deferred()
    assert [decoded(write) for write in connection.writes] == [[("start", None), ("token", "x")]]
    assert len(outbox) == 0 and outbox.queued_bytes == 0
    assert started == []
    flush_deferred()  # nothing left: no empty write
    assert len(connection.writes) == 1
    a.put_token("y")  # the next read's
    flush_deferred()
    assert [decoded(write) for write in connection.writes][1:] == [[("token", "y")]]


async def test_deltas_that_arrive_together_are_left_to_the_writer_to_join() -> None:
    """Several deltas in one read: the engine is ahead of the reader, and the writer, which runs
    later, joins more of them per frame (fewer frames for a client to read)."""
    outbox, connection, started = direct_outbox()
    a = outbox.stream("a")
    for content in ("x", "y", "z"):
        assert not a.put_token(content)
    assert started == []
    flush_deferred()
    assert connection.writes == []
    assert started == ["writer"]
    a.put_token("w")  # before the writer ran: joins the same frame
    assert await drain(outbox) == [{"type": "token", "id": "a", "content": "xyzw", "deltas": 4}]


async def test_a_busy_connection_gets_its_deltas_from_the_writer_in_order() -> None:
    outbox, connection, started = direct_outbox()
    a = outbox.stream("a")
    connection.free = False  # e.g. the writer is in the middle of a frame the kernel did not take whole
    a.put_token("x")
    a.put_token("y")
    flush_deferred()
    assert connection.writes == []
    assert started == ["writer"]  # woken instead
    assert await drain(outbox) == [{"type": "token", "id": "a", "content": "xy", "deltas": 2}]


async def test_a_closing_connection_takes_deltas_through_the_writer() -> None:
    outbox, connection, _ = direct_outbox()
    a = outbox.stream("a")
    a.put_token("x")
    outbox.close(1001, "bye")
    flush_deferred()
    assert connection.writes == []  # the close frame is the writer's to send, after what came before
    frames = await drain(outbox)
    assert frames == [{"type": "token", "id": "a", "content": "x"}, CloseFrame(1001, "bye")]


async def test_a_generation_over_its_bound_writes_its_deltas_before_it_waits() -> None:
    outbox, connection, started = direct_outbox()
    a = StreamSender(outbox, "a", stream_buffer_bytes=4)
    assert a.put_token("abcdef")  # over the bound: the gateway waits in drained()
    with trio.fail_after(1):  # no writer was started: drained() itself must send what it waits for
        await a.drained()
    assert [decoded(write) for write in connection.writes] == [[("token", "abcdef")]]
    assert started == []


async def test_a_relay_sample_rides_on_its_delta_to_the_write() -> None:
    seen: list[float] = []
    outbox = Outbox()
    a = outbox.stream("a")
    sample = RelaySample(0.0, seen.append)
    arm_relay_sample(sample)
    a.put_token("x")
    arm_relay_sample(RelaySample(0.0, seen.append))  # a later read of the same slot: the oldest is kept
    a.put_token("y")
    arm_relay_sample(None)
    assert take_relay_sample() is None  # not popped yet
    frame = outbox.pop()
    assert json.loads(frame)["content"] == "xy"  # type: ignore[arg-type]
    assert take_relay_sample() is sample
    assert take_relay_sample() is None
    sample.written()
    assert len(seen) == 1 and seen[0] > 0


async def test_an_armed_sample_no_delta_took_is_forgotten() -> None:
    outbox = Outbox()
    a = outbox.stream("a")
    arm_relay_sample(RelaySample(0.0, lambda seconds: None))
    arm_relay_sample(None)  # what ChatStream does before its next read
    a.put_token("x")
    outbox.pop()
    assert take_relay_sample() is None
