"""The ``trioai`` command as a user runs it: a real process, real signals, the fake engine upstream."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from trioai.cli import check_tls_files, main, run_server, settings_for_embedded, warn_if_unauthenticated
from trioai.config import EMBEDDED_DEFAULT_MAX_TOKENS, ConfigError, Settings
from trioai.fake_upstream import FakeUpstream

from .helpers import chat, collect_until_terminal, echo_tokens, send, serve_fails_to_start


async def read_until(stream: trio.abc.ReceiveStream, pattern: str, seen: bytearray) -> re.Match[str]:
    """Read ``stream`` into ``seen`` until ``pattern`` matches its text."""
    regex = re.compile(pattern)
    with trio.fail_after(30):
        while not (m := regex.search(seen.decode("utf-8", "replace"))):
            data = await stream.receive_some()
            if not data:
                raise AssertionError("process ended before printing " + pattern + ":\n" + seen.decode())
            seen += data
    return m


async def test_serve_command_streams_and_stops_cleanly_on_sigterm(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    command = [sys.executable, "-m", "trioai", "serve", "--port", "0", "--upstream", upstream.base_url]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
    assert process.stderr is not None
    seen = bytearray()
    url = (await read_until(process.stderr, r"listening on (ws://\S+)", seen)).group(1)
    async with open_websocket_url(url) as ws:
        await send(ws, chat("red green", max_tokens=4))
        events = next(iter((await collect_until_terminal(ws)).values()))
    assert "".join(e["content"] for e in events if e["type"] == "token") == "".join(echo_tokens("red green", 4))
    # One log line per connection and per finished request.
    await read_until(process.stderr, r"request conn=1 id=r1 outcome=done tokens=4", seen)
    await read_until(process.stderr, r"connection conn=1 closed", seen)
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        await process.wait()
    assert process.returncode == 0
    assert b"Traceback" not in seen


def test_bad_setting_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "not-a-number"]) == 2
    assert "--port must be int" in capsys.readouterr().err


async def test_port_in_use_exits_1(nursery: trio.Nursery, upstream: FakeUpstream) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = await trio.run_process(
            [sys.executable, "-m", "trioai", "serve", "--port", str(port), "--upstream", upstream.base_url],
            check=False,
            capture_stderr=True,
        )
    assert result.returncode == 1
    assert b"cannot start" in result.stderr
    assert b"Traceback" not in result.stderr


async def run_briefly(*options: str, env: dict[str, str] | None = None) -> list[str]:
    """Start ``trioai serve`` against a dead upstream, wait until it listens, SIGTERM it; its stderr lines."""
    command = [sys.executable, "-m", "trioai", "serve", "--port", "0", "--upstream", "http://127.0.0.1:9/v1", *options]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    env={**os.environ, **(env or {})})
        )
        assert process.stderr is not None
        seen = bytearray()
        await read_until(process.stderr, r"listening on", seen)
        process.send_signal(signal.SIGTERM)
        await read_until(process.stderr, r"draining: 0", seen)
    assert process.returncode == 0
    return seen.decode().splitlines()


async def test_json_logs_are_one_object_per_line() -> None:
    lines = await run_briefly("--log-format", "json")
    entries = [json.loads(line) for line in lines]
    assert entries[0]["level"] == "info"
    assert entries[0]["logger"] == "trioai.server"
    assert entries[0]["message"].startswith("listening on ws://127.0.0.1:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entries[0]["time"])


async def test_under_journald_lines_carry_no_timestamp() -> None:
    lines = await run_briefly(env={"JOURNAL_STREAM": "8:1234"})
    assert lines[0].startswith("INFO trioai.server: listening on ws://")
    plain = await run_briefly()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO trioai.server: listening on", plain[0])


def test_bad_log_format_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--log-format", "xml"]) == 2
    assert "log_format must be text or json" in capsys.readouterr().err


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate and its key (EC: fast to make)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def tls_error(settings: Settings) -> str:
    """The message of the :class:`ConfigError` that ``check_tls_files`` raises."""
    with pytest.raises(ConfigError) as caught:
        check_tls_files(settings)
    return str(caught.value)


def test_tls_files_are_checked_and_named(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    check_tls_files(Settings())
    check_tls_files(Settings(certfile=str(cert), keyfile=str(key)))
    missing = tmp_path / "missing.pem"
    assert tls_error(Settings(certfile=str(missing))) == f"cannot read certfile {missing}: No such file or directory"
    assert (tls_error(Settings(certfile=str(cert), keyfile=str(missing)))
            == f"cannot read keyfile {missing}: No such file or directory")
    assert tls_error(Settings(certfile=str(tmp_path))) == f"cannot read certfile {tmp_path}: Is a directory"
    # The key is in another file; then a key where the certificate should be.
    assert tls_error(Settings(certfile=str(cert))).startswith(
        f"cannot load the TLS certificate {cert} with the key in it: [SSL]")
    assert tls_error(Settings(certfile=str(key), keyfile=str(key))).startswith(
        f"cannot load the TLS certificate {key} with the key {key}: [SSL]")


async def test_missing_certificate_is_named_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    stderr = await serve_fails_to_start("--certfile", str(missing))
    assert f"cannot start: cannot read certfile {missing}: No such file or directory" in stderr


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("192.168.1.5", None, True),
        ("gateway.example", None, True),
        ("127.0.0.1", None, False),
        ("127.1.2.3", None, False),
        ("::1", None, False),
        ("localhost", None, False),
        ("0.0.0.0", "keys.txt", False),
    ],
)
def test_no_keys_on_a_public_interface_warns(host: str, keys: str | None, warned: bool,
                                             caplog: pytest.LogCaptureFixture) -> None:
    warn_if_unauthenticated(Settings(host=host, api_keys_file=keys))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == (
        [f"no API keys (--api-keys-file): anyone who can reach {host} may use the engine"] if warned else []
    )


def test_serve_warns_at_start(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    started: list[Settings] = []

    async def fake_run_server(settings: Settings) -> None:
        started.append(settings)

    monkeypatch.setattr("trioai.cli.run_server", fake_run_server)
    monkeypatch.setattr("trioai.cli.setup_logging", lambda level, log_format: None)  # keep caplog's handler
    assert main(["serve", "--host", "0.0.0.0", "--upstream", "http://127.0.0.1:9/v1"]) == 0
    assert [s.host for s in started] == ["0.0.0.0"]
    assert "no API keys (--api-keys-file): anyone who can reach 0.0.0.0 may use the engine" in caplog.messages


def test_embedded_engine_default_answer_length() -> None:
    assert settings_for_embedded(Settings()).default_max_tokens == EMBEDDED_DEFAULT_MAX_TOKENS == 256
    assert settings_for_embedded(Settings(default_max_tokens=1000)).default_max_tokens == 1000
    assert settings_for_embedded(Settings(max_tokens_limit=100)).default_max_tokens == 100
    unchanged = Settings(default_max_tokens=7)
    assert settings_for_embedded(unchanged) is unchanged


@pytest.mark.parametrize("upstream", [None, "http://127.0.0.1:9/v1"])
async def test_only_the_embedded_engine_gets_the_default(
    upstream: str | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    served: list[Settings] = []

    async def fake_serve(settings: Settings, *, listeners: Any, drain: trio.Event,
                         task_status: trio.TaskStatus[Any]) -> None:
        served.append(settings)
        task_status.started(SimpleNamespace(server=None, url="ws://127.0.0.1:1/ws/chat"))

    monkeypatch.setattr("trioai.engine.serve_with_local_engine", fake_serve)
    monkeypatch.setattr("trioai.cli.serve", fake_serve)
    caplog.set_level(logging.INFO, "trioai")
    with trio.fail_after(5):
        await run_server(Settings(upstream=upstream))
    assert [s.default_max_tokens for s in served] == [256 if upstream is None else None]
    notes = [m for m in caplog.messages if "answers without max_tokens" in m]
    assert notes == (["embedded engine: answers without max_tokens stop at 256 tokens (--default-max-tokens)"]
                     if upstream is None else [])
