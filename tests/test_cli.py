"""The ``trioai`` command as a user runs it: a real process, real signals, the fake engine upstream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import partial

import pytest
import trio
from trio_websocket import open_websocket_url

from trioai.cli import main
from trioai.fake_upstream import FakeUpstream

from .helpers import chat, collect_until_terminal, echo_tokens, send


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
