"""sd_notify and socket-activation helpers, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trioai.clientaddr import client_address
from trioai.config import load_settings
from trioai.systemd import Notifier, inherited_sockets, listeners_from

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield path, sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.watchdog_interval is None


def test_notify_sends_one_datagram_per_call(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.notify("READY=1", "STATUS=serving ws://x") is True
    assert notifier.notify("STOPPING=1") is True
    assert received(sock) == ["READY=1\nSTATUS=serving ws://x", "STOPPING=1"]


def test_abstract_namespace_address() -> None:
    name = f"trioai-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    with sock:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert received(sock) == ["READY=1"]


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert notifier.enabled
    assert notifier.notify("READY=1") is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str], interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval == interval


async def test_watchdog_pings_at_half_the_timeout(
    notify_socket: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    with trio.move_on_after(10.5):
        await notifier.run_watchdog()
    assert received(sock) == ["WATCHDOG=1"] * 11  # at 0, 1, 2, ... 10 s


async def test_watchdog_returns_when_not_asked_for(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    with trio.fail_after(1):
        await Notifier({"NOTIFY_SOCKET": path}).run_watchdog()
    assert received(sock) == []


def test_no_socket_activation_for_another_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert inherited_sockets(env) == []
    assert env == {}  # consumed either way, so children never see them


def test_no_socket_activation_without_variables() -> None:
    assert inherited_sockets({}) == []


async def test_listeners_from_a_listening_socket_accept_connections() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    [listener] = listeners_from([sock])
    async with listener:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server_side = await listener.accept()
        async with client, server_side:
            await client.send_all(b"ping")
            assert await server_side.receive_some(4) == b"ping"


def test_shipped_env_trusts_the_local_nginx() -> None:
    """systemd/trioai.env loads, and names the client Nginx on this host forwards (the socket unit
    listens on loopback, so Nginx connects from 127.0.0.1 or ::1); no other peer is trusted."""
    env: dict[str, str] = {}
    for line in (SYSTEMD / "trioai.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    trusted = load_settings(env=env).trusted_networks()
    forwarded = [(b"X-Forwarded-For", b"198.51.100.7"), (b"X-Real-IP", b"198.51.100.7")]
    assert client_address("127.0.0.1", forwarded, trusted) == "198.51.100.7"
    assert client_address("::1", forwarded, trusted) == "198.51.100.7"
    assert client_address("192.0.2.1", forwarded, trusted) == "192.0.2.1"
    assert "ListenStream=127.0.0.1:" in (SYSTEMD / "trioai.socket").read_text()
