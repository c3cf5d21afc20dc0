"""Strings from the engine that JSON can carry but a WebSocket text frame cannot (lone surrogates).

Each is relayed with U+FFFD in place of the surrogate; the generation it belongs to ends normally,
and the connection, with the healthy generation running beside it, is untouched.
"""

from __future__ import annotations

from typing import Any

import pytest

from trioai.fake_upstream import FakeUpstream, Script

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, connect, recv, send

HEALTHY = Script(tokens=("ok ",) * 20, delay=0.01)
LONE_DELTA = b'data: {"choices":[{"index":0,"delta":{"content":"\\ud83d"},"finish_reason":null}]}\n\n'


def text_and_end(events: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A stream's text (a slow reader may get deltas joined) and its terminal event without its id."""
    assert events[0]["type"] == "start"
    assert all(e["type"] == "token" for e in events[1:-1])
    end = {k: v for k, v in events[-1].items() if k not in ("id", "usage", "ttft_ms", "tokens_per_s")}
    return "".join(e["content"] for e in events[1:-1]), end


@pytest.mark.parametrize(
    ("bad", "text", "end"),
    [
        (Script(raw_lines=(LONE_DELTA,), tokens=("x ",)), "\ufffdx ", {"type": "done", "finish_reason": "stop"}),
        (Script(tokens=("x ",), finish_reason="st\udc00p"), "x ", {"type": "done", "finish_reason": "st\ufffdp"}),
        (Script(status=400, error_message="prompt \ud800 too long", error_param="messages\udfff"), "",
         {"type": "error", "code": "invalid_request", "message": "prompt \ufffd too long", "param": "messages\ufffd"}),
        (Script(tokens=("x ", "y "), stream_error_after=1, error_message="mid \ud83d stream"), "x ",
         {"type": "error", "code": "upstream_error", "message": "mid \ufffd stream"}),
    ],
    ids=["delta", "finish_reason", "4xx message and param", "in-stream error"],
)
async def test_a_lone_surrogate_costs_nothing_but_a_replacement_character(
    start_gateway: StartGateway, upstream: FakeUpstream, bad: Script, text: str, end: dict[str, Any]
) -> None:
    upstream.script = lambda body: bad if body["messages"][0]["content"] == "bad" else HEALTHY
    server = await start_gateway(upstream_retries=0)
    async with connect(server) as ws:
        await send(ws, chat("good", id="good"))
        await send(ws, chat("bad", id="bad"))
        events = await collect_until_terminal(ws, {"good", "bad"})
        assert text_and_end(events["good"]) == ("ok " * 20, {"type": "done", "finish_reason": "stop"})
        assert text_and_end(events["bad"]) == (text, end)
        await send(ws, {"type": "ping", "id": "still"})  # the connection is open and serving
        assert await recv(ws) == {"type": "pong", "id": "still"}


async def test_a_model_name_with_a_lone_surrogate_is_relayed_replaced(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    upstream.model = "gemma\ud83d"  # what /models lists; the gateway asks once, at the first request
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("a b", id=1, max_tokens=2))
        events = (await collect_until_terminal(ws, {1}))[1]
        assert events[0] == {"type": "start", "id": 1, "model": "gemma\ufffd"}
        assert text_and_end(events) == ("a b ", {"type": "done", "finish_reason": "length"})
        await send(ws, {"type": "ping", "id": 2})
        assert await recv(ws) == {"type": "pong", "id": 2}


async def test_an_absurd_token_count_is_replaced_by_the_gateways_own(
    start_gateway: StartGateway, upstream: FakeUpstream
) -> None:
    """A usage count that would make the decode rate infinite (or overflow a float) is not the engine's."""
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1' + b"0" * 307 + b"}}\n\n"
    upstream.script = lambda body: Script(raw_lines=(usage,), tokens=("a ", "b "), delay=0.01, usage=False)
    server = await start_gateway()
    async with connect(server) as ws:
        await send(ws, chat("x", id=1))
        done = (await collect_until_terminal(ws, {1}))[1][-1]
        assert done["type"] == "done"
        assert done["usage"] == {"prompt_tokens": None, "completion_tokens": 2, "total_tokens": None,
                                 "source": "gateway"}
        await send(ws, {"type": "ping", "id": 2})
        assert await recv(ws) == {"type": "pong", "id": 2}
