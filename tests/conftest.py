"""Fixtures: a fake OpenAI-compatible engine and a trioai server in front of it, both on 127.0.0.1, and a
redis-server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trioai.config import Settings
from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import RunningServer, serve

from .redisserver import RedisServer


@pytest.fixture
async def redis_server(nursery: trio.Nursery, tmp_path: Path) -> RedisServer:
    """A redis-server of its own for the test (Debian's, on a free port), killed when the test ends."""
    server = RedisServer(nursery, tmp_path)
    await server.start()
    return server


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    """A fake engine with the default echo script, serving until the test ends."""
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    return fake


def slow(body: dict[str, Any]) -> Script:
    """``t0 t1 …``, ``max_tokens`` of them, one every 20 ms: an answer still running when a test acts."""
    return Script(tokens=tuple(f"t{i} " for i in range(body["max_tokens"])), delay=0.02, finish_reason="length")


@pytest.fixture
async def slow_upstream(nursery: trio.Nursery) -> FakeUpstream:
    """A fake engine answering with :func:`slow`."""
    engine = FakeUpstream(slow)
    await nursery.start(engine.serve)
    return engine


StartGateway = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def start_gateway(nursery: trio.Nursery, upstream: FakeUpstream) -> StartGateway:
    """Start a trioai server on port 0 in front of the fake engine; keyword args override settings."""

    async def start(**overrides: Any) -> RunningServer:
        values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "upstream": upstream.base_url}
        values.update(overrides)
        running: RunningServer = await nursery.start(serve, Settings(**values))
        return running

    return start


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> RunningServer:
    """A trioai server with default settings in front of the fake engine."""
    return await start_gateway()
