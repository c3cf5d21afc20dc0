"""Protocol violations on raw sockets, and many connections at once: the server sheds the offender
and goes on serving everyone else, with nothing leaked."""

from __future__ import annotations

import contextlib
import resource
import struct

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from trioai import session as session_module
from trioai.fake_upstream import FakeUpstream, Script, echo_script
from trioai.outbox import Outbox
from trioai.server import RunningServer
from trioai.transport import H11Transport

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, connect, count_tasks, frame, send, settle


async def handshake(server: RunningServer) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(server.host, server.port)
    conn = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(conn.send(Request(host="x", target="/ws/chat")))
    while not any(isinstance(e, AcceptConnection) for e in conn.events()):
        conn.receive_data(await stream.receive_some(65536))
    return stream


async def close_code(stream: trio.SocketStream, timeout: float = 5.0) -> int | None:
    """Read until the server closes; the close code it sent, or None if it just dropped the TCP connection."""
    # The server's frames are parsed by hand: only their opcode and the close code matter here.
    buffer = b""
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            buffer += data
            while len(buffer) >= 2:
                opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
                offset = 2
                if size == 126:
                    size, offset = struct.unpack("!H", buffer[2:4])[0], 4
                elif size == 127:
                    size, offset = struct.unpack("!Q", buffer[2:10])[0], 10
                if len(buffer) < offset + size:
                    break
                payload, buffer = buffer[offset:offset + size], buffer[offset + size:]
                if opcode == 0x8:
                    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005


async def still_serves(server: RunningServer) -> None:
    async with connect(server) as ws:
        await send(ws, chat("alive", max_tokens=2))
        events = next(iter((await collect_until_terminal(ws)).values()))
    assert events[-1]["type"] == "done"


def assert_one_idle_engine_connection(server: RunningServer) -> None:
    """Sequential requests left exactly one engine connection, pooled, none in use."""
    transport = server.gateway.upstream.transport
    assert isinstance(transport, H11Transport)
    assert (transport.connections_open, transport.connections_idle) == (1, 1)


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("invalid UTF-8 in a text frame", frame(0x1, b'{"type":"ping","x":"\xff\xfe"}'), {1007, None}),
        ("unmasked client frame", frame(0x1, b'{"type":"ping"}', mask=False), {1002, None}),
        ("reserved opcode", frame(0x3, b"?"), {1002, None}),
        ("continuation without a start", frame(0x0, b"x"), {1002, None}),
        ("oversized frame", frame(0x1, b"x" * 2_000_000), {1009, None}),
        ("oversized message in fragments",
         frame(0x1, b"x" * 600_000, fin=False) + frame(0x0, b"x" * 600_000), {1009, None}),
        ("fragmented ping", frame(0x9, b"p", fin=False), {1002, None}),
    ],
)
async def test_protocol_violations_close_only_the_offender(
    start_gateway: StartGateway, name: str, data: bytes, expected: set[int | None]
) -> None:
    server = await start_gateway()
    await still_serves(server)  # the pooled engine connection (and the fake engine's task for it) exists
    await settle()
    baseline = count_tasks()
    stream = await handshake(server)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):  # the server may hang up mid-way: also fine
            await stream.send_all(data)
        assert await close_code(stream) in expected, name
    await still_serves(server)
    with trio.fail_after(5):
        while server.server.open_connections:
            await trio.sleep(0.01)
    await settle()
    assert count_tasks() == baseline
    assert_one_idle_engine_connection(server)


async def test_a_frame_that_never_arrives_is_timed_out_by_the_pings(start_gateway: StartGateway) -> None:
    """A header announcing 2^62 bytes, then a trickle: the peer cannot answer pings mid-frame."""
    server = await start_gateway(ping_interval=0.1, ping_timeout=0.3, close_timeout=0.2)
    stream = await handshake(server)
    async with stream:
        await stream.send_all(frame(0x1, b"", length=1 << 62))  # the header alone
        for _ in range(5):
            await trio.sleep(0.1)
            try:
                await stream.send_all(b"x")
            except trio.BrokenResourceError:
                break
        with trio.fail_after(5):
            while server.server.open_connections:
                await trio.sleep(0.01)
    await still_serves(server)


async def test_two_thousand_connections_held_open(start_gateway: StartGateway) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4200 and (hard == resource.RLIM_INFINITY or hard >= 4200):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4200, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 4200, "needs ~4,200 file descriptors (ulimit -n)"
    server = await start_gateway(max_connections=3000)
    await still_serves(server)  # the pooled engine connection (and the fake engine's task for it) exists
    await settle()
    baseline = count_tasks()
    streams: list[trio.SocketStream] = []
    try:
        for _ in range(2000):
            streams.append(await handshake(server))
        with trio.fail_after(10):  # the last accept may reach the client before its session starts
            while server.server.open_connections < 2000:
                await trio.sleep(0.01)
        assert server.server.open_connections == 2000
        await still_serves(server)
        with trio.fail_after(10):  # still_serves' own connection is counted until its nursery has exited
            while server.server.open_connections > 2000:
                await trio.sleep(0.01)
        metrics = server.gateway.metrics.render().decode()
        assert "trioai_connections_open 2000.0" in metrics
    finally:
        for stream in streams:
            await stream.aclose()
    with trio.fail_after(30):
        while server.server.open_connections:
            await trio.sleep(0.05)
    await settle()
    assert count_tasks() == baseline
    assert_one_idle_engine_connection(server)


@pytest.mark.parametrize("where", ["receive loop", "writer task"])
async def test_a_bug_costs_its_connection_not_the_server(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """An exception of ours in the session (its own loop, or a task in the connection's nursery)
    closes that connection with 1011 and leaks nothing; the server goes on serving."""
    server = await start_gateway()
    await still_serves(server)
    await settle()
    baseline = count_tasks()

    def bug(*args: object) -> None:
        raise RuntimeError("a bug")

    if where == "receive loop":
        monkeypatch.setattr(session_module, "parse_client_event", bug)
    else:
        monkeypatch.setattr(Outbox, "pop", bug)
    stream = await handshake(server)
    async with stream:
        await stream.send_all(frame(0x1, b'{"type":"ping"}'))
        assert await close_code(stream) == 1011
    monkeypatch.undo()
    with trio.fail_after(5):
        while server.server.open_connections:
            await trio.sleep(0.01)
    await still_serves(server)
    await settle()
    assert count_tasks() == baseline


async def test_an_engine_event_that_never_ends_is_cut_at_its_size_cap(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    """``data:`` lines without the blank line that ends an event: an error at 1 MiB, not a heap of lines."""
    flood = Script(raw_body=(b"data: x\n" * 8192,) * 256)  # 16 MiB, all one event
    upstream.script = lambda body: flood if body["messages"][0]["content"] == "x" else echo_script(body)
    server = await start_gateway(upstream_retries=0)
    async with connect(server) as ws:
        await send(ws, chat("x", id=1))
        error = (await collect_until_terminal(ws, {1}))[1][-1]
        assert (error["type"], error["code"]) == ("error", "upstream_error")
        assert "larger than 1048576 bytes" in error["message"]
        await send(ws, chat("y z", id=2, max_tokens=2))
        assert (await collect_until_terminal(ws, {2}))[2][-1]["type"] == "done"
