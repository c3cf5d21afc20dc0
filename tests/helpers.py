"""Client-side helpers shared by the socket-level tests."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from trioai.server import RunningServer

from .proxy import CutProxy

TERMINAL = ("done", "cancelled", "error")


@asynccontextmanager
async def connect(server: RunningServer) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket to the server's chat endpoint."""
    async with open_websocket_url(server.url) as ws:
        yield ws


async def send(ws: WebSocketConnection, event: dict[str, Any]) -> None:
    """Send one JSON event."""
    await ws.send_message(json.dumps(event))


async def recv(ws: WebSocketConnection, timeout: float = 10.0, *, keep_seq: bool = False) -> dict[str, Any]:
    """Receive one JSON event (fails the test after ``timeout`` seconds).

    A generation's events carry ``seq``; it is dropped unless ``keep_seq``, so that tests written
    for the events as old clients see them compare whole events (``seq`` has tests of its own).
    """
    with trio.fail_after(timeout):
        event: dict[str, Any] = json.loads(await ws.get_message())
    if not keep_seq:
        event.pop("seq", None)
    return event


def chat(content: str, max_tokens: int = 5, **extra: Any) -> dict[str, Any]:
    """A ``message`` event with one user message."""
    return {"type": "message", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


async def collect_until_terminal(
    ws: WebSocketConnection, ids: set[Any] | None = None
) -> dict[Any, list[dict[str, Any]]]:
    """Receive events until every id in ``ids`` (or the first request seen) has a terminal event.

    Returns each id's events in arrival order, and asserts that none arrives after its terminal one.
    """
    events: dict[Any, list[dict[str, Any]]] = {}
    finished: set[Any] = set()
    while True:
        event = await recv(ws)
        rid = event.get("id")
        assert rid not in finished, f"event after terminal for {rid!r}: {event}"
        events.setdefault(rid, []).append(event)
        if event["type"] in TERMINAL:
            finished.add(rid)
        wanted = ids if ids is not None else set(events)
        if wanted and wanted <= finished:
            return events


def echo_tokens(content: str, max_tokens: int) -> list[str]:
    """The fake engine's default answer: the prompt's words, cycled, ``max_tokens`` of them."""
    words = content.split()
    return [f"{words[i % len(words)]} " for i in range(max_tokens)]


def count_tasks() -> int:
    """Every task in the run, walking down from the root."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None, "count_tasks() runs inside trio.run"
    return walk(root)


async def settle() -> None:
    """Let every task that can run, run."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True,
          length: int | None = None, long_length: bool = False) -> bytes:
    """One client WebSocket frame built by hand, masked unless told otherwise (so it can be wrong on purpose).

    ``length`` announces another size than the payload's; ``long_length`` uses the 16-bit length
    form even for a short payload (not minimal, which RFC 6455 forbids).
    """
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if mask else 0
    if size < 126 and not long_length:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_generation(ws: WebSocketConnection, rid: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    """``rid``'s events, ``seq`` kept, up to its terminal one (other ids' events are skipped)."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] not in TERMINAL:
        event = await recv(ws, timeout=timeout, keep_seq=True)
        if event.get("id") == rid:
            events.append(event)
    return events


async def read_until_cut(ws: WebSocketConnection, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every event, as sent, until the connection drops."""
    events: list[dict[str, Any]] = []
    with trio.fail_after(timeout):
        try:
            while True:
                events.append(json.loads(await ws.get_message()))
        except ConnectionClosed:
            return events


def check_one_generation(events: list[dict[str, Any]]) -> None:
    """seq 1, 2, 3 … without gap or repeat; exactly one terminal event, a done, at the end."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), [e["seq"] for e in events]
    assert [e["type"] in TERMINAL for e in events].count(True) == 1 and events[-1]["type"] == "done", events[-1]


def text_of(events: list[dict[str, Any]]) -> str:
    """The answer's text: its token events' content, joined."""
    return "".join(e["content"] for e in events if e["type"] == "token")


async def read_through_cut(url: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``request`` on a new connection to ``url`` (a :class:`CutProxy`'s): every event, as sent, until the cut."""
    async with open_websocket_url(url) as ws:
        await send(ws, request)
        return await read_until_cut(ws)


async def resume_after(url: str, rid: Any, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """On a new connection to ``url``, resume ``rid`` after the last of ``before`` (its first event, ``start``,
    carries the token): its events, ``seq`` kept, up to its terminal one."""
    async with open_websocket_url(url) as ws:
        await send(ws, {"type": "resume", "id": rid, "resume_token": before[0]["resume_token"],
                        "after": before[-1]["seq"]})
        return await read_generation(ws, rid)


# --- A real engine's answer cut mid-way and resumed (tests/test_engine.py, tests/test_vllm.py) -------

RESUME_TOKENS = 48
# Bytes of the server's answer let through before the cut: the 101 handshake (~160), start with its
# token (~120) and the first few token events (~55 each). A whole 48-token answer takes ~2,900.
RESUME_CUT_AFTER = 600


def resumable(prompt: str, rid: str) -> dict[str, Any]:
    """A greedy, seeded, resumable request for ``RESUME_TOKENS`` tokens."""
    return chat(prompt, max_tokens=RESUME_TOKENS, id=rid, resumable=True, temperature=0, seed=7)


async def cut_and_resume(proxy: CutProxy, resume_url: str, prompt: str,
                         whole: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``resumable(prompt, "cut")`` through ``proxy``, cut after ``RESUME_CUT_AFTER`` bytes (a few tokens
    in), then resumed on a new connection to ``resume_url``: its events, checked whole
    (:func:`check_one_generation`) and with exactly the text of ``whole``, the same request uncut."""
    proxy.cut_after = RESUME_CUT_AFTER
    before = await read_through_cut(proxy.url, resumable(prompt, "cut"))
    assert before[0]["type"] == "start" and before[-1]["type"] == "token", before[-1:]
    assert 2 <= len(before) - 1 <= RESUME_TOKENS // 3, f"cut after {len(before) - 1} tokens, not a few"
    after = await resume_after(resume_url, "cut", before)
    events = before + after
    check_one_generation(events)
    assert text_of(events) == text_of(whole)  # greedy: no gap, no duplicate, nothing re-generated
    assert len(after) >= 2 and len([e for e in events if e["type"] == "token"]) <= RESUME_TOKENS
    return events


async def serve_fails_to_start(*options: str) -> str:
    """``trioai serve`` with ``options`` (and an upstream nothing listens on) run to its end, which must be
    a clean startup failure: exit status 1, no traceback. Returns its stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "trioai", "serve", "--port", "0", "--upstream", "http://127.0.0.1:9/v1", *options],
        check=False, capture_stderr=True,
    )
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr
    return result.stderr.decode()
