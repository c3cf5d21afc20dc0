"""Through a real Nginx configured with deploy/nginx/trioai.conf: stream, cancel, multiplex, idle,
and per-client rate limits from the forwarded client address (``--trusted-proxies``).

The shipped file is used as is, except what a loopback test must change: plain HTTP on a free port
instead of TLS on 443, trioai's test port, and a 1-second ``proxy_read_timeout`` so that an idle
gap longer than it can be tested in seconds. scripts/test installs Nginx (Debian package).
"""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url, wrap_client_stream

from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import RunningServer

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, recv, send
from .processes import start_listening

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "trioai.conf"
READ_TIMEOUT = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def site_config(trioai_port: int, listen_port: int) -> str:
    """The shipped site configuration, adapted to loopback and a short read timeout."""
    text = SHIPPED.read_text()
    text = re.sub(r"^\s*listen .*;\n", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*ssl_.*;\n", "", text, flags=re.MULTILINE)
    text = text.replace("server_name chat.example.com;", f"listen 127.0.0.1:{listen_port};")
    text = text.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{trioai_port};")
    text, count = re.subn(r"proxy_read_timeout \d+s;", f"proxy_read_timeout {READ_TIMEOUT:g}s;", text)
    assert count == 1, "the shipped config must set proxy_read_timeout"
    return text


@dataclass
class Nginx:
    url: str
    port: int


@pytest.fixture
def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        pytest.fail("nginx is not installed: `apt-get install nginx` (scripts/test does it)")
    return path


async def start_nginx(nursery: trio.Nursery, binary: str, tmp: Path, trioai_port: int) -> Nginx:
    listen = free_port()
    await run_nginx(nursery, binary, tmp, site_config(trioai_port, listen), listen)
    return Nginx(f"ws://127.0.0.1:{listen}/ws/chat", listen)


async def run_nginx(nursery: trio.Nursery, binary: str, tmp: Path, site: str, listen: int) -> None:
    """A real Nginx serving ``site`` from ``tmp`` (checked with ``nginx -t`` first), until the test
    ends; returns once it accepts connections on ``listen``."""
    (tmp / "site.conf").write_text(site)
    (tmp / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
""")
    check = await trio.run_process([binary, "-t", "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                                   capture_stderr=True, check=False)
    assert check.returncode == 0, check.stderr.decode()
    await start_listening(nursery, [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf")], listen,
                          tmp / "error.log")


@pytest.fixture
async def proxied(
    nursery: trio.Nursery, start_gateway: StartGateway, nginx_binary: str, tmp_path: Path
) -> tuple[RunningServer, Nginx]:
    server = await start_gateway(ping_interval=0.3)
    return server, await start_nginx(nursery, nginx_binary, tmp_path, server.port)


def numbered(body: dict[str, Any]) -> Script:
    return Script(tokens=tuple(f"w{i} " for i in range(body["max_tokens"])), delay=0.002, finish_reason="length")


async def test_plain_client_streams_through_nginx(proxied: tuple[RunningServer, Nginx]) -> None:
    _, nginx = proxied
    async with open_websocket_url(nginx.url) as ws:
        await ws.send_message('{"type":"message","messages":[{"role":"user","content":"one two"}],"max_tokens":6}')
        events = next(iter((await collect_until_terminal(ws)).values()))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    assert events[-1]["usage"]["completion_tokens"] == 6
    assert "".join(e["content"] for e in events if e["type"] == "token") == "one two one two one two "


async def test_multiplexed_streams_arrive_exact_and_in_order(
    proxied: tuple[RunningServer, Nginx], upstream: FakeUpstream
) -> None:
    _, nginx = proxied
    upstream.script = numbered
    async with open_websocket_url(nginx.url) as ws:
        for rid in ("a", "b", "c"):
            await send(ws, chat("x", max_tokens=60, id=rid))
        events = await collect_until_terminal(ws, {"a", "b", "c"})
    expected = "".join(f"w{i} " for i in range(60))
    for rid in ("a", "b", "c"):
        assert "".join(e["content"] for e in events[rid] if e["type"] == "token") == expected
        assert events[rid][-1]["type"] == "done"


async def test_cancel_through_nginx_closes_the_upstream_stream(
    proxied: tuple[RunningServer, Nginx], upstream: FakeUpstream
) -> None:
    _, nginx = proxied
    upstream.script = lambda body: Script(tokens=("x ",) * 10_000, delay=0.005)
    async with open_websocket_url(nginx.url) as ws:
        await send(ws, chat("x", max_tokens=8000, id="long"))
        while (await recv(ws))["type"] != "token":
            pass
        await send(ws, {"type": "cancel", "id": "long"})
        while (event := await recv(ws))["type"] == "token":
            pass
        assert event == {"type": "cancelled", "id": "long"}
    record = upstream.requests[-1]
    with trio.fail_after(5):
        await record.closed.wait()
    assert record.disconnected_at is not None and not record.completed


async def test_idle_gap_longer_than_proxy_read_timeout_survives(proxied: tuple[RunningServer, Nginx]) -> None:
    _, nginx = proxied
    async with open_websocket_url(nginx.url) as ws:
        await trio.sleep(READ_TIMEOUT * 2.5)  # only trioai's pings cross Nginx meanwhile
        await send(ws, chat("still there", max_tokens=2))
        events = next(iter((await collect_until_terminal(ws)).values()))
        assert events[-1]["type"] == "done"


async def test_without_pings_nginx_drops_the_idle_connection(
    nursery: trio.Nursery, start_gateway: StartGateway, nginx_binary: str, tmp_path: Path
) -> None:
    """The control experiment: the previous test passes because of the pings."""
    server = await start_gateway(ping_interval=0)
    nginx = await start_nginx(nursery, nginx_binary, tmp_path, server.port)
    async with open_websocket_url(nginx.url) as ws:
        await trio.sleep(READ_TIMEOUT * 2.5)
        with pytest.raises(ConnectionClosed):
            await recv(ws, timeout=5)  # Nginx closed the connection: the client sees it end


@asynccontextmanager
async def connect_from(
    source: str, nginx: Nginx, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket to Nginx whose TCP connection comes from ``source`` (127.x.y.z on Linux)."""
    stream = await trio.open_tcp_stream("127.0.0.1", nginx.port, local_address=source)
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/ws/chat", extra_headers=headers or [])
        try:
            yield ws
        finally:
            await ws.aclose()


async def request_outcome(ws: WebSocketConnection, rid: str) -> str:
    """Send one short request; its terminal event's type, or the error code."""
    await send(ws, chat("hi", max_tokens=2, id=rid))
    terminal = (await collect_until_terminal(ws, {rid}))[rid][-1]
    return str(terminal.get("code", terminal["type"]))


async def test_rate_limits_count_per_client_behind_nginx(
    nursery: trio.Nursery, start_gateway: StartGateway, nginx_binary: str, tmp_path: Path
) -> None:
    """With trusted proxies set, each client behind Nginx has its own limit (not one for all)."""
    server = await start_gateway(rate_limit_requests=1, trusted_proxies="127.0.0.1,::1")
    nginx = await start_nginx(nursery, nginx_binary, tmp_path, server.port)
    for client in ("127.0.0.2", "127.0.0.3"):
        async with connect_from(client, nginx) as ws:
            assert client in {s.client for s in server.server.sessions}
            assert await request_outcome(ws, "first") == "done"
            assert await request_outcome(ws, "second") == "rate_limited"  # the limit itself holds
    # A client's own X-Forwarded-For is kept by Nginx but lies left of the address Nginx saw.
    async with connect_from("127.0.0.2", nginx, [(b"X-Forwarded-For", b"198.51.100.9")]) as ws:
        assert "127.0.0.2" in {s.client for s in server.server.sessions}
        assert await request_outcome(ws, "forged") == "rate_limited"
