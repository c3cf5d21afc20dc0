"""wss:// served directly with --certfile/--keyfile (for deployments without Nginx)."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, send, serve_fails_to_start


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_wss_streams_with_a_trusted_certificate(
    start_gateway: StartGateway, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server = await start_gateway(certfile=str(cert), keyfile=str(key))
    assert server.url.startswith("wss://127.0.0.1:")
    client_tls = ssl.create_default_context(cafile=str(cert))
    async with open_websocket_url(server.url, ssl_context=client_tls) as ws:
        await send(ws, chat("secure words", max_tokens=4))
        events = next(iter((await collect_until_terminal(ws)).values()))
    assert events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == "secure words secure words "


async def test_plain_ws_to_the_tls_port_fails_and_harms_nothing(
    start_gateway: StartGateway, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    # trio-websocket notices the failed TLS handshake only when the WebSocket handshake times out.
    server = await start_gateway(certfile=str(cert), keyfile=str(key), handshake_timeout=1.0)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /ws/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        with trio.fail_after(5):  # the server drops it: a TLS alert at most, never a WebSocket upgrade
            received = b""
            with contextlib.suppress(trio.BrokenResourceError):  # a reset is a drop too
                while data := await stream.receive_some(4096):
                    received += data
        assert b"HTTP/1.1 101" not in received
    client_tls = ssl.create_default_context(cafile=str(cert))
    async with open_websocket_url(server.url, ssl_context=client_tls) as ws:
        await send(ws, chat("ok", max_tokens=1))
        events = next(iter((await collect_until_terminal(ws)).values()))
    assert events[-1]["type"] == "done"


async def test_unreadable_certificate_is_a_clean_startup_failure(tmp_path: Path) -> None:
    stderr = await serve_fails_to_start("--certfile", str(tmp_path / "missing.pem"))
    assert "cannot start" in stderr
