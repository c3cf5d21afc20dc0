"""Server WebSocket pings: answered pings keep a connection, a silent peer is dropped."""

from __future__ import annotations

import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request

from trioai.server import RunningServer

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, send


async def test_a_client_that_answers_pings_stays_connected(start_gateway: StartGateway) -> None:
    server = await start_gateway(ping_interval=0.05, ping_timeout=0.5)
    async with open_websocket_url(server.url) as ws:
        await trio.sleep(0.6)  # a dozen pings, each answered by trio-websocket's reader
        assert server.server.open_connections == 1
        await send(ws, chat("still here", max_tokens=2))
        events = next(iter((await collect_until_terminal(ws)).values()))
        assert events[-1]["type"] == "done"


async def raw_handshake(server: RunningServer) -> tuple[trio.SocketStream, WSConnection]:
    stream = await trio.open_tcp_stream(server.host, server.port)
    conn = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(conn.send(Request(host=f"{server.host}:{server.port}", target="/ws/chat")))
    while True:
        conn.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, AcceptConnection) for e in conn.events()):
            return stream, conn


async def test_a_peer_that_never_answers_is_dropped(start_gateway: StartGateway) -> None:
    server = await start_gateway(ping_interval=0.05, ping_timeout=0.2, close_timeout=0.2)
    stream, conn = await raw_handshake(server)
    async with stream:
        pings = 0
        closed = False
        with trio.fail_after(5):
            while not closed:
                data = await stream.receive_some(65536)
                if not data:
                    break
                conn.receive_data(data)
                for event in conn.events():  # read, but never answer
                    pings += isinstance(event, Ping)
                    closed = closed or isinstance(event, CloseConnection)
        assert pings >= 1
    with trio.fail_after(5):
        while server.server.open_connections:
            await trio.sleep(0.01)


async def test_pings_can_be_turned_off(start_gateway: StartGateway) -> None:
    server = await start_gateway(ping_interval=0)
    stream, _ = await raw_handshake(server)
    async with stream:
        with trio.move_on_after(0.3):
            data = await stream.receive_some(65536)
            raise AssertionError(f"the server sent something unasked: {data!r}")
        assert server.server.open_connections == 1
