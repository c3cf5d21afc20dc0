"""``trioai serve --workers N``: real worker processes on one port, supervised; and the pure parts."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from trioai.config import ConfigError, Settings
from trioai.enginespec import EngineSpec
from trioai.fake_upstream import FakeUpstream, Script
from trioai.workers import (
    RESTART_BACKOFF_MAX,
    STABLE_AFTER,
    RestartBackoff,
    Supervisor,
    WorkerJob,
    check_ports,
    divide_capacity,
    encode_job,
    read_job,
    share,
    worker_command,
    worker_env,
    worker_http_port,
    worker_job,
)

from .helpers import chat, collect_until_terminal, recv, send


class Output:
    """A child's stderr, read by a task as it comes, so that the pipe never fills; searched by pattern."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = trio.lowlevel.ParkingLot()
        self.ended = False

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            async for data in stream:
                self.text += data.decode("utf-8", "replace")
                self._changed.unpark_all()
        self.ended = True
        self._changed.unpark_all()

    async def wait_for(self, pattern: str, timeout: float = 30, after: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the output (from position ``after``), once there is one."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while not (match := regex.search(self.text, after)):
                if self.ended:
                    raise AssertionError(f"the process ended before printing {pattern}:\n{self.text}")
                await self._changed.park()
        return match


@dataclasses.dataclass
class Gateway:
    process: trio.Process
    output: Output
    url: str

    def worker_pids(self) -> set[int]:
        """Every worker the supervisor reported listening, so far."""
        return {int(pid) for pid in re.findall(r"worker \d \(pid (\d+)\) listening", self.output.text)}

    async def served_by(self, ws: WebSocketConnection) -> int:
        """The pid of the worker that logged this connection's opening (by the client's port)."""
        port = ws.local.port  # type: ignore[union-attr]
        match = await self.output.wait_for(rf"pid (\d+)\]: connection conn=\d+ open peer=127\.0\.0\.1:{port}\b")
        return int(match.group(1))

    async def wait(self) -> int:
        with trio.fail_after(30):
            await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def gateway(upstream: FakeUpstream, *options: str, env: dict[str, str] | None = None,
                  workers: int = 2) -> AsyncIterator[Gateway]:
    """``trioai serve --workers N`` on port 0 in front of ``upstream``; killed at the end if still running."""
    command = [sys.executable, "-m", "trioai", "serve", "--workers", str(workers), "--port", "0",
               "--upstream", upstream.base_url, *options]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(
            trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        ))
        assert process.stderr is not None
        output = Output()
        nursery.start_soon(output.pump, process.stderr)
        try:
            url = (await output.wait_for(rf"{workers} workers listening on (ws://\S+)")).group(1)
            yield Gateway(process, output, url)
        finally:
            if process.returncode is None:
                process.kill()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def wait_gone(pids: set[int]) -> None:
    with trio.fail_after(40):
        while any(alive(pid) for pid in pids):
            await trio.sleep(0.05)


async def connections_on(gw: Gateway, stack: AsyncExitStack, pids: set[int], each: int,
                         tries: int = 200) -> dict[int, list[WebSocketConnection]]:
    """Open connections (kept open in ``stack``) until every worker in ``pids`` holds ``each`` of them."""
    held: dict[int, list[WebSocketConnection]] = {pid: [] for pid in pids}
    for _ in range(tries):
        if all(len(conns) >= each for conns in held.values()):
            return held
        ws = await stack.enter_async_context(open_websocket_url(gw.url))
        pid = await gw.served_by(ws)
        assert pid in gw.worker_pids()
        held.setdefault(pid, []).append(ws)
    raise AssertionError(f"after {tries} connections: {({pid: len(c) for pid, c in held.items()})}")


async def open_connections(http_url: str) -> int:
    """``trioai_connections_open`` of the worker whose health and metrics port is ``http_url``."""
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(http_url + "/metrics")).text
    match = re.search(r"^trioai_connections_open (\S+)$", text, re.MULTILINE)
    assert match is not None
    return int(float(match.group(1)))


