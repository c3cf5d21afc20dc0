"""Streams that outlive their connection: seq, detach, resume, takeover, expiry, memory bounds.

The fake engine answers ``w0 w1 w2 …`` (numbered words), so any loss, duplicate or reordering
shows in the text. Connections are cut by :class:`tests.proxy.CutProxy` at a chosen byte of the
server's answer, with an RST or a FIN, as a network would.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from trioai.config import Settings
from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import RunningServer, serve

from .conftest import StartGateway
from .helpers import (
    TERMINAL,
    chat,
    check_one_generation,
    read_generation,
    read_through_cut,
    recv,
    resume_after,
    send,
    text_of,
)
from .proxy import CutProxy


def numbered(count: int) -> str:
    return "".join(f"w{i} " for i in range(count))


def numbered_script(delay: float = 0.005) -> Any:
    def script(body: dict[str, Any]) -> Script:
        count = body.get("max_tokens") or 16
        return Script(tokens=tuple(f"w{i} " for i in range(count)), delay=delay, finish_reason="length")
    return script


def check_exact(events: list[dict[str, Any]], text: str) -> None:
    """One generation's events, whole (see check_one_generation), and exactly ``text``."""
    check_one_generation(events)
    assert text_of(events) == text


@pytest.fixture
async def proxied(start_gateway: StartGateway, upstream: FakeUpstream, nursery: trio.Nursery) -> tuple[
        RunningServer, CutProxy]:
    upstream.script = numbered_script()
    server = await start_gateway(resume_window=30)
    proxy = CutProxy(server.host, server.port)
    await nursery.start(proxy.serve)
    return server, proxy


async def test_every_event_of_a_generation_carries_seq(gateway: RunningServer, upstream: FakeUpstream) -> None:
    upstream.script = numbered_script(0)
    async with open_websocket_url(gateway.url) as ws:
        await send(ws, chat("x", max_tokens=20, id="a"))
        await send(ws, {"type": "ping", "id": 1})
        events: list[dict[str, Any]] = []
        events.extend(await read_generation(ws, "a"))
    check_exact(events, numbered(20))
    assert events[0]["type"] == "start" and "resume_token" not in events[0]  # not resumable: no token


async def test_a_resumable_start_carries_a_token(start_gateway: StartGateway) -> None:
    server = await start_gateway(resumable_default=True)
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x y", max_tokens=2, id="a"))
        await send(ws, chat("x y", max_tokens=2, id="b", resumable=False))
        start_a, start_b = await recv(ws), await recv(ws)
    tokens = {start_a["id"]: start_a.get("resume_token"), start_b["id"]: start_b.get("resume_token")}
    assert tokens["b"] is None
    token = tokens["a"]
    assert isinstance(token, str) and len(token) >= 32 and token.replace("-", "").replace("_", "").isalnum()


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_a_cut_mid_answer_is_resumed_exactly(proxied: tuple[RunningServer, CutProxy], rst: bool,
                                                   upstream: FakeUpstream) -> None:
    server, proxy = proxied
    proxy.rst = rst
    proxy.cut_after = 1500  # bytes of the server's answer: the handshake and a few dozen tokens
    before = await read_through_cut(proxy.url, chat("x", max_tokens=200, id="g", resumable=True))
    assert before and before[-1]["type"] not in TERMINAL
    after = await resume_after(server.url, "g", before)
    check_exact(before + after, numbered(200))
    assert len(upstream.requests) == 1 and upstream.requests[0].completed  # ran once, to its end


async def test_a_done_lost_on_the_wire_can_still_be_fetched(gateway: RunningServer, upstream: FakeUpstream) -> None:
    upstream.script = numbered_script(0)
    async with open_websocket_url(gateway.url) as ws:
        await send(ws, chat("x", max_tokens=5, id="d", resumable=True))
        events: list[dict[str, Any]] = []
        events.extend(await read_generation(ws, "d"))
    again = await resume_after(gateway.url, "d", events[:-1])  # after the event before done
    assert again == [events[-1]]  # the same done, with the same seq


