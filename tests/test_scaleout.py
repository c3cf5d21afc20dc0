"""Two trioai processes behind a real Nginx, sharing a real redis-server: a client keeps its answer
when the instance streaming it is killed with SIGKILL (issue 18).

The client is trioai's own library with ``resume=True``: it reconnects through Nginx, which sends it
to the surviving instance; that instance follows the shared log, finds the owner's lease run out,
takes the generation over and continues the answer on the engine from the logged text. The fake
engine's numbered words continue from a partial answer as a greedy engine would, so the answer the
client ends with can be compared word for word with the uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from trioai.client import connect
from trioai.fake_upstream import FakeUpstream, Script, numbered_script

from .helpers import chat
from .redisserver import RedisCluster, RedisServer
from .scaleout import TrioaiProcess, owner_of_the_running_generation, start_nginx_in_front, trioai_processes
from .test_nginx import nginx_binary  # noqa: F401 - the fixture

TOKENS = 60


def slow_numbered(body: dict[str, Any]) -> Script:
    return Script(tokens=numbered_script(body).tokens, delay=0.05, finish_reason="length")


def numbered(start: int, stop: int) -> str:
    return "".join(f"w{i} " for i in range(start, stop))


#: The shared state both ways it is deployed: one redis-server, or a three-primary Redis Cluster.
STORES = pytest.mark.parametrize("store", ["redis-server", "cluster"])


@asynccontextmanager
async def behind_nginx(nursery: trio.Nursery, tmp_path: Path, nginx: str, engine: FakeUpstream, store: str,
                       *options: str) -> AsyncIterator[tuple[list[TrioaiProcess], str]]:
    """``engine`` serving, the ``store`` (a redis-server or a Redis Cluster), two ``trioai serve``
    processes in front of the engine sharing it (with ``options``), and a real Nginx in front of
    them: the processes and Nginx's URL."""
    await nursery.start(engine.serve)
    redis: RedisServer | RedisCluster = (RedisServer(nursery, tmp_path) if store == "redis-server"
                                         else RedisCluster(nursery, tmp_path))
    await redis.start()
    async with trioai_processes(tmp_path, 2, "--upstream", engine.base_url, "--redis", redis.url,
                                *options) as instances:
        yield instances, await start_nginx_in_front(nursery, nginx, tmp_path, [i.port for i in instances])


@STORES
async def test_an_answer_survives_the_kill_of_its_instance_behind_nginx(
    nursery: trio.Nursery, tmp_path: Path, nginx_binary: str, store: str  # noqa: F811
) -> None:
    engine = FakeUpstream(slow_numbered)
    async with behind_nginx(nursery, tmp_path, nginx_binary, engine, store, "--lease-seconds", "1",
                            "--ping-interval", "1") as (instances, url):
        received: list[str] = []
        killed: TrioaiProcess | None = None
        async with connect(url, resume=True, resume_timeout=30) as conn, conn.generate(
                [{"role": "user", "content": "count"}], max_tokens=TOKENS) as stream:
            async for text in stream:
                received.append(text)
                if killed is None and len("".join(received).split()) >= 8:
                    killed = await owner_of_the_running_generation(instances)
                    killed.kill()
            assert stream.finish_reason == "length"
    assert "".join(received) == numbered(0, TOKENS)  # the whole answer, every word exactly once
    assert stream.resumes >= 1
    assert killed is not None and killed.process.returncode == -9
    # The survivor continued the answer from the logged text: one more engine request, not a new answer.
    assert len(engine.requests) == 2
    follow_up = engine.requests[1].body
    assert follow_up["continue_final_message"] is True
    assert numbered(0, TOKENS).startswith(follow_up["messages"][-1]["content"])


@STORES
async def test_capacity_holds_across_two_instances_behind_nginx(
    nursery: trio.Nursery, tmp_path: Path, nginx_binary: str, store: str  # noqa: F811
) -> None:
    """max_concurrency 4 across two processes: 20 clients at once through Nginx never put more than 4
    requests on the engine, every one completes, and the positions they are told are the cluster's."""
    engine = FakeUpstream(lambda body: Script(tokens=("x ",) * 4, delay=0.05, finish_reason="length"))
    async with behind_nginx(nursery, tmp_path, nginx_binary, engine, store, "--lease-seconds", "2",
                            "--max-concurrency", "4") as (instances, url):
        positions: list[list[int]] = []
        texts: list[str] = []

        async def client() -> None:
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps(chat("x", max_tokens=4, id=1)))
                seen: list[int] = []
                text = ""
                while True:
                    event = json.loads(await ws.get_message())
                    if event["type"] == "queued":
                        seen.append(event["position"])
                    elif event["type"] == "token":
                        text += event["content"]
                    elif event["type"] in ("done", "error"):
                        break
                texts.append(text)
                positions.append(seen)

        async with trio.open_nursery() as clients:
            for _ in range(20):
                clients.start_soon(client)
        connections = [await i.metric("trioai_connections_total") for i in instances]
    assert texts == ["x x x x "] * 20
    assert engine.peak_active <= 4 and len(engine.requests) == 20
    assert sum(connections) == 20 and min(connections) > 0  # Nginx spread the clients over both
    for seen in positions:
        assert seen == sorted(seen, reverse=True)  # a position never goes up
    firsts = sorted(seen[0] for seen in positions if seen)
    assert len(firsts) == len(set(firsts)) and firsts and max(firsts) <= 16  # one line across both instances
