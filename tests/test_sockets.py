"""read_socket, write_socket and ClientStream on real sockets: socket pairs and TCP over 127.0.0.1."""

from __future__ import annotations

import array
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from trioai.sockets import ClientStream, read_socket, write_socket

MiB = 1024 * 1024


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected (client, server) pair of TCP streams over 127.0.0.1, closed afterwards."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0]:
        client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        server = await listeners[0].accept()
        async with client, server:
            yield client, server


class Yields(trio.abc.Instrument):
    """Counts the times the task that created it ends a step, i.e. yields to the scheduler."""

    def __init__(self) -> None:
        self.task = trio.lowlevel.current_task()
        self.count = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


@contextmanager
def counting_yields() -> Iterator[Yields]:
    """The current task's yields to the scheduler inside the block."""
    yields = Yields()
    trio.lowlevel.add_instrument(yields)
    try:
        yield yields
    finally:
        trio.lowlevel.remove_instrument(yields)


async def test_read_socket_returns_at_most_max_bytes_then_eof() -> None:
    """Reads return the peer's bytes in order, never more than ``max_bytes``, and b"" once it closed."""
    a, b = trio.socket.socketpair()
    with a, b:
        await b.send(b"hello world")
        assert await read_socket(a, 5) == b"hello"
        assert await read_socket(a) == b" world"
        b.close()
        with trio.fail_after(5):
            assert await read_socket(a) == b""


async def test_write_socket_writes_a_payload_far_larger_than_the_buffer() -> None:
    """8 MiB written against a concurrent reader arrive complete and in order."""
    payload = random.Random(0).randbytes(8 * MiB)
    a, b = trio.socket.socketpair()
    with a, b:
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < len(payload) // 4
        received = bytearray()

        async def reader() -> None:
            while len(received) < len(payload):
                chunk = await read_socket(b)
                assert chunk, f"EOF after {len(received)} bytes"
                received.extend(chunk)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await write_socket(a, payload)
    assert received == payload


async def test_write_socket_in_a_cancelled_scope_raises_and_writes_nothing() -> None:
    """An already-cancelled write raises trio.Cancelled before any byte reaches the kernel."""
    a, b = trio.socket.socketpair()
    with a, b:
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await write_socket(a, b"x" * 1000)
        received = b""
        with trio.move_on_after(0.2):
            received = await b.recv(4096)
        assert received == b""


@pytest.mark.parametrize("op", [lambda s: read_socket(s), lambda s: write_socket(s, b"x")], ids=["read", "write"])
async def test_a_socket_closed_before_the_call_is_a_closed_resource_error(
    op: Callable[[trio.socket.SocketType], Awaitable[object]],
) -> None:
    """Reading from or writing to a socket closed with .close() raises trio.ClosedResourceError."""
    a, b = trio.socket.socketpair()
    with b:
        a.close()
        with pytest.raises(trio.ClosedResourceError):
            await op(a)


async def test_closing_a_socket_under_a_waiting_read_is_a_closed_resource_error() -> None:
    """A read waiting for data wakes with trio.ClosedResourceError when another task closes the socket."""
    a, b = trio.socket.socketpair()
    raised: list[BaseException] = []

    async def reader() -> None:
        with pytest.raises(trio.ClosedResourceError) as info:
            await read_socket(a)
        raised.append(info.value)

    with b, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not raised
            a.close()
    assert len(raised) == 1


@pytest.mark.parametrize("op", ["read", "write"])
async def test_a_connection_reset_by_the_peer_is_a_broken_resource_error(op: str) -> None:
    """After the peer aborts with an RST, reading or writing raises trio.BrokenResourceError."""
    async with tcp_pair() as (client, server):
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.socket.close()

        async def use() -> None:
            if op == "read":
                await read_socket(client.socket)
                return
            while True:  # the first write may still be accepted before the reset is seen
                await write_socket(client.socket, b"x" * 1024)
                await trio.sleep(0.01)

        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await use()


