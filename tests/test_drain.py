"""Graceful drain, in process: running generations finish, new ones are refused, sockets close 1001."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketRequest, open_websocket_url

from trioai.config import Settings
from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import RunningServer, serve

from .helpers import chat, collect_until_terminal, count_tasks, recv, send, settle


def slow(body: dict[str, Any]) -> Script:
    return Script(tokens=tuple(f"t{i} " for i in range(body["max_tokens"])), delay=0.02, finish_reason="length")


async def start(
    nursery: trio.Nursery, drain_timeout: float = 30.0
) -> tuple[FakeUpstream, RunningServer, trio.Event, trio.Event]:
    """A slow fake engine and a server with a drain event; the last event is set when serve returns."""
    engine = FakeUpstream(slow)
    await nursery.start(engine.serve)
    drain, returned = trio.Event(), trio.Event()
    settings = Settings(host="127.0.0.1", port=0, upstream=engine.base_url, drain_timeout=drain_timeout)

    async def run(task_status: trio.TaskStatus[RunningServer]) -> None:
        await serve(settings, drain=drain, task_status=task_status)
        returned.set()

    running: RunningServer = await nursery.start(run)
    return engine, running, drain, returned


async def draining(server: RunningServer) -> None:
    with trio.fail_after(5):
        while not server.server.draining:
            await trio.sleep(0.001)


async def test_running_generation_finishes_then_socket_closes_1001(nursery: trio.Nursery) -> None:
    _, server, drain, returned = await start(nursery)
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=30, id="a"))
        assert (await recv(ws))["type"] == "start"
        assert (await recv(ws))["type"] == "token"
        drain.set()
        await draining(server)
        # A new request on the draining connection is refused, by its id.
        await send(ws, chat("x", max_tokens=3, id="late"))
        events = await collect_until_terminal(ws, {"a", "late"})
        assert events["late"] == [{"type": "error", "id": "late", "code": "shutting_down",
                                   "message": "the server is shutting down; reconnect and retry"}]
        tokens = [e for e in events["a"] if e["type"] == "token"]
        assert "".join(e["content"] for e in tokens).count(" ") == 29  # the first token was read above
        assert events["a"][-1]["type"] == "done"
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason is not None and closed.value.reason.code == 1001
    with trio.fail_after(5):
        await returned.wait()


async def test_idle_connection_is_closed_at_once_and_new_ones_refused(nursery: trio.Nursery) -> None:
    _, server, drain, returned = await start(nursery)
    async with open_websocket_url(server.url) as ws:
        drain.set()
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason is not None and closed.value.reason.code == 1001
    with trio.fail_after(5):
        await returned.wait()
    with pytest.raises(HandshakeError):  # connection refused: the listener is closed
        async with open_websocket_url(server.url):
            pass


async def test_generations_past_the_drain_timeout_end_with_shutting_down(nursery: trio.Nursery) -> None:
    engine, server, drain, returned = await start(nursery, drain_timeout=0.3)
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=5000, id="long"))
        await send(ws, chat("x", max_tokens=3, id="short"))
        seen = 0
        while seen < 2:
            seen += (await recv(ws))["type"] == "start"
        drain.set()
        events = await collect_until_terminal(ws, {"long", "short"})
        assert events["short"][-1]["type"] == "done"
        assert events["long"][-1]["type"] == "error"
        assert events["long"][-1]["code"] == "shutting_down"
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason is not None and closed.value.reason.code == 1001
    with trio.fail_after(5):
        await returned.wait()
    # The engine saw the long request's stream closed: nothing keeps generating.
    long_request = next(r for r in engine.requests if r.body["max_tokens"] == 5000)
    with trio.fail_after(5):
        await long_request.closed.wait()
    assert long_request.disconnected_at is not None


async def test_drain_leaves_no_tasks(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    baseline = count_tasks()
    drain = trio.Event()
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[RunningServer]) -> None:
        await serve(Settings(host="127.0.0.1", port=0, upstream=upstream.base_url), drain=drain,
                    task_status=task_status)
        done.set()

    server: RunningServer = await nursery.start(run)
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("a b", max_tokens=3))
        await collect_until_terminal(ws)
        drain.set()
        with pytest.raises(ConnectionClosed):
            await recv(ws)
    with trio.fail_after(5):
        await done.wait()
    await settle()
    assert count_tasks() == baseline


async def test_drain_ends_when_the_last_session_ends_even_if_one_opened_meanwhile(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handshake being accepted when the drain starts becomes a session (told to drain at once);
    the drain still ends as soon as no session is left, not at the drain timeout."""
    engine, server, drain, returned = await start(nursery, drain_timeout=30.0)
    entered, gate, late_closed = trio.Event(), trio.Event(), trio.Event()
    late_codes: list[int | None] = []
    accept = WebSocketRequest.accept

    async def gated_accept(self: WebSocketRequest, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await accept(self, **kwargs)

    async def late_client() -> None:
        async with open_websocket_url(server.url) as late:
            with pytest.raises(ConnectionClosed) as closed:
                await recv(late)
            late_codes.append(closed.value.reason.code if closed.value.reason else None)
        late_closed.set()

    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=100, id="a"))  # ~2 s of tokens: the session outlives the rest
        assert (await recv(ws))["type"] == "start"
        monkeypatch.setattr(WebSocketRequest, "accept", gated_accept)
        nursery.start_soon(late_client)
        with trio.fail_after(5):
            await entered.wait()  # the late handshake passed every check and is being accepted
        drain.set()
        await draining(server)
        gate.set()
        with trio.fail_after(5):
            await late_closed.wait()
        assert late_codes == [1001]
        assert engine.active == 1  # "a" still generating: its session outlived the late one
        events = await collect_until_terminal(ws, {"a"})
        assert events["a"][-1]["type"] == "done"
        with pytest.raises(ConnectionClosed):
            await recv(ws)
    with trio.fail_after(5):  # well before the 30 s drain timeout
        await returned.wait()


@pytest.mark.parametrize("drain_timeout", [0.0, 30.0])
async def test_serve_returns_promptly_with_no_connections(nursery: trio.Nursery, drain_timeout: float) -> None:
    _, _, drain, returned = await start(nursery, drain_timeout=drain_timeout)
    drain.set()
    with trio.fail_after(2):
        await returned.wait()


async def test_serve_partial_signature_accepts_listeners(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    """``serve`` serves given listeners instead of binding (what socket activation uses)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    settings = Settings(host="127.0.0.1", port=1, upstream=upstream.base_url)  # port 1 would fail to bind
    server: RunningServer = await nursery.start(partial(serve, settings, listeners=listeners))
    assert server.port == port
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("hi", max_tokens=2))
        events = await collect_until_terminal(ws)
    assert next(iter(events.values()))[-1]["type"] == "done"
