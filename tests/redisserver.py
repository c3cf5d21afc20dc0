"""A real redis-server for tests: Debian's, on a free port of 127.0.0.1, in a temporary directory,
persisting nothing. Missing, it fails the test (scripts/test installs it); it never skips."""

from __future__ import annotations

import shutil
import socket
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio


def redis_binary() -> str:
    """The redis-server executable, or fail the test saying how to get it."""
    path = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if path is None:
        pytest.fail("redis-server is not installed: run scripts/test, which installs Debian's redis-server "
                    "(or `apt-get install redis-server`)")
    return path


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def log_tail(log: Path) -> str:
    """The last 2,000 characters of ``log`` (none if it was not written)."""
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


async def start_listening(nursery: trio.Nursery, command: list[str], port: int, log: Path) -> trio.Process:
    """Run ``command`` in ``nursery`` and wait until it accepts connections on ``port`` of 127.0.0.1
    (10 s at most); if it exits first, fail the test with the end of its ``log``."""
    process: trio.Process = await nursery.start(partial(trio.run_process, command, check=False,
                                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    with trio.fail_after(10):
        while True:
            if process.returncode is not None:
                pytest.fail(f"{command[0]} exited with {process.returncode}:\n{log_tail(log)}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return process


class RedisServer:
    """One redis-server process that a test can stop and start again on the same port."""

    def __init__(self, nursery: trio.Nursery, directory: Path) -> None:
        self.nursery = nursery
        self.directory = directory
        self.binary = redis_binary()
        self.port = free_port()
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        """Its ``redis://`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """Its ``unix://`` URL (it listens on a Unix socket in its directory too)."""
        return f"unix://{self.directory / 'redis.sock'}"

    async def start(self) -> None:
        """Start it and wait until it accepts connections (10 s at most)."""
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
                   "--unixsocket", str(self.directory / "redis.sock")]
        self.process = await start_listening(self.nursery, command, self.port, self.directory / "redis.log")

    async def stop(self) -> None:
        """Kill it (as a crash would) and wait until it is gone."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            with trio.fail_after(10):
                await process.wait()


class RedisSentinel:
    """A Redis Sentinel (Debian's redis-server in sentinel mode) on a free port, monitoring ``server``
    as the primary of the service ``service``."""

    def __init__(self, nursery: trio.Nursery, directory: Path, server: RedisServer, service: str = "trioai") -> None:
        self.nursery = nursery
        self.directory = directory
        self.server = server
        self.service = service
        self.port = free_port()
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL trioai takes: the sentinel, then the service and database."""
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    async def start(self) -> None:
        """Start it and wait until it names the primary (10 s at most)."""
        config = self.directory / "sentinel.conf"  # sentinel rewrites its config: its own file
        config.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                          f"logfile {self.directory / 'sentinel.log'}\n"
                          f"sentinel monitor {self.service} 127.0.0.1 {self.server.port} 1\n")
        command = [self.server.binary, str(config), "--sentinel"]
        self.process = await start_listening(self.nursery, command, self.port, self.directory / "sentinel.log")