async def test_both_workers_take_connections_and_one_killed_costs_only_its_own(slow_upstream: FakeUpstream) -> None:
    async with gateway(slow_upstream, "--http-port", "0") as gw, AsyncExitStack() as stack:
        first = gw.worker_pids()
        assert len(first) == 2
        # Port 0: both workers listen on the one port the supervisor picked.
        listening = re.findall(r"\[worker \d pid \d+\]: listening on (ws://\S+)", gw.output.text)
        assert listening == [gw.url, gw.url]
        http = dict(re.findall(r"\(pid (\d+)\) listening on \S+, health and metrics on (http://\S+)", gw.output.text))
        assert len(set(http.values())) == 2  # a port each
        held = await connections_on(gw, stack, first, each=2)
        for pid, conns in held.items():  # each worker's own /metrics counts the connections it was seen taking
            assert await open_connections(http[str(pid)]) == len(conns)
        victim, survivor = sorted(first)
        # Two streams, not one per connection: the port's hash may hand one worker more than its
        # share of connections (8 of --max-concurrency 16 each), and a ninth would wait in the queue.
        streaming = held[survivor][:2]
        for i, ws in enumerate(streaming):
            await send(ws, chat("x", max_tokens=60, id=f"s{i}"))  # 60 tokens at 20 ms: ~1.2 s
            assert (await recv(ws))["type"] == "start"
            assert (await recv(ws))["type"] == "token"
        os.kill(victim, signal.SIGKILL)
        for ws in held[victim]:
            with pytest.raises(ConnectionClosed):
                await recv(ws, timeout=30)
        for i, ws in enumerate(streaming):
            events = (await collect_until_terminal(ws, {f"s{i}"}))[f"s{i}"]
            assert events[-1]["type"] == "done"
            assert events[-1]["usage"]["completion_tokens"] == 60
        # The supervisor restarts the killed worker, and the new one takes connections.
        restarted = await gw.output.wait_for(rf"worker (\d) \(pid {victim}\) exited with -9; restarting in 0\.5 s")
        new = int((await gw.output.wait_for(rf"worker {restarted.group(1)} \(pid (\d+)\) listening",
                                            after=restarted.end())).group(1))
        assert new not in first
        await connections_on(gw, stack, {new}, each=1)
        await stack.aclose()
        gw.process.send_signal(signal.SIGTERM)
        assert await gw.wait() == 0
    assert "Traceback" not in gw.output.text
    await wait_gone({survivor, new})


