"""Two trioai processes behind a real Nginx, sharing a real redis-server: a client keeps its answer
when the instance streaming it is killed with SIGKILL (issue 18).

The client is trioai's own library with ``resume=True``: it reconnects through Nginx, which sends it
to the surviving instance; that instance follows the shared log, finds the owner's lease run out,
takes the generation over and continues the answer on the engine from the logged text. The fake
engine's numbered words continue from a partial answer as a greedy engine would, so the answer the
client ends with can be compared word for word with the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from trioai.client import connect
from trioai.fake_upstream import FakeUpstream, Script, numbered_script

from .redisserver import RedisServer
from .scaleout import TrioaiProcess, owner_of_the_running_generation, start_nginx_in_front, trioai_processes
from .test_nginx import nginx_binary  # noqa: F401 - the fixture

TOKENS = 60


def slow_numbered(body: dict[str, Any]) -> Script:
    return Script(tokens=numbered_script(body).tokens, delay=0.05, finish_reason="length")


def numbered(start: int, stop: int) -> str:
    return "".join(f"w{i} " for i in range(start, stop))


async def test_an_answer_survives_the_kill_of_its_instance_behind_nginx(
    nursery: trio.Nursery, tmp_path: Path, nginx_binary: str  # noqa: F811
) -> None:
    engine = FakeUpstream(slow_numbered)
    await nursery.start(engine.serve)
    redis = RedisServer(nursery, tmp_path)
    await redis.start()
    options = ("--upstream", engine.base_url, "--redis", redis.url, "--lease-seconds", "1", "--ping-interval", "1")
    async with trioai_processes(tmp_path, 2, *options) as instances:
        url = await start_nginx_in_front(nursery, nginx_binary, tmp_path, [i.port for i in instances])
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