async def test_a_second_attach_takes_over_and_the_first_hears_of_it(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.script = numbered_script(0.01)
    server = await start_gateway()
    async with open_websocket_url(server.url) as first, open_websocket_url(server.url) as second:
        await send(first, chat("x", max_tokens=100, id="t", resumable=True))
        seen: list[dict[str, Any]] = []
        while len(seen) < 10:
            seen.append(await recv(first, keep_seq=True))
        await send(second, {"type": "resume", "id": "t", "resume_token": seen[0]["resume_token"], "after": 3})
        rest: list[dict[str, Any]] = []
        rest.extend(await read_generation(second, "t"))
        # The first connection's last word on "t" is resumed_elsewhere; nothing of "t" after it.
        tail: list[dict[str, Any]] = []
        tail.extend(await read_generation(first, "t"))
        await send(first, {"type": "ping", "id": 1})
        assert await recv(first) == {"type": "pong", "id": 1}
    assert tail[-1]["type"] == "error" and tail[-1]["code"] == "resumed_elsewhere"
    check_exact(seen[:3] + rest, numbered(100))


async def test_resume_errors_do_not_tell_which_part_was_wrong(start_gateway: StartGateway,
                                                              upstream: FakeUpstream) -> None:
    upstream.script = numbered_script(0.01)
    server = await start_gateway()
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=50, id="s", resumable=True))
        start = await recv(ws, keep_seq=True)
        token = start["resume_token"]
        async with open_websocket_url(server.url) as other:
            answers = []
            for request in ({"id": "s", "resume_token": token[:-1] + ("A" if token[-1] != "A" else "B")},
                            {"id": "nope", "resume_token": token},
                            {"id": "s", "resume_token": "x" * 32}):
                await send(other, {"type": "resume", "after": 0, **request})
                answers.append(await recv(other))
            assert {(a["code"], a["message"]) for a in answers} == {(answers[0]["code"], answers[0]["message"])}
            assert answers[0]["code"] == "resume_not_found"
            await send(other, {"type": "resume", "id": "s", "resume_token": token, "after": 10_000})
            beyond = await recv(other)
            assert (beyond["code"], beyond["param"]) == ("invalid_request", "after")


async def test_a_detached_generation_is_abandoned_after_the_window(
    start_gateway: StartGateway, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.script = numbered_script(0.05)
    server = await start_gateway(resume_window=0.5)
    caplog.set_level(logging.INFO, logger="trioai")
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=1000, id="w", resumable=True))
        start = await recv(ws, keep_seq=True)
    with trio.fail_after(10):
        await upstream.requests[0].closed.wait()  # the engine request is closed: the GPU is free
    assert not upstream.requests[0].completed
    assert any("outcome=abandoned" in r.getMessage() for r in caplog.records)
    assert start["resume_token"] not in caplog.text  # never logged
    async with open_websocket_url(server.url) as ws:  # and it cannot be resumed any more
        await send(ws, {"type": "resume", "id": "w", "resume_token": start["resume_token"], "after": 0})
        assert (await recv(ws))["code"] == "resume_not_found"


async def test_a_generation_that_is_not_resumable_ends_with_its_connection(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.script = numbered_script(0.05)
    server = await start_gateway()
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=1000, id="n"))
        await recv(ws)
    with trio.fail_after(5):
        await upstream.requests[0].closed.wait()
    assert not upstream.requests[0].completed


async def test_a_detached_generation_with_a_full_log_waits_for_its_client(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.script = numbered_script(0.001)  # ~3 s for the whole answer if nothing held it back
    server = await start_gateway(resume_buffer_bytes=4096)
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=3000, id="f", resumable=True))
        first = [await recv(ws, keep_seq=True) for _ in range(2)]
    engine = upstream.requests[0]
    (generation,) = server.gateway.registry._by_token.values()
    with trio.fail_after(10):
        while server.gateway.registry.log_bytes < 4096:
            await trio.sleep(0.05)
    relayed = generation.stats.deltas
    await trio.sleep(0.3)
    assert generation.stats.deltas == relayed < 3000  # paused at the log's bound, not aborted
    assert not engine.completed and not engine.closed.is_set()
    assert 4096 <= server.gateway.registry.log_bytes <= 4096 + 16
    rest = await resume_after(server.url, "f", first)
    check_exact(first + rest, numbered(3000))