async def test_sigterm_drains_every_worker_then_exits_0(slow_upstream: FakeUpstream, tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifications:
        await notifications.bind(path)
        async with gateway(slow_upstream, env={"NOTIFY_SOCKET": path}) as gw, AsyncExitStack() as stack:
            with trio.fail_after(10):
                ready = (await notifications.recv(4096)).decode()
            # Once, from the supervisor, after both workers listen.
            assert ready.splitlines() == ["READY=1", f"STATUS=serving {gw.url} with 2 workers"]
            assert len(re.findall(r"\]: listening on ", gw.output.text)) == 2
            pids = gw.worker_pids()
            held = await connections_on(gw, stack, pids, each=1)
            streams = [conns[0] for conns in held.values()]
            for ws in streams:
                await send(ws, chat("x", max_tokens=50, id="a"))  # ~1 s
                assert (await recv(ws))["type"] == "start"
                assert (await recv(ws))["type"] == "token"
            gw.process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                stopping = (await notifications.recv(4096)).decode()
            assert stopping.splitlines() == ["STOPPING=1", "STATUS=draining"]
            for ws in streams:
                events = (await collect_until_terminal(ws, {"a"}))["a"]
                assert events[-1]["type"] == "done"
                assert events[-1]["usage"]["completion_tokens"] == 50
                with pytest.raises(ConnectionClosed) as closed:
                    await recv(ws)
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
            assert await gw.wait() == 0
            for pid in pids:
                assert re.search(rf"pid {pid}\]: draining: \d+ connection", gw.output.text)
        assert "Traceback" not in gw.output.text
        await wait_gone(pids)


async def test_only_the_supervisor_talks_to_systemd(slow_upstream: FakeUpstream, tmp_path: Path) -> None:
    """READY, STOPPING and the watchdog's pings all come from the supervisor (by the sender's credentials)."""
    path = str(tmp_path / "notify")
    senders: dict[str, set[int]] = {}
    changed = trio.lowlevel.ParkingLot()

    async def receive(sock: trio.socket.SocketType) -> None:
        while True:
            data, ancillary, _, _ = await sock.recvmsg(4096, socket.CMSG_SPACE(12))
            (pid, _, _), *_ = (struct.unpack("iII", d) for level, kind, d in ancillary
                               if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            senders.setdefault(data.decode().splitlines()[0], set()).add(pid)
            changed.unpark_all()

    async def seen(state: str) -> None:
        with trio.fail_after(30):
            while state not in senders:
                await changed.park()

    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifications:
        notifications.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        await notifications.bind(path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, notifications)  # from the start: the socket's queue is short
            env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}  # a ping every second, the first at once
            async with gateway(slow_upstream, env=env) as gw:
                await seen("READY=1")
                await seen("WATCHDOG=1")
                gw.process.send_signal(signal.SIGTERM)
                await seen("STOPPING=1")
                assert await gw.wait() == 0
            nursery.cancel_scope.cancel()
    assert set(senders) >= {"READY=1", "WATCHDOG=1", "STOPPING=1"}
    assert set().union(*senders.values()) == {gw.process.pid}


async def test_under_the_watchdog_a_stuck_worker_is_killed_and_restarted(slow_upstream: FakeUpstream) -> None:
    """A worker whose loop stops (here: SIGSTOP) stops saying it is alive; after WATCHDOG_USEC it is replaced."""
    env = {"WATCHDOG_USEC": "1000000"}  # no NOTIFY_SOCKET: the supervisor's pings go nowhere, the workers' count
    async with gateway(slow_upstream, env=env) as gw:
        stuck, other = sorted(gw.worker_pids())
        os.kill(stuck, signal.SIGSTOP)
        killed = await gw.output.wait_for(rf"worker (\d) \(pid {stuck}\) sent nothing for 1\.0 s: killing it")
        await gw.output.wait_for(rf"worker {killed.group(1)} \(pid {stuck}\) exited with -9; restarting")
        new = int((await gw.output.wait_for(rf"worker {killed.group(1)} \(pid (\d+)\) listening",
                                            after=killed.end())).group(1))
        assert not alive(stuck)
        assert f"pid {other}) sent nothing" not in gw.output.text  # the one that kept running stays
        gw.process.send_signal(signal.SIGTERM)
        assert await gw.wait() == 0
    await wait_gone({other, new})


async def test_a_worker_told_to_drain_still_drains_on_its_own_sigterm(slow_upstream: FakeUpstream) -> None:
    """systemd may signal every process of the service (KillMode=control-group): one SIGTERM, one drain."""
    async with gateway(slow_upstream) as gw, AsyncExitStack() as stack:
        ws = await stack.enter_async_context(open_websocket_url(gw.url))
        pid = await gw.served_by(ws)
        await send(ws, chat("x", max_tokens=50, id="a"))  # ~1 s
        assert (await recv(ws))["type"] == "start"
        gw.process.send_signal(signal.SIGTERM)
        await gw.output.wait_for(rf"pid {pid}\]: told to drain")
        os.kill(pid, signal.SIGTERM)
        await gw.output.wait_for(rf"pid {pid}\]: received SIGTERM: draining")
        events = (await collect_until_terminal(ws, {"a"}))["a"]
        assert events[-1]["type"] == "done"
        assert events[-1]["usage"]["completion_tokens"] == 50
        assert await gw.wait() == 0
        assert "stopping now" not in gw.output.text


async def test_a_second_signal_stops_the_workers_at_once(slow_upstream: FakeUpstream) -> None:
    async with gateway(slow_upstream) as gw, AsyncExitStack() as stack:
        pids = gw.worker_pids()
        held = await connections_on(gw, stack, pids, each=1)
        for ws in (conns[0] for conns in held.values()):
            await send(ws, chat("x", max_tokens=5000, id="long"))  # ~100 s: far past any test
            assert (await recv(ws))["type"] == "start"
        gw.process.send_signal(signal.SIGTERM)
        for pid in pids:
            await gw.output.wait_for(rf"pid {pid}\]: draining: \d+ connection")
        gw.process.send_signal(signal.SIGINT)
        assert await gw.wait() == 0
        assert "stopping the workers now" in gw.output.text
        for request in slow_upstream.requests:  # the engine's streams were closed with the workers
            with trio.fail_after(5):
                await request.closed.wait()
    await wait_gone(pids)


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(slow_upstream: FakeUpstream) -> None:
    async with gateway(slow_upstream) as gw, AsyncExitStack() as stack:
        pids = gw.worker_pids()
        ws = await stack.enter_async_context(open_websocket_url(gw.url))
        await send(ws, chat("x", max_tokens=30, id="a"))
        assert (await recv(ws))["type"] == "start"
        gw.process.kill()
        assert await gw.wait() == -signal.SIGKILL
        # The worker serving it notices the closed pipe, drains: the answer still completes.
        events = (await collect_until_terminal(ws, {"a"}))["a"]
        assert events[-1]["type"] == "done"
        await gw.output.wait_for(r"the supervisor is gone: draining")
        await wait_gone(pids)


async def test_json_logs_name_the_worker(upstream: FakeUpstream) -> None:
    async with gateway(upstream, "--log-format", "json") as gw:
        gw.process.send_signal(signal.SIGTERM)
        assert await gw.wait() == 0
    entries = [json.loads(line) for line in gw.output.text.splitlines()]
    listening = {(e["worker"], e["pid"]) for e in entries if e["message"].startswith("listening on ws://")}
    assert {worker for worker, _ in listening} == {1, 2}
    assert {pid for _, pid in listening} == gw.worker_pids()
    assert all("worker" not in e for e in entries if e["logger"] == "trioai.workers" and "started" in e["message"])


async def test_a_worker_that_cannot_start_fails_the_start(upstream: FakeUpstream, tmp_path: Path) -> None:
    missing = tmp_path / "missing-keys"
    command = [sys.executable, "-m", "trioai", "serve", "--workers", "2", "--port", "0",
               "--upstream", upstream.base_url, "--api-keys-file", str(missing)]
    with trio.fail_after(60):
        result = await trio.run_process(command, check=False, capture_stderr=True, stdin=subprocess.DEVNULL)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert re.search(r"cannot start: worker \d exited with 1 before it listened", stderr)
    assert "Traceback" not in stderr
    pids = {int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", stderr)}
    assert len(pids) == 2
    await wait_gone(pids)


@pytest.mark.parametrize("reuseport", [False, True])
async def test_a_port_another_program_listens_on_is_not_shared(upstream: FakeUpstream, reuseport: bool) -> None:
    """Even one listening with SO_REUSEPORT itself: the workers would silently share its connections."""
    with socket.socket() as other:
        if reuseport:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        command = [sys.executable, "-m", "trioai", "serve", "--workers", "2", "--port", str(other.getsockname()[1]),
                   "--upstream", upstream.base_url]
        with trio.fail_after(60):
            result = await trio.run_process(command, check=False, capture_stderr=True, stdin=subprocess.DEVNULL)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert "cannot start: [Errno 98] Address already in use" in stderr
    assert "worker 1 started" not in stderr


async def test_socket_activation_shares_the_inherited_socket(slow_upstream: FakeUpstream) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    fd = listener.fileno()
    script = f'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@" 3<&{fd} {fd}<&-'
    # --port 1 would fail to bind: serving at all proves the inherited socket was used.
    command = ["bash", "-c", script, sys.executable, "-m", "trioai", "serve", "--workers", "2", "--port", "1",
               "--upstream", slow_upstream.base_url]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(partial(
            trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(fd,)
        ))
        listener.close()
        assert process.stderr is not None
        output = Output()
        nursery.start_soon(output.pump, process.stderr)
        url = (await output.wait_for(r"2 workers listening on (ws://\S+)")).group(1)
        assert url == f"ws://127.0.0.1:{port}/ws/chat"
        for _ in range(4):
            async with open_websocket_url(url) as ws:
                await send(ws, chat("x", max_tokens=3))
                events = next(iter((await collect_until_terminal(ws)).values()))
            assert events[-1]["type"] == "done"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            await process.wait()
    assert process.returncode == 0
    assert len(re.findall(rf"\]: listening on ws://127\.0\.0\.1:{port}/", output.text)) == 2


async def test_the_embedded_engine_starts_once_in_the_supervisor(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No engine configured: the supervisor starts one engine and the workers relay to it."""
    engines: list[FakeUpstream] = []

    async def fake_engine(engine_nursery: trio.Nursery, settings: Settings) -> Settings:
        engine = FakeUpstream()
        await engine_nursery.start(engine.serve)
        engines.append(engine)
        return dataclasses.replace(settings, upstream=engine.base_url, max_concurrency=1)

    monkeypatch.setattr("trioai.workers.start_local_engine", fake_engine)
    supervisor = Supervisor(Settings(host="127.0.0.1", port=0, workers=2))
    done = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Supervisor]) -> None:
        try:
            await supervisor.run(task_status=task_status)
        finally:
            done.set()

    with trio.fail_after(60):
        assert await nursery.start(run) is supervisor  # once every worker listens
        assert len(engines) == 1
        url = f"ws://127.0.0.1:{supervisor.port}/ws/chat"
        assert {slot.url for slot in supervisor.slots} == {url}
        for _ in range(4):
            async with open_websocket_url(url) as ws:
                await send(ws, chat("red green", max_tokens=4))
                events = next(iter((await collect_until_terminal(ws)).values()))
            assert events[-1]["type"] == "done"
        assert len(engines[0].requests) == 4
        await supervisor.drain()
        await done.wait()


def children_of(pid: int) -> dict[int, str]:
    """``pid``'s child processes and their command lines (from ``/proc``)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    children[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError):
                continue
    return children


@pytest.mark.engine
async def test_two_workers_share_one_real_embedded_engine(nursery: trio.Nursery) -> None:
    """No engine configured: one llama.cpp, started by the supervisor; both workers answer through it."""
    command = [sys.executable, "-m", "trioai", "serve", "--workers", "2", "--port", "0", "--local-threads", "1"]
    process: trio.Process = await nursery.start(partial(
        trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    ))
    assert process.stderr is not None
    output = Output()
    nursery.start_soon(output.pump, process.stderr)
    try:
        url = (await output.wait_for(r"2 workers listening on (ws://\S+)", timeout=300)).group(1)
        children = children_of(process.pid)
        commands = list(children.values())
        assert sum("llama_cpp.server" in c for c in commands) == 1
        assert sum("trioai.workers" in c for c in commands) == 2
        gw = Gateway(process, output, url)
        async with AsyncExitStack() as stack:
            held = await connections_on(gw, stack, gw.worker_pids(), each=1)
            for conns in held.values():
                await send(conns[0], chat("Once upon a time", max_tokens=4))
                events = next(iter((await collect_until_terminal(conns[0])).values()))
                assert events[-1]["type"] == "done"
        process.send_signal(signal.SIGTERM)
        assert await gw.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
    assert "Traceback" not in output.text
    await wait_gone(set(children))  # the engine too


async def test_the_workers_bench_measures_every_process(nursery: trio.Nursery) -> None:
    """bench.workers: one gateway per worker count, its CPU summed over the supervisor and the workers."""
    from bench.workers import measure

    engine = FakeUpstream(lambda body: Script(tokens=tuple(f"w{i} " for i in range(body["max_tokens"])),
                                              finish_reason="length"))
    await nursery.start(engine.serve)
    with trio.fail_after(120):
        samples = await measure(engine.base_url, 2, [1, 4], max_tokens=20, duration=0.0)
    assert [(s.workers, s.connections, s.exact) for s in samples] == [(2, 1, True), (2, 4, True)]
    assert all(s.tokens_per_s > 0 for s in samples)  # measure() checked it found the 3 processes


# -- pure parts ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("total", "workers", "each"), [(16, 2, 8), (5, 2, 3), (1, 4, 1), (7, 1, 7), (9, 4, 3)])
def test_share_rounds_up_and_is_at_least_one(total: int, workers: int, each: int) -> None:
    assert share(total, workers) == each


def test_capacity_is_divided_without_redis_only() -> None:
    engines = (EngineSpec("http://a:8000/v1", "a", max_concurrency=5), EngineSpec("http://b:8000/v1", "b"))
    settings = Settings(max_concurrency=16, engines=engines, upstream="http://c:8000/v1")
    divided = divide_capacity(settings, 2)
    assert divided.max_concurrency == 8
    assert [e.max_concurrency for e in divided.engines] == [3, None]
    # The default, filled in for --upstream URLs and tables without their own, is the divided one.
    assert [e.max_concurrency for e in divided.engine_specs()] == [8, 3, 8]
    assert divide_capacity(settings, 1) is settings
    shared = dataclasses.replace(settings, redis="redis://127.0.0.1:6379")
    assert divide_capacity(shared, 2) is shared


def test_each_worker_has_its_own_http_port() -> None:
    settings = Settings(http_port=8081, workers=3)
    assert [worker_http_port(settings, i) for i in (1, 2, 3)] == [8081, 8082, 8083]
    assert worker_http_port(Settings(http_port=0, workers=3), 2) == 0
    assert worker_http_port(Settings(workers=3), 2) is None
    check_ports(settings, 8080)
    check_ports(settings, 8084)
    with pytest.raises(ConfigError, match=r"HTTP ports 8081\.\.8083 include the WebSocket port 8082"):
        check_ports(settings, 8082)
    with pytest.raises(ConfigError, match="past 65535"):
        check_ports(Settings(http_port=65535, workers=2), 8080)


def test_a_job_travels_through_a_pipe() -> None:
    settings = Settings(port=0, workers=4, http_port=9000, upstream="http://a:8000/v1",
                        engines=(EngineSpec("http://b:8000/v1", "b", models=("m",)),))
    job = worker_job(settings, 3, 41000, (3, 4))
    assert job.settings.port == 41000
    assert job.settings.workers == 1
    assert job.settings.http_port == 9002
    assert job.listen_fds == (3, 4)
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, encode_job(job) + b"drain\n")
        received = read_job(read_fd)
        assert os.read(read_fd, 100) == b"drain\n"  # the commands after the job stay in the pipe
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert received == job
    assert isinstance(received, WorkerJob)


def test_workers_run_this_package_without_systemd_variables() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "LISTEN_FDS": "1",
           "LISTEN_PID": "1", "LISTEN_FDNAMES": "x", "TRIOAI_PORT": "1", "PYTHONPATH": "/elsewhere"}
    assert worker_command() == [sys.executable, "-m", "trioai.workers"]
    worker = worker_env(env)
    assert set(worker) == {"TRIOAI_PORT", "PYTHONPATH"}
    import trioai

    root = str(Path(trioai.__file__).resolve().parent.parent)
    assert worker["PYTHONPATH"] == os.pathsep.join([root, "/elsewhere"])


def test_restart_backoff_doubles_and_resets_after_a_stable_run() -> None:
    backoff = RestartBackoff()
    delays = [backoff.next(uptime=0.1) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert max(delays) == RESTART_BACKOFF_MAX
    assert backoff.next(uptime=STABLE_AFTER) == 0.5
    assert backoff.next(uptime=1.0) == 1.0
