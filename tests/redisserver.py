"""A real redis-server for tests: Debian's, on a free port of 127.0.0.1, in a temporary directory,
persisting nothing. Missing, it fails the test (scripts/test installs it); it never skips."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import trio

from .processes import start_listening


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


async def redis_cli(binary: str, port: int, *args: str) -> str:
    """``redis-cli`` (beside ``binary``, redis-server) against 127.0.0.1:``port``: the answer's text."""
    cli = str(Path(binary).with_name("redis-cli"))
    return (await trio.run_process([cli, "-p", str(port), *args], capture_stdout=True)).stdout.decode().strip()


class RedisServer:
    """One redis-server process that a test can stop and start again on the same port."""

    def __init__(self, nursery: trio.Nursery, directory: Path, *, replica_of: RedisServer | None = None) -> None:
        self.nursery = nursery
        self.directory = directory
        self.binary = redis_binary()
        self.port = free_port()
        self.replica_of = replica_of  # a replica of that server's (``--replicaof``)
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
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        self.process = await start_listening(self.nursery, command, self.port, self.directory / "redis.log")

    async def cli(self, *args: str) -> str:
        """``redis-cli`` against it: the answer's text."""
        return await redis_cli(self.binary, self.port, *args)

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

    def __init__(self, nursery: trio.Nursery, directory: Path, server: RedisServer, service: str = "trioai",
                 *, down_after_ms: int = 30000) -> None:
        self.nursery = nursery
        self.directory = directory
        self.server = server
        self.service = service
        self.down_after_ms = down_after_ms  # how long the primary may not answer before a failover
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
                          f"sentinel monitor {self.service} 127.0.0.1 {self.server.port} 1\n"
                          f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                          f"sentinel failover-timeout {self.service} {max(1000, 2 * self.down_after_ms)}\n")
        command = [self.server.binary, str(config), "--sentinel"]
        self.process = await start_listening(self.nursery, command, self.port, self.directory / "sentinel.log")

    async def cli(self, *args: str) -> str:
        """``redis-cli`` against it: the answer's text."""
        return await redis_cli(self.server.binary, self.port, *args)


class RedisCluster:
    """A Redis Cluster of ``size`` primaries with ``replicas`` replicas each (Debian's redis-server in
    cluster mode, each node on a free port in its own directory), its slots assigned by ``redis-cli
    --cluster create``; a primary not heard from for ``node_timeout_ms`` is failed over."""

    def __init__(self, nursery: trio.Nursery, directory: Path, size: int = 3, *, replicas: int = 0,
                 node_timeout_ms: int = 15000) -> None:
        self.nursery = nursery
        self.directory = directory
        self.binary = redis_binary()
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = [free_port() for _ in range(size * (1 + replicas))]
        self.bus_ports = [free_port() for _ in self.ports]  # the nodes' gossip (else port + 10000)
        self.processes: list[trio.Process] = []

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL trioai takes: its first node (coredis asks it for the rest)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    async def start(self) -> None:
        """Start every node, form the cluster, and wait until each node says it is ``ok`` (20 s at most)."""
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            home = self.directory / f"cluster-{port}"
            home.mkdir()
            command = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                       "--cluster-node-timeout", str(self.node_timeout_ms), "--repl-diskless-sync-delay", "0",
                       "--cluster-config-file", str(home / "nodes.conf"),
                       "--dir", str(home), "--logfile", str(home / "redis.log")]
            self.processes.append(await start_listening(self.nursery, command, port, home / "redis.log"))
        cli = str(Path(self.binary).with_name("redis-cli"))
        with trio.fail_after(20):
            created = await trio.run_process(
                [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_stdout=True, capture_stderr=True, check=False)
            if created.returncode != 0:
                pytest.fail(f"redis-cli --cluster create failed:\n{(created.stdout + created.stderr).decode()[-2000:]}")
            for port in self.ports:
                while "cluster_state:ok" not in await self._cli(port, "cluster", "info"):
                    await trio.sleep(0.05)
                # A replica that has not synced once is never promoted: wait for its link.
                while "role:slave" in (info := await self._cli(port, "info", "replication")) and (
                        "master_link_status:up" not in info):
                    await trio.sleep(0.05)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (a host lost)."""
        self.processes[self.ports.index(port)].kill()

    async def key_counts(self) -> list[int]:
        """How many keys each node holds (``DBSIZE``), in the order of :attr:`ports`."""
        return [int(await self._cli(port, "dbsize")) for port in self.ports]

    async def _cli(self, port: int, *args: str) -> str:
        return await redis_cli(self.binary, port, *args)

    async def slot_owner(self, key: str, seen_by: int | None = None) -> int:
        """The port of the primary that the node on ``seen_by`` (the first node) says holds ``key``'s
        hash slot."""
        node = seen_by or self.ports[0]
        slot = int(await self._cli(node, "cluster", "keyslot", key))
        owner = await self._slot_owner_seen_by(node, slot)
        assert owner is not None, f"no node holds slot {slot}"
        return owner

    async def give_slot(self, key: str, port: int) -> None:
        """Move ``key``'s (empty) hash slot to the primary on ``port`` as a resharding does, and wait
        until every node agrees (10 s at most)."""
        slot = await self._cli(self.ports[0], "cluster", "keyslot", key)
        source = await self._slot_owner_seen_by(self.ports[0], int(slot))
        assert source is not None, f"no node holds slot {slot}"
        source_id, target_id = await self._cli(source, "cluster", "myid"), await self._cli(port, "cluster", "myid")
        await self._cli(port, "cluster", "setslot", slot, "importing", source_id)
        await self._cli(source, "cluster", "setslot", slot, "migrating", target_id)
        for node in (port, source, *(p for p in self.ports if p not in (port, source))):
            await self._cli(node, "cluster", "setslot", slot, "node", target_id)
        with trio.fail_after(10):
            while any([await self._slot_owner_seen_by(node, int(slot)) != port for node in self.ports]):
                await trio.sleep(0.05)

    async def _slot_owner_seen_by(self, node: int, slot: int) -> int | None:
        """The port of the primary that the node on ``node`` says holds ``slot`` (``CLUSTER NODES``)."""
        for line in (await self._cli(node, "cluster", "nodes")).splitlines():
            fields = line.split()
            for span in fields[8:]:
                first, _, last = span.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    return int(fields[1].split("@")[0].rpartition(":")[2])
        return None
