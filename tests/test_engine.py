"""End to end through the embedded default engine: ``trioai serve`` with no ``--upstream``.

These run the real console script as a child process, which starts the real llama.cpp server with
the real Gemma 3 270M GGUF, and talk to it over a real WebSocket. Nothing is faked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from urllib.parse import urlsplit

import pytest
import trio
from openai.types.responses import Response
from trio_websocket import open_websocket_url

from trioai.engine import MISSING_ENGINE_HELP, EngineMissing, check_engine_installed

from .helpers import (
    RESUME_TOKENS,
    chat,
    check_one_generation,
    collect_until_terminal,
    cut_and_resume,
    read_generation,
    recv,
    resumable,
    send,
    text_of,
)
from .proxy import CutProxy
from .test_responses import ENGINE_LIMITS, ENGINE_TIMEOUT, sdk_connection, text_deltas, until_terminal

pytestmark = pytest.mark.engine

STARTUP_TIMEOUT = 240.0  # first run writes the model and loads it; later runs take a few seconds
PROMPT = "Once upon a time, in a small village by the sea, there lived"


class ServeProcess:
    """``trioai serve`` on the embedded default, its stderr collected line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for data in stream:
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode("utf-8", "replace") for line in complete)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 60.0) -> re.Match[str]:
        """The ``count``-th log line matching ``pattern``, waiting for it."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                matches = [m for m in map(regex.search, self.lines) if m]
                if len(matches) >= count:
                    return matches[count - 1]
                if self.process.returncode is not None:
                    raise AssertionError("trioai serve exited:\n" + "\n".join(self.lines[-40:]))
                await self._changed.wait()

    @property
    def url(self) -> str:
        for line in self.lines:
            if m := re.search(r"listening on (ws://\S+)", line):
                return m.group(1)
        raise AssertionError("not listening yet")


@pytest.fixture
async def serve_process(nursery: trio.Nursery) -> AsyncIterator[ServeProcess]:
    command = [sys.executable, "-m", "trioai", "serve", "--port", "0", "--log-level", "debug"]
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
    serve = ServeProcess(process)
    assert process.stderr is not None
    nursery.start_soon(serve.pump, process.stderr)
    try:
        await serve.wait_for(r"listening on ws://", timeout=STARTUP_TIMEOUT)
        yield serve
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()


def engine_pid(serve: ServeProcess, count: int = 1) -> int:
    for m in [re.search(r"engine ready .* pid (\d+)", line) for line in serve.lines]:
        if m:
            count -= 1
            if count == 0:
                return int(m.group(1))
    raise AssertionError("engine not ready")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its parent.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_real_prompt_streams_real_tokens(serve_process: ServeProcess) -> None:
    async with open_websocket_url(serve_process.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=24))
        events = (await collect_until_terminal(ws)).popitem()[1]
    done = events[-1]
    assert done["type"] == "done", events[-3:]
    tokens = [e for e in events if e["type"] == "token"]
    assert len(tokens) >= 16
    assert text_of(events).strip()
    assert done["usage"]["completion_tokens"] >= 16
    # llama.cpp sends no usage chunk, so the gateway counted the deltas and says so.
    assert done["usage"]["source"] == "gateway"
    assert events[0]["type"] == "start"
    assert events[0]["model"] == "gemma3-270m"


async def test_two_multiplexed_prompts_both_complete(serve_process: ServeProcess) -> None:
    async with open_websocket_url(serve_process.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=20, id="one"))
        await send(ws, chat("The capital of France is", max_tokens=20, id="two"))
        events = await collect_until_terminal(ws, {"one", "two"})
    for rid in ("one", "two"):
        assert events[rid][-1]["type"] == "done", events[rid][-1]
        assert len([e for e in events[rid] if e["type"] == "token"]) >= 10
    # The engine runs one generation at a time, so the second waited in trioai's queue.
    assert [e["position"] for e in events["two"] if e["type"] == "queued"] == [1]


async def test_cancel_mid_stream_stops_the_engine(serve_process: ServeProcess) -> None:
    async with open_websocket_url(serve_process.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=1500, id="long"))
        tokens = 0
        while tokens < 3:
            event = await recv(ws, timeout=60)
            tokens += event["type"] == "token"
        await send(ws, {"type": "cancel", "id": "long"})
        events = await collect_until_terminal(ws, {"long"})
        assert events["long"][-1] == {"type": "cancelled", "id": "long"}
        # llama.cpp's server says so when the client side of a stream goes away mid-generation.
        await serve_process.wait_for(r"engine: Disconnected from client", timeout=30)
        await serve_process.wait_for(r"id=long outcome=cancelled")
        # The engine is free again: the next request is served without waiting for 1500 tokens.
        await send(ws, chat(PROMPT, max_tokens=8, id="next"))
        after = await collect_until_terminal(ws, {"next"})
        assert after["next"][-1]["type"] == "done"
        assert not [e for e in after["next"] if e["type"] == "queued"]


async def test_engine_death_is_reported_and_recovered(serve_process: ServeProcess) -> None:
    first_pid = engine_pid(serve_process)
    async with open_websocket_url(serve_process.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=1500, id="doomed"))
        while (await recv(ws, timeout=60))["type"] != "token":
            pass
        os.kill(first_pid, signal.SIGKILL)
        events = await collect_until_terminal(ws, {"doomed"})
        error = events["doomed"][-1]
        assert error["type"] == "error"
        assert error["code"] == "upstream_unavailable"
        await serve_process.wait_for(r"engine ready", count=2, timeout=120)
        assert engine_pid(serve_process, 2) != first_pid
        await send(ws, chat(PROMPT, max_tokens=16, id="after"))
        after = await collect_until_terminal(ws, {"after"})
        assert after["after"][-1]["type"] == "done"
        assert len([e for e in after["after"] if e["type"] == "token"]) >= 8


async def test_sigterm_leaves_no_engine_process(serve_process: ServeProcess) -> None:
    pid = engine_pid(serve_process)
    assert pid_alive(pid)
    serve_process.process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await serve_process.process.wait()
    assert serve_process.process.returncode == 0
    with trio.fail_after(10):
        while pid_alive(pid):
            await trio.sleep(0.05)


async def test_sigkill_of_trioai_takes_the_engine_down_too(serve_process: ServeProcess) -> None:
    """PR_SET_PDEATHSIG: even a SIGKILL of trioai, which runs no cleanup, orphans nothing."""
    pid = engine_pid(serve_process)
    serve_process.process.kill()
    with trio.fail_after(10):
        await serve_process.process.wait()
        while pid_alive(pid):
            await trio.sleep(0.05)


def test_missing_engine_gets_one_clear_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    with pytest.raises(EngineMissing) as info:
        check_engine_installed()
    assert str(info.value) == MISSING_ENGINE_HELP
    assert "pip install 'trioai[local]'" in MISSING_ENGINE_HELP and "--upstream" in MISSING_ENGINE_HELP


async def test_engine_outlives_the_thread_that_started_it(serve_process: ServeProcess) -> None:
    """PR_SET_PDEATHSIG follows the thread that forked the engine, not the process. trio retires
    idle worker threads after 10 s; an engine forked from one was killed then (a real bug)."""
    pid = engine_pid(serve_process)
    await trio.sleep(12)
    assert pid_alive(pid)
    assert not [line for line in serve_process.lines if "engine exited" in line]
    async with open_websocket_url(serve_process.url) as ws:
        await send(ws, chat(PROMPT, max_tokens=8))
        events = next(iter((await collect_until_terminal(ws)).values()))
    assert events[-1]["type"] == "done"


# --- Resume: a generation outlives a connection cut mid-answer ---------------------------------------

async def test_a_cut_mid_answer_resumes_to_the_uninterrupted_text(
    serve_process: ServeProcess, nursery: trio.Nursery
) -> None:
    server = urlsplit(serve_process.url)
    assert server.hostname and server.port
    proxy = CutProxy(server.hostname, server.port)
    await nursery.start(proxy.serve)
    # The reference: the same request, uninterrupted (through the proxy, uncut). Run twice: greedy
    # llama.cpp gives the same text every time except the first after it starts, which evaluates the
    # prompt cold (later runs take it from its prompt cache) and drifts after ~25 tokens.
    async with open_websocket_url(proxy.url) as ws:
        for rid in ("warm", "whole"):
            await send(ws, resumable(PROMPT, rid))
            whole = await read_generation(ws, rid)
    check_one_generation(whole)
    assert whole[-1]["finish_reason"] == "length" and whole[-1]["usage"]["completion_tokens"] == RESUME_TOKENS

    # Cut a few tokens in, resumed on a direct connection: exactly the uninterrupted text. The gateway
    # counts llama.cpp's deltas: one per token, a few joined at most on the resume.
    events = await cut_and_resume(proxy, serve_process.url, PROMPT, whole)
    done = events[-1]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == RESUME_TOKENS, done
    # The engine ran it once: one log line of its end, and it was resumed, not restarted.
    await serve_process.wait_for(r"id=cut resumed after=")
    outcome = await serve_process.wait_for(r"id=cut outcome=(\S+)")
    assert outcome.group(1) == "done", outcome.group(0)
    assert len([line for line in serve_process.lines if re.search(r"id=cut outcome=", line)]) == 1


# --- OpenAI's SDK, in Responses WebSocket mode (/v1/responses) -------------------------------------


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
async def test_openai_sdk_responses_websocket_text(serve_process: ServeProcess) -> None:
    """The official SDK's sync client (in a worker thread) gets a real answer: the final output_text is
    exactly its streamed text deltas."""
    server = urlsplit(serve_process.url)
    base_url = f"http://{server.hostname}:{server.port}/v1"

    def run() -> tuple[str, Response]:
        with sdk_connection(base_url, ENGINE_LIMITS) as session:
            session.default.send({"type": "response.create", "input": PROMPT, "max_output_tokens": 24})
            events = until_terminal(session.default, timeout=ENGINE_TIMEOUT)
            return text_deltas(events), session.default.get_final_response(timeout=10)

    with trio.fail_after(180):
        deltas, response = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    assert response.status in ("completed", "incomplete"), response
    if response.status == "incomplete":
        assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text.strip()
    assert response.output_text == deltas
    assert response.model == "gemma3-270m"
    assert response.usage is not None and 1 <= response.usage.output_tokens <= 24
