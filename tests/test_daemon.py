"""``trioai serve`` as systemd runs it: a real process, sd_notify, socket activation, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from trioai.fake_upstream import FakeUpstream

from .helpers import chat, collect_until_terminal, recv, send
from .test_cli import read_until


@pytest.fixture
async def notify_socket(tmp_path: Path) -> AsyncIterator[tuple[str, trio.socket.SocketType]]:
    path = str(tmp_path / "notify")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        yield path, sock


async def next_notification(sock: trio.socket.SocketType) -> str:
    with trio.fail_after(30):
        return (await sock.recv(4096)).decode()


async def test_sigterm_lets_a_running_stream_finish(
    nursery: trio.Nursery, slow_upstream: FakeUpstream, notify_socket: tuple[str, trio.socket.SocketType]
) -> None:
    path, notifications = notify_socket
    command = [sys.executable, "-m", "trioai", "serve", "--port", "0", "--upstream", slow_upstream.base_url]
    env = {**os.environ, "NOTIFY_SOCKET": path}
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    )
    assert process.stderr is not None
    seen = bytearray()
    url = (await read_until(process.stderr, r"listening on (ws://\S+)", seen)).group(1)
    ready = await next_notification(notifications)
    assert ready.splitlines() == ["READY=1", f"STATUS=serving {url}"]
    async with open_websocket_url(url) as ws:
        await send(ws, chat("x", max_tokens=50, id="a"))  # 50 tokens at 20 ms: ~1 s
        assert (await recv(ws))["type"] == "start"
        assert (await recv(ws))["type"] == "token"
        process.send_signal(signal.SIGTERM)
        assert (await next_notification(notifications)).splitlines() == ["STOPPING=1", "STATUS=draining"]
        events = (await collect_until_terminal(ws, {"a"}))["a"]
        assert events[-1]["type"] == "done"
        assert events[-1]["usage"]["completion_tokens"] == 50
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.reason is not None and closed.value.reason.code == 1001
    with trio.fail_after(10):
        await process.wait()
    assert process.returncode == 0
    await read_until(process.stderr, r"draining: 1 connection", seen)
    assert b"Traceback" not in seen


async def test_second_signal_stops_at_once(nursery: trio.Nursery, slow_upstream: FakeUpstream) -> None:
    command = [sys.executable, "-m", "trioai", "serve", "--port", "0", "--upstream", slow_upstream.base_url]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
    assert process.stderr is not None
    seen = bytearray()
    url = (await read_until(process.stderr, r"listening on (ws://\S+)", seen)).group(1)
    async with open_websocket_url(url) as ws:
        await send(ws, chat("x", max_tokens=5000, id="long"))  # ~100 s: far past any test
        assert (await recv(ws))["type"] == "start"
        process.send_signal(signal.SIGTERM)
        await read_until(process.stderr, r"draining", seen)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == 0
    await read_until(process.stderr, r"stopping now", seen)
    assert b"Traceback" not in seen
    # The engine's stream was closed with the process.
    with trio.fail_after(5):
        await slow_upstream.requests[-1].closed.wait()


async def test_socket_activation_serves_the_inherited_socket(
    nursery: trio.Nursery, slow_upstream: FakeUpstream
) -> None:
    """As systemd does it: a listening socket as fd 3, LISTEN_FDS=1, LISTEN_PID = the server's pid."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # bash sets LISTEN_PID to its own pid, which exec keeps, and moves the socket to fd 3.
    script = f'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@" 3<&{fd} {fd}<&-'
    # --port 1 would fail to bind: serving at all proves the inherited socket was used.
    command = ["bash", "-c", script, sys.executable, "-m", "trioai", "serve", "--port", "1",
               "--upstream", slow_upstream.base_url]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(fd,))
    )
    listener.close()  # the server holds its own copy now
    assert process.stderr is not None
    seen = bytearray()
    url = (await read_until(process.stderr, r"listening on (ws://\S+)", seen)).group(1)
    assert url == f"ws://127.0.0.1:{port}/ws/chat"
    async with open_websocket_url(url) as ws:
        await send(ws, chat("x", max_tokens=3))
        events = next(iter((await collect_until_terminal(ws)).values()))
    assert events[-1]["type"] == "done"
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        await process.wait()
    assert process.returncode == 0
