"""``trioai chat`` driven as a real terminal program (pexpect, a pseudo-terminal) against a real server."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pexpect
import pytest
import trio

from trioai.fake_upstream import FakeUpstream, Script

from .conftest import StartGateway
from .proxy import CutProxy
from .test_client import (
    COUNT,
    NUMBERED,
    USAGE,
    ScriptedServer,
    ScriptItem,
    engine_rich_script,
    numbered_script,
    rich_events,
)


def script(body: dict[str, Any]) -> Script:
    last = body["messages"][-1]["content"]
    if last == "long story":
        return Script(tokens=tuple(f"s{i} " for i in range(2000)), delay=0.01)
    if last == "fail":
        return Script(status=400, error_message="that prompt is not allowed")
    # Echo how many messages the conversation has, to show it is kept.
    return Script(tokens=(f"[{len(body['messages'])} messages] ", "you said ", f"{last}."))


def spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "trioai", "chat", *args], encoding="utf-8", timeout=15)


def interactive_session(url: str) -> list[str]:
    child = spawn(url)
    try:
        child.expect("connected to")
        child.expect("you> ")
        child.sendline("hello")
        child.expect(r"\[1 messages\] you said hello\.")
        child.expect(r"first token \d+ ms")
        child.expect("you> ")
        child.sendline("again")
        child.expect(r"\[3 messages\] you said again\.")  # user, assistant, user
        child.expect("you> ")
        child.sendline("long story")
        child.expect("s5 ")
        child.kill(signal.SIGINT)  # Ctrl-C: cancels the answer, not the program
        child.expect(r"\(cancelled\)")
        child.expect("you> ")
        child.sendline("fail")
        child.expect("error: invalid_request: that prompt is not allowed")
        child.expect("you> ")
        child.sendline("last")
        child.expect(r"\[5 messages\] you said last\.")  # the cancelled and failed turns were dropped
        child.expect("you> ")
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return [str(child.exitstatus)]


async def test_interactive_chat(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = script
    server = await start_gateway()
    with trio.fail_after(60):
        assert await trio.to_thread.run_sync(interactive_session, server.url) == ["0"]
    long_story = next(r for r in upstream.requests if r.body["messages"][-1]["content"] == "long story")
    assert long_story.disconnected_at is not None  # the Ctrl-C reached the engine


def run_once(url: str, prompt: str) -> tuple[int, str]:
    child = spawn(url, "--once", prompt)
    output = child.read()
    child.close()
    return child.exitstatus, output


async def test_once_prints_the_answer_and_exits_0(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = script
    server = await start_gateway()
    status, output = await trio.to_thread.run_sync(run_once, server.url, "ping")
    assert status == 0
    assert "[1 messages] you said ping." in output
    assert "finish: stop" in output


async def test_once_exit_status_reflects_errors(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = script
    server = await start_gateway()
    status, output = await trio.to_thread.run_sync(run_once, server.url, "fail")
    assert status == 1
    assert "invalid_request: that prompt is not allowed" in output
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{sock.getsockname()[1]}/ws/chat"
    status, output = await trio.to_thread.run_sync(run_once, dead, "hello")
    assert status == 1
    assert "cannot talk to" in output and "Traceback" not in output


# --- Reasoning and tool calls, against a scripted server (tests/test_client.py's ScriptedServer). ------

DIM = "\x1b[2m"
RESET = "\x1b[0m"


def rich_script(message: dict[str, Any]) -> Sequence[ScriptItem]:
    last = message["messages"][-1]["content"]
    if last == "weather?":
        return rich_events()
    if last == "think long":
        return [{"type": "start", "model": "m"},
                *[item for i in range(2000) for item in ({"type": "reasoning", "content": f"t{i} "}, 0.01)]]
    return [{"type": "start", "model": "m"}, {"type": "token", "content": f"plain {last}"},
            {"type": "done", "finish_reason": "stop", "usage": USAGE}]


@pytest.fixture
async def rich_server(nursery: trio.Nursery) -> ScriptedServer:
    server = ScriptedServer(rich_script)
    await nursery.start(server.serve)
    return server


def rich_session(url: str) -> list[str]:
    child = spawn(url)
    try:
        child.expect_exact("you> ")
        child.sendline("weather?")
        # On a terminal: the thinking dimmed, then the answer, then the calls it ends with.
        child.expect_exact(f"{DIM}The user asks for the weather.{RESET}\r\nChecking.\r\n"
                           '→ get_weather({"city": "Paris"})\r\n→ get_time({"tz": "CET"})\r\n')
        child.expect_exact("finish: tool_calls")
        child.expect_exact("you> ")
        child.sendline("hello")
        child.expect_exact("plain hello")
        plain = child.before
        child.expect_exact("you> ")
        child.sendline("think long")
        child.expect_exact("t5 ")
        child.kill(signal.SIGINT)  # cancelled mid-thought: the dim style is reset before the stats line
        child.expect_exact(f"{RESET}\r\n\r\n{DIM}(cancelled){RESET}")
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return [str(child.exitstatus), plain]


async def test_reasoning_dimmed_and_tool_calls_printed(rich_server: ScriptedServer) -> None:
    with trio.fail_after(60):
        status, plain = await trio.to_thread.run_sync(rich_session, rich_server.url)
    assert status == "0"
    assert "Reasoning" not in plain and "→" not in plain  # an old-style answer prints as before
    turns = [event["messages"] for event in rich_server.received if event["type"] == "message"]
    # The answer that ended with tool calls stays in the conversation as its text.
    assert turns[1][:2] == [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "Checking."}]
    assert any(event == {"type": "cancel", "id": "c3"} for event in rich_server.received)


async def test_once_to_a_pipe_has_no_ansi_and_keeps_stdout_for_the_answer(rich_server: ScriptedServer) -> None:
    result = await trio.run_process([sys.executable, "-m", "trioai", "chat", rich_server.url, "--once", "weather?"],
                                    capture_stdout=True, capture_stderr=True, check=False)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stdout == 'Checking.\n→ get_weather({"city": "Paris"})\n→ get_time({"tz": "CET"})\n'
    assert stderr.startswith("The user asks for the weather.\n")  # the thinking: on stderr, like the stats
    assert "finish: tool_calls" in stderr
    assert "\x1b" not in stdout + stderr


async def test_end_to_end_reasoning_and_tool_calls(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    """Through the real gateway and the fake engine scripting a reasoning, tool-calling answer."""
    upstream.script = engine_rich_script
    server = await start_gateway()
    result = await trio.run_process([sys.executable, "-m", "trioai", "chat", server.url, "--once", "weather?"],
                                    capture_stdout=True, capture_stderr=True, check=False)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stdout == 'Checking.\n→ get_weather({"city": "Paris"})\n→ get_time({"tz": "CET"})\n'
    assert stderr.startswith("The user asks for the weather.\n")
    assert "finish: tool_calls" in stderr


# --- Resume: an answer survives a cut connection (tests/proxy.py between the chat and the gateway). ----


@pytest.fixture
async def proxy(nursery: trio.Nursery, start_gateway: StartGateway, upstream: FakeUpstream) -> CutProxy:
    upstream.script = numbered_script
    server = await start_gateway()
    cut_proxy = CutProxy("127.0.0.1", server.port)
    await nursery.start(cut_proxy.serve)
    return cut_proxy


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_once_answer_survives_a_cut(proxy: CutProxy, upstream: FakeUpstream, rst: bool) -> None:
    proxy.rst = rst
    proxy.cut_after = 3000  # mid-answer
    result = await trio.run_process(
        [sys.executable, "-m", "trioai", "chat", proxy.url, "--once", "count", "--max-tokens", str(COUNT)],
        capture_stdout=True, capture_stderr=True, check=False)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stdout == NUMBERED + "\n"  # the whole answer, once
    assert "(reconnected)" in stderr
    assert len(proxy.relays) == 2 and proxy.relays[0].to_client == 3000
    assert len(upstream.requests) == 1


def cut_session(url: str, cut: Callable[[], None]) -> list[str]:
    child = spawn(url, "--max-tokens", str(COUNT))
    try:
        child.expect_exact("you> ")
        child.sendline("count")
        child.expect_exact("w40 ")
        head = child.before + child.after
        trio.from_thread.run_sync(cut)  # mid-answer
        child.expect_exact("w199 ")
        answer = head + child.before + child.after
        child.expect_exact(f"finish: stop, (reconnected){RESET}")  # dim, in the stats line
        child.expect_exact("you> ")
        trio.from_thread.run_sync(cut)  # between turns: the next one reconnects first
        child.sendline("again")
        child.expect_exact("w199 ")
        again = child.before
        child.expect_exact("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return [str(child.exitstatus), answer, again]


async def test_interactive_answer_survives_a_cut(proxy: CutProxy) -> None:
    with trio.fail_after(60):
        status, answer, again = await trio.to_thread.run_sync(cut_session, proxy.url, proxy.cut)
    assert status == "0"
    assert answer.endswith("\r\n" + NUMBERED)  # the whole answer, once, after the echoed prompt
    assert again.endswith("\r\n" + NUMBERED[:-len("w199 ")])  # the next turn, on a new connection
    assert len(proxy.relays) == 3
