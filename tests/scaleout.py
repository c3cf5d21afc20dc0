"""Real parts for scale-out tests: trioai instances as processes (a test can ``kill -9`` one), and a real
Nginx spreading connections over them (tests/test_scaleout.py, tests/test_vllm.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from .redisserver import free_port
from .test_nginx import SHIPPED, run_nginx


@dataclass
class TrioaiProcess:
    """``trioai serve`` as a child process, with its WebSocket and HTTP ports."""

    process: trio.Process
    port: int
    http_port: int
    log: Path

    async def metric(self, name: str) -> float:
        """The value of an unlabelled metric of its ``/metrics``."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            text = (await client.get(f"http://127.0.0.1:{self.http_port}/metrics")).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, its Redis leases left to run out."""
        self.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def trioai_processes(directory: Path, count: int, *options: str) -> AsyncIterator[list[TrioaiProcess]]:
    """``count`` instances of ``trioai serve`` with ``options``, each on free ports, ready to serve;
    every one of them killed and reaped on exit."""
    instances: list[TrioaiProcess] = []
    try:
        for index in range(count):
            port, http_port = free_port(), free_port()
            log = directory / f"trioai-{index}.log"
            with log.open("wb") as out:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "trioai", "serve", "--port", str(port), "--http-port", str(http_port),
                     *options], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            instances.append(TrioaiProcess(process, port, http_port, log))
        for instance in instances:
            await wait_listening(instance)
        yield instances
    finally:
        with trio.CancelScope(shield=True):
            for instance in instances:
                if instance.process.returncode is None:
                    instance.process.kill()
                await instance.process.wait()


async def wait_listening(instance: TrioaiProcess, seconds: float = 30.0) -> None:
    """Until the instance answers ``/healthz`` (or fail with its log)."""
    with trio.move_on_after(seconds):
        while instance.process.returncode is None:
            try:
                async with httpx.AsyncClient(timeout=1.0) as client:
                    if (await client.get(f"http://127.0.0.1:{instance.http_port}/healthz")).status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.05)
    raise AssertionError(f"trioai did not start: {instance.log.read_text(errors='replace')[-3000:]}")


def pair_site(ports: Sequence[int], listen_port: int) -> str:
    """The shipped Nginx site with one ``server`` line per instance, on loopback, without TLS."""
    text = SHIPPED.read_text()
    text = re.sub(r"^\s*listen .*;\n", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*ssl_.*;\n", "", text, flags=re.MULTILINE)
    text = text.replace("server_name chat.example.com;", f"listen 127.0.0.1:{listen_port};")
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in ports)
    return text.replace("    server 127.0.0.1:8080;\n", servers)


async def start_nginx_in_front(nursery: trio.Nursery, binary: str, directory: Path, ports: Sequence[int]) -> str:
    """A real Nginx in front of the instances on ``ports``; returns its ``ws://…/ws/chat`` URL."""
    listen = free_port()
    await run_nginx(nursery, binary, directory, pair_site(ports, listen), listen)
    return f"ws://127.0.0.1:{listen}/ws/chat"


async def owner_of_the_running_generation(instances: Sequence[TrioaiProcess], seconds: float = 10.0) -> TrioaiProcess:
    """The one instance whose ``trioai_streams_running`` is 1."""
    with trio.fail_after(seconds):
        while True:
            running = [i for i in instances if await i.metric("trioai_streams_running") >= 1]
            if len(running) == 1:
                return running[0]
            await trio.sleep(0.02)
