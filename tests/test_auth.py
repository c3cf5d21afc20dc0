"""Who may connect: API keys (header, subprotocol, query), origins, the connection cap, the queue cap."""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from trioai.auth import SUBPROTOCOL, Accepted, KeyFileError, KeySet, Rejection, check_handshake
from trioai.fake_upstream import FakeUpstream, Script

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, recv, send
from .test_cli import read_until

KEYS = KeySet.from_keys(["k-one", "k-two"])


def decide(headers: dict[str, str] | None = None, subprotocols: tuple[str, ...] = (), target: str = "/ws/chat",
           keys: KeySet | None = KEYS, origins: tuple[str, ...] = ()) -> Accepted | Rejection:
    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return check_handshake(keys=keys, allowed_origins=origins, headers=raw, subprotocols=subprotocols, target=target)


def test_no_keys_configured_accepts_everyone() -> None:
    assert decide(keys=None) == Accepted(None, None)
    assert decide(keys=None, subprotocols=(SUBPROTOCOL,)) == Accepted(None, SUBPROTOCOL)


@pytest.mark.parametrize(
    ("headers", "subprotocols", "target"),
    [
        ({"Authorization": "Bearer k-one"}, (), "/ws/chat"),
        ({"authorization": "bearer   k-one "}, (), "/ws/chat"),
        ({}, ("bearer.k-one",), "/ws/chat"),
        ({}, (SUBPROTOCOL, "bearer.k-one"), "/ws/chat"),
        ({}, (), "/ws/chat?token=k-one"),
        ({"Authorization": "Bearer wrong"}, (), "/ws/chat?token=k-one"),
    ],
)
def test_a_key_in_any_of_the_three_places(headers: dict[str, str], subprotocols: tuple[str, ...],
                                          target: str) -> None:
    decision = decide(headers, subprotocols, target)
    assert isinstance(decision, Accepted)
    assert decision.key_id == KEYS.identify("k-one")
    assert decision.key_id is not None and "k-one" not in decision.key_id
    # The bearer entry is never selected (echoed); the protocol's own name is, when offered.
    assert decision.subprotocol == (SUBPROTOCOL if SUBPROTOCOL in subprotocols else None)


@pytest.mark.parametrize(
    ("headers", "subprotocols", "target"),
    [
        ({}, (), "/ws/chat"),
        ({"Authorization": "Bearer nope"}, (), "/ws/chat"),
        ({"Authorization": "Basic k-one"}, (), "/ws/chat"),
        ({}, ("bearer.",), "/ws/chat"),
        ({}, (), "/ws/chat?token="),
        ({}, (), "/ws/chat?key=k-one"),
    ],
)
def test_missing_or_wrong_keys_are_401(headers: dict[str, str], subprotocols: tuple[str, ...], target: str) -> None:
    assert decide(headers, subprotocols, target) == Rejection(401, "missing or invalid API key")


def test_origins() -> None:
    origins = ("https://app.example",)
    evil = decide({"Origin": "https://evil.example"}, keys=None, origins=origins)
    assert evil == Rejection(403, "origin not allowed")
    assert isinstance(decide({"Origin": "https://app.example"}, keys=None, origins=origins), Accepted)
    assert isinstance(decide({}, keys=None, origins=origins), Accepted)  # non-browser clients send none


def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nk-one\n\n  k-two  \n")
    keys = KeySet.load(path)
    assert keys.identify("k-two") and keys.identify("k-one") and not keys.identify("k-three")
    path.write_text("# nothing\n")
    with pytest.raises(KeyFileError, match="holds no key"):
        KeySet.load(path)
    with pytest.raises(KeyFileError, match="cannot read"):
        KeySet.load(tmp_path / "absent")


def test_key_file_saved_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_bytes("k-one\r\nk-two\r\n".encode("utf-8-sig"))  # as Windows Notepad saves it
    keys = KeySet.load(path)
    assert keys.identify("k-one") and keys.identify("k-two")
    assert keys == KeySet.from_keys(["k-one", "k-two"])


