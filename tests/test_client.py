"""trioai.client against a real server: text, usage, several streams at once, cancel, errors, keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import trioai.client
from trioai.client import ConnectFailed, ConnectionLost, GenerationError
from trioai.fake_upstream import FakeUpstream, Script

from .conftest import StartGateway
from .helpers import echo_tokens


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_generate_text_and_usage(start_gateway: StartGateway) -> None:
    server = await start_gateway()
    async with (
        trioai.client.connect(server.url) as conn,
        conn.generate(user("red green blue"), max_tokens=7, temperature=0.2) as stream,
    ):
        pieces = [piece async for piece in stream]
    assert "".join(pieces) == "".join(echo_tokens("red green blue", 7))
    assert stream.finish_reason == "length"
    assert stream.usage is not None and stream.usage["completion_tokens"] == 7
    assert stream.ttft_ms is not None and stream.model == "fake-model"
    assert not stream.cancelled


async def test_several_streams_at_once_on_one_connection(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(
        tokens=tuple(f"{body['messages'][-1]['content']}{i} " for i in range(body["max_tokens"])), delay=0.002
    )
    server = await start_gateway()
    results: dict[str, str] = {}
    async with trioai.client.connect(server.url) as conn:

        async def ask(name: str) -> None:
            async with conn.generate(user(name), max_tokens=50) as stream:
                results[name] = await stream.text()

        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c"):
                nursery.start_soon(ask, name)
    assert results == {name: "".join(f"{name}{i} " for i in range(50)) for name in "abc"}


async def test_cancel_ends_the_stream_and_the_engine_request(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 5000, delay=0.002)
    server = await start_gateway()
    async with trioai.client.connect(server.url) as conn:
        async with conn.generate(user("go"), max_tokens=5000) as stream:
            received = 0
            async for piece in stream:
                received += piece.count(" ")
                if received >= 5:
                    await stream.cancel()
        assert stream.cancelled
        assert received < 5000
        # Leaving the block early also cancels on the server.
        async with conn.generate(user("go"), max_tokens=5000) as early:
            async for _ in early:
                break
        assert early.cancelled
    for record in upstream.requests:
        with trio.fail_after(5):
            await record.closed.wait()
        assert record.disconnected_at is not None


async def test_error_events_raise_generation_error(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(status=400, error_message="prompt too long", error_param="messages")
    server = await start_gateway()
    async with trioai.client.connect(server.url) as conn:
        with pytest.raises(GenerationError) as caught:
            async with conn.generate(user("x")) as stream:
                await stream.text()
        assert caught.value.code == "invalid_request"
        assert "prompt too long" in caught.value.message
        with pytest.raises(GenerationError) as caught:
            async with conn.generate(user("x"), max_tokens=0) as stream:
                await stream.text()
        assert (caught.value.code, caught.value.param) == ("invalid_request", "max_tokens")


async def test_queue_position_is_visible(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 30, delay=0.01)
    server = await start_gateway(max_concurrency=1)
    positions: list[int | None] = []
    async with trioai.client.connect(server.url) as conn, conn.generate(user("first"), max_tokens=30) as first:
        async for _ in first:
            break  # running now
        async with conn.generate(user("second"), max_tokens=30) as second:
            with trio.fail_after(5):
                while second.queue_position is None:
                    await trio.sleep(0.005)
            positions.append(second.queue_position)
            await first.cancel()
            assert (await second.text()) == "x " * 30
    assert positions == [1]


async def test_api_key(start_gateway: StartGateway, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    server = await start_gateway(api_keys_file=str(keys))
    with pytest.raises(ConnectFailed) as caught:
        async with trioai.client.connect(server.url):
            pass
    assert caught.value.status == 401
    async with (
        trioai.client.connect(server.url, api_key="k1") as conn,
        conn.generate(user("a b"), max_tokens=2) as stream,
    ):
        assert await stream.text() == "a b "


async def test_connection_lost_mid_stream(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 1000, delay=0.01)
    server = await start_gateway()
    async def read_while_closing(stream: trioai.client.Stream, conn: trioai.client.Connection) -> None:
        async for _ in stream:
            await conn.ws.aclose()

    async with (
        trioai.client.connect(server.url) as conn,
        conn.generate(user("x"), max_tokens=1000) as stream,
    ):
        with pytest.raises(ConnectionLost):
            await read_while_closing(stream, conn)