async def test_client_stream_round_trip_and_default_receive_size() -> None:
    """send_all reaches the peer; receive_some(n) and receive_some(None) return what the peer sent."""
    async with tcp_pair() as (client, server):
        stream = ClientStream(server)
        with trio.fail_after(5):
            await stream.send_all(b"ping")
            assert await client.receive_some(100) == b"ping"
            await client.send_all(b"pong")
            assert await stream.receive_some(2) == b"po"
            assert await stream.receive_some(None) == b"ng"
            await client.send_all(b"again")
            assert await stream.receive_some() == b"again"


async def test_client_stream_refuses_a_second_concurrent_send() -> None:
    """While one send_all is blocked on a full buffer, another raises trio.BusyResourceError.

    The peer drains some bytes first, so the second write would succeed: the refusal is the stream's,
    not trio's (which refuses a second task waiting on the same fd anyway).
    """
    async with tcp_pair() as (client, server):
        stream = ClientStream(server)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, b"x" * (64 * MiB))
                await trio.testing.wait_all_tasks_blocked()
                assert len(os.read(client.socket.fileno(), 4 * MiB)) > 0  # no yield: the sender stays blocked
                with pytest.raises(trio.BusyResourceError):
                    await stream.send_all(b"y")
                nursery.cancel_scope.cancel()
            await stream.send_all(b"z")  # the cancelled send released the stream


async def test_client_stream_send_eof_and_aclose() -> None:
    """send_eof makes the peer read b"" after the data; aclose closes the socket for good."""
    async with tcp_pair() as (client, server):
        stream = ClientStream(server)
        with trio.fail_after(5):
            await stream.send_all(b"bye")
            await stream.send_eof()
            assert await client.receive_some(100) == b"bye"
            assert await client.receive_some(100) == b""
            await stream.aclose()
        assert stream.socket.fileno() == -1
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()


async def test_write_socket_does_not_yield_when_the_kernel_takes_everything() -> None:
    """A small write_socket returns without letting another task run; SocketStream.send_all yields.

    Trio shuffles the tasks it runs in one batch, so another task running is no reliable sign that
    send_all yielded: the instrument counts the yields themselves.
    """
    a, b = trio.socket.socketpair()
    with a, b:
        ran: list[str] = []

        async def mark() -> None:
            ran.append("ran")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mark)
            with counting_yields() as yields:
                await write_socket(a, b"ping")
            assert ran == []
            assert yields.count == 0
        assert ran == ["ran"]
        with counting_yields() as yields:
            await trio.SocketStream(a).send_all(b"pong")
        assert yields.count >= 1
        assert await b.recv(100) == b"pingpong"


async def test_misuse_is_reported_as_misuse_not_as_a_broken_connection() -> None:
    """max_bytes < 1 is a ValueError; sending after send_eof, or send_eof during a send, is refused
    as SocketStream refuses it; an empty write to a closed socket is still an error."""
    a, b = trio.socket.socketpair()
    with a, b, pytest.raises(ValueError, match="max_bytes"):
        await read_socket(a, 0)
    with pytest.raises(trio.ClosedResourceError):
        await write_socket(a, b"")
    async with tcp_pair() as (client, _server):
        stream = ClientStream(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"x" * (64 * MiB))  # nobody reads: it blocks
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await stream.send_eof()
            nursery.cancel_scope.cancel()
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"late")


async def test_write_socket_counts_bytes_not_items() -> None:
    """A memoryview of 4-byte items is written whole, byte for byte."""
    numbers = array.array("i", range(300_000))  # larger than the socket buffer: partial writes happen
    a, b = trio.socket.socketpair()
    received = bytearray()
    with a, b:
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                while len(received) < len(numbers) * numbers.itemsize:
                    received.extend(await read_socket(b))

            nursery.start_soon(reader)
            await write_socket(a, memoryview(numbers))
    assert bytes(received) == numbers.tobytes()