async def rejected_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(ConnectionRejected) as caught:
        async with open_websocket_url(url, **kwargs):
            pass
    return caught.value.status_code


async def test_handshakes_through_a_real_server(start_gateway: StartGateway, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("secret-1\n")
    server = await start_gateway(api_keys_file=str(keys), allowed_origins="https://app.example")
    assert await rejected_status(server.url) == 401
    assert await rejected_status(server.url, extra_headers=[("Authorization", "Bearer secret-2")]) == 401
    assert await rejected_status(server.url, extra_headers=[("Authorization", "Bearer secret-1"),
                                                            ("Origin", "https://evil.example")]) == 403
    async with open_websocket_url(server.url, subprotocols=[SUBPROTOCOL, "bearer.secret-1"],
                                  extra_headers=[(b"Origin", b"https://app.example")]) as ws:
        assert ws.subprotocol == SUBPROTOCOL
        await send(ws, chat("a b", max_tokens=2))
        events = next(iter((await collect_until_terminal(ws)).values()))
        assert events[-1]["type"] == "done"
    async with open_websocket_url(server.url + "?token=secret-1") as ws:
        await send(ws, {"type": "ping", "id": 1})
        assert await recv(ws) == {"type": "pong", "id": 1}
    metrics = server.gateway.metrics.render().decode()
    assert 'trioai_handshakes_rejected_total{status="401"} 2.0' in metrics
    assert 'trioai_handshakes_rejected_total{status="403"} 1.0' in metrics


async def test_connection_cap_is_503(start_gateway: StartGateway) -> None:
    server = await start_gateway(max_connections=2)
    async with open_websocket_url(server.url), open_websocket_url(server.url):
        assert await rejected_status(server.url) == 503
    with trio.fail_after(5):
        while server.server.open_connections:
            await trio.sleep(0.01)
    async with open_websocket_url(server.url) as ws:  # room again
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"


async def test_queue_cap_answers_overloaded_at_once(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",) * 500, delay=0.01)
    server = await start_gateway(max_concurrency=1, max_queue=1)
    async with open_websocket_url(server.url) as ws:
        await send(ws, chat("x", max_tokens=500, id="running"))
        while (await recv(ws))["type"] != "token":
            pass
        await send(ws, chat("x", max_tokens=500, id="waiting"))
        while (await recv(ws)) != {"type": "queued", "id": "waiting", "position": 1}:
            pass
        await send(ws, chat("x", max_tokens=500, id="refused"))
        while (event := await recv(ws))["id"] != "refused":
            pass
        assert event == {"type": "error", "id": "refused", "code": "overloaded", "retry_after": 1.0,
                         "message": "1 requests are already waiting for capacity; retry later"}
        await send(ws, {"type": "cancel"})
        finished = await collect_until_terminal(ws, {"running", "waiting"})
        assert finished["running"][-1]["type"] == "cancelled"
        assert finished["waiting"][-1]["type"] == "cancelled"


async def test_sighup_reloads_the_key_file(nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    command = [sys.executable, "-m", "trioai", "serve", "--port", "0", "--upstream", upstream.base_url,
               "--api-keys-file", str(keys)]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
    assert process.stderr is not None
    seen = bytearray()
    url = (await read_until(process.stderr, r"listening on (ws://\S+)", seen)).group(1)
    async with open_websocket_url(url + "?token=old-key"):
        pass
    keys.write_text("new-key\n")
    process.send_signal(signal.SIGHUP)
    await read_until(process.stderr, r"reloaded 1 API key", seen)
    assert await rejected_status(url + "?token=old-key") == 401
    async with open_websocket_url(url + "?token=new-key"):
        pass
    # A broken file keeps the keys in use.
    keys.write_text("")
    process.send_signal(signal.SIGHUP)
    await read_until(process.stderr, r"keeping the current API keys", seen)
    async with open_websocket_url(url + "?token=new-key"):
        pass
    assert b"old-key" not in seen and b"new-key" not in seen  # keys are never logged
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        await process.wait()
    assert process.returncode == 0