async def test_the_oldest_detached_generation_goes_first_beyond_the_memory_cap(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    def script(body: dict[str, Any]) -> Script:
        return Script(tokens=("y" * 200,) * 5000, delay=0.001)

    upstream.script = script  # 200-character deltas: each log fills in about a quarter of a second
    server = await start_gateway(resume_buffer_bytes=49152, resume_memory_bytes=65536)
    tokens = []
    for rid in ("old", "new"):
        async with open_websocket_url(server.url) as ws:
            await send(ws, chat("x", max_tokens=8000, id=rid, resumable=True))
            tokens.append((await recv(ws, keep_seq=True))["resume_token"])
        await trio.sleep(0.3)
    with trio.fail_after(10):
        await upstream.requests[0].closed.wait()  # "old" abandoned to make room
    assert not upstream.requests[1].closed.is_set()
    assert server.gateway.registry.log_bytes <= 65536 + 4096
    async with open_websocket_url(server.url) as ws:
        await send(ws, {"type": "resume", "id": "old", "resume_token": tokens[0], "after": 1})
        assert (await recv(ws))["code"] == "resume_not_found"
        await send(ws, {"type": "cancel", "id": "new", "resume_token": tokens[1]})
        assert await recv(ws) == {"type": "cancelled", "id": "new"}
    with trio.fail_after(5):
        await upstream.requests[1].closed.wait()  # cancelled from another connection while detached


@settings(max_examples=12, deadline=None)
@given(cut=st.integers(min_value=300, max_value=4000), back=st.integers(min_value=0, max_value=40),
       rst=st.booleans())
async def test_any_cut_and_any_after_give_the_exact_text(cut: int, back: int, rst: bool) -> None:
    """Wherever the connection is cut, resuming from any seq the client has gives the exact text.

    Each example runs in a trio run of its own, so it starts its own engine, server and proxy.
    """
    async with trio.open_nursery() as nursery:
        engine = FakeUpstream(numbered_script(0.002))
        await nursery.start(engine.serve)
        server: RunningServer = await nursery.start(serve, Settings(host="127.0.0.1", port=0,
                                                                    upstream=engine.base_url))
        proxy = CutProxy(server.host, server.port)
        await nursery.start(proxy.serve)
        proxy.rst = rst
        proxy.cut_after = cut
        before = await read_through_cut(proxy.url, chat("x", max_tokens=120, id="h", resumable=True))
        if before:  # else the cut came inside the handshake: nothing to resume
            before = before[:max(1, len(before) - back)]  # as if the client had kept fewer events
            after = await resume_after(server.url, "h", before)
            check_exact(before + after, numbered(120))
        nursery.cancel_scope.cancel()


async def test_resume_on_a_new_connection_while_the_old_one_is_half_open(
    proxied: tuple[RunningServer, CutProxy], upstream: FakeUpstream
) -> None:
    """The client's side is gone but the server's is still up (no RST, no FIN reached it): the new
    connection takes the generation over at once, without waiting for the old one to time out."""
    server, proxy = proxied
    proxy.half_open = True
    proxy.cut_after = 1200
    before = await read_through_cut(proxy.url, chat("x", max_tokens=300, id="half", resumable=True))
    (relay,) = proxy.relays
    assert not relay.server.socket.fileno() < 0  # the server's side of the old connection is still open
    assert len(server.server.sessions) == 1  # and the server still counts it as connected
    after = await resume_after(server.url, "half", before)
    check_exact(before + after, numbered(300))
    await relay.server.aclose()


async def test_a_cancel_by_token_after_the_end_is_answered(gateway: RunningServer, upstream: FakeUpstream) -> None:
    upstream.script = numbered_script(0)
    async with open_websocket_url(gateway.url) as ws:
        await send(ws, chat("x", max_tokens=3, id="e", resumable=True))
        events = await read_generation(ws, "e")
    async with open_websocket_url(gateway.url) as ws:
        await send(ws, {"type": "cancel", "id": "e", "resume_token": events[0]["resume_token"]})
        answer = await recv(ws)
    assert (answer["type"], answer["code"], answer["id"]) == ("error", "nothing_to_cancel", "e")
