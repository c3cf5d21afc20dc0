"""The operations HTTP port: health, readiness (including during a drain) and Prometheus metrics."""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from trioai.config import Settings
from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import RunningServer, serve

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, recv, send


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from a Prometheus text exposition."""
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no sample {name}{labels} in:\n{text}"
    return float(m.group(1))


async def get(server: RunningServer, path: str, method: str = "GET") -> httpx.Response:
    assert server.http_url is not None
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as client:
        return await client.request(method, path)


async def test_healthz_and_readyz(start_gateway: StartGateway) -> None:
    server = await start_gateway(http_port=0)
    assert server.http_port
    health = await get(server, "/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    ready = await get(server, "/readyz")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert ready.headers["cache-control"] == "no-store"


async def test_readyz_is_503_when_the_upstream_does_not_answer(nursery: trio.Nursery) -> None:
    with trio.socket.socket() as sock:  # a port nothing listens on
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    settings = Settings(host="127.0.0.1", port=0, http_port=0, upstream=dead)
    server: RunningServer = await nursery.start(serve, settings)
    ready = await get(server, "/readyz")
    assert (ready.status_code, ready.text) == (503, "upstream not answering\n")
    assert (await get(server, "/healthz")).status_code == 200  # alive all the same


async def test_readyz_is_503_while_draining(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    drain = trio.Event()
    settings = Settings(host="127.0.0.1", port=0, http_port=0, upstream=upstream.base_url)
    server: RunningServer = await nursery.start(partial(serve, settings, drain=drain))
    async with open_websocket_url(server.url) as ws:
        upstream.script = lambda body: Script(tokens=("x ",) * 40, delay=0.02)
        await send(ws, chat("x", max_tokens=40, id="a"))
        assert (await recv(ws))["type"] == "start"
        drain.set()
        with trio.fail_after(5):
            while not server.server.draining:
                await trio.sleep(0.005)
        ready = await get(server, "/readyz")
        assert (ready.status_code, ready.text) == (503, "draining\n")
        metrics = (await get(server, "/metrics")).text
        assert metric(metrics, "trioai_draining") == 1.0
        events = await collect_until_terminal(ws, {"a"})
        assert events["a"][-1]["type"] == "done"


async def test_metrics_count_requests_tokens_cancels_and_errors(start_gateway: StartGateway,
                                                               upstream: FakeUpstream) -> None:
    server = await start_gateway(http_port=0)

    def script(body: dict[str, Any]) -> Script:
        content = body["messages"][-1]["content"]
        if content == "fail":
            return Script(status=503)
        if content == "long":
            return Script(tokens=("x ",) * 1000, delay=0.01)
        return Script(tokens=("a ", "b ", "c "))

    upstream.script = script
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("ok", id="ok"))
        await send(ws, chat("fail", id="bad"))
        await collect_until_terminal(ws, {"ok", "bad"})
        await send(ws, chat("long", max_tokens=1000, id="long"))
        assert (await recv(ws))["type"] == "start"
        metrics = (await get(server, "/metrics")).text
        assert metric(metrics, "trioai_connections_open") == 1.0
        assert metric(metrics, "trioai_streams_running") == 1.0
        assert metric(metrics, "trioai_streams_queued") == 0.0
        await send(ws, {"type": "cancel", "id": "long"})
        await collect_until_terminal(ws, {"long"})
    with trio.fail_after(5):
        while server.server.open_connections:
            await trio.sleep(0.005)
    metrics = (await get(server, "/metrics")).text
    assert metric(metrics, "trioai_requests_total", '{code="",outcome="done"}') == 1.0
    assert metric(metrics, "trioai_requests_total", '{code="upstream_unavailable",outcome="error"}') == 1.0
    assert metric(metrics, "trioai_requests_total", '{code="",outcome="cancelled"}') == 1.0
    assert metric(metrics, "trioai_upstream_errors_total", '{code="upstream_unavailable"}') == 1.0
    assert metric(metrics, "trioai_cancels_total") == 1.0
    assert metric(metrics, "trioai_connections_total") == 1.0
    assert metric(metrics, "trioai_connections_open") == 0.0
    assert metric(metrics, "trioai_tokens_relayed_total") >= 3.0  # 3 from "ok", some from "long"
    assert metric(metrics, "trioai_request_duration_seconds_count") == 3.0
    assert metric(metrics, "trioai_time_to_first_token_seconds_count") == 2.0  # "bad" had no token


async def test_http_port_rejects_what_it_does_not_serve(start_gateway: StartGateway) -> None:
    server = await start_gateway(http_port=0)
    assert (await get(server, "/nope")).status_code == 404
    assert (await get(server, "/healthz", method="POST")).status_code == 405
    head = await get(server, "/healthz", method="HEAD")
    assert head.status_code == 200 and head.content == b""
    # Garbage is dropped without harming the server.
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port or 0)
    async with stream:
        await stream.send_all(b"\x00\x01 not http\r\n\r\n")
        with trio.fail_after(5):
            while await stream.receive_some(4096):
                pass
    assert (await get(server, "/healthz")).status_code == 200


class CountingUpstream(FakeUpstream):
    """A fake engine that counts ``GET /v1/models`` and answers it only after ``models_delay``."""

    def __init__(self, models_delay: float) -> None:
        super().__init__()
        self.models_delay = models_delay
        self.models_requests = 0

    async def _respond(self, stream: trio.SocketStream, conn: Any, request: Any, body: bytes) -> None:
        if request.target.startswith(b"/v1/models"):
            self.models_requests += 1
            await trio.sleep(self.models_delay)
        await super()._respond(stream, conn, request, body)


async def test_readiness_probes_share_one_engine_check_and_leave_chat_alone(nursery: trio.Nursery) -> None:
    engine = CountingUpstream(models_delay=1.0)  # a slow but healthy engine (the check allows 2 s)
    await nursery.start(engine.serve)
    settings = Settings(host="127.0.0.1", port=0, http_port=0, upstream=engine.base_url, model="fake-model",
                        max_concurrency=2)
    server: RunningServer = await nursery.start(serve, settings)
    statuses: list[int] = []

    async def probe() -> None:
        statuses.append((await get(server, "/readyz")).status_code)

    async with open_websocket_url(server.url) as ws, trio.open_nursery() as storm:
        for _ in range(40):
            storm.start_soon(probe)
        with trio.fail_after(5):
            while not engine.models_requests:
                await trio.sleep(0.005)
        sent = trio.current_time()
        await send(ws, chat("during the storm", max_tokens=3, id="chat"))
        with trio.fail_after(5):
            events = await collect_until_terminal(ws, {"chat"})
        took = trio.current_time() - sent
        assert events["chat"][-1]["type"] == "done"
        assert took < 0.5, f"the chat request waited {took:.2f} s behind readiness probes"
    assert statuses == [200] * 40
    assert engine.models_requests == 1
