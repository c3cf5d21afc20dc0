"""A client of the plain format written with another WebSocket implementation (``websockets``).

trioai's other tests use trio-websocket on both ends; this one checks that an independent client
library, as someone else's application would use it, talks to the server unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from websockets.sync.client import connect

from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import RunningServer


def plain_client(url: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The seed client: message → print tokens until done; then message + cancel → cancelled."""
    with connect(url, open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "message", "messages": [{"role": "user", "content": "blue sky"}],
                            "max_tokens": 5}))
        text = ""
        while (event := json.loads(ws.recv(timeout=10)))["type"] != "done":
            if event["type"] == "token":
                text += event["content"]
        done = event
        ws.send(json.dumps({"type": "message", "messages": [{"role": "user", "content": "slow"}],
                            "max_tokens": 1000}))
        while json.loads(ws.recv(timeout=10))["type"] != "token":
            pass
        ws.send(json.dumps({"type": "cancel"}))
        while (event := json.loads(ws.recv(timeout=10)))["type"] == "token":
            pass
        return text, done, event


async def test_websockets_library_client_of_the_plain_format(gateway: RunningServer, upstream: FakeUpstream) -> None:
    base = upstream.script

    def script(body: dict[str, Any]) -> Script:
        if body["messages"][-1]["content"] == "slow":
            return Script(tokens=("z ",) * 1000, delay=0.01)
        return base(body)

    upstream.script = script
    with trio.fail_after(30):
        text, done, cancelled = await trio.to_thread.run_sync(plain_client, gateway.url)
    assert text == "blue sky blue sky blue "
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 5
    assert cancelled["type"] == "cancelled"
    record = upstream.requests[-1]
    with trio.fail_after(5):
        await record.closed.wait()
    assert record.disconnected_at is not None
