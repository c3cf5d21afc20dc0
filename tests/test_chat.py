"""``trioai chat`` driven as a real terminal program (pexpect, a pseudo-terminal) against a real server."""

from __future__ import annotations

import signal
import sys
from typing import Any

import pexpect
import trio

from trioai.fake_upstream import FakeUpstream, Script

from .conftest import StartGateway


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
