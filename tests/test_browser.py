"""The chat page in real headless Chromium (Debian's, driven by Playwright): stream, Stop, several at
once, queue position, errors. Saves a screenshot to artifacts/chat-page.png."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioai.fake_upstream import FakeUpstream, Script
from trioai.server import chat_page

from .conftest import StartGateway
from .proxy import CutProxy
from .test_client import (
    COUNT,
    DONE_TOOL_CALLS,
    NUMBERED,
    USAGE,
    ScriptedServer,
    ScriptItem,
    engine_rich_script,
    numbered_script,
    rich_events,
)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def script(body: dict[str, Any]) -> Script:
    prompt = body["messages"][-1]["content"]
    if prompt == "long story":
        return Script(tokens=tuple(f"s{i} " for i in range(3000)), delay=0.01)
    if prompt == "fail":
        return Script(status=400, error_message="that prompt is not allowed")
    return Script(tokens=tuple(f"{w} " for w in prompt.split()) * 3, delay=0.01)


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `apt-get install chromium` (scripts/test does it)")
    return path


@contextmanager
def open_chat_page(chromium: str, page_url: str, *, record_states: bool = False,
                   sent: list[str] | None = None) -> Iterator[Any]:
    """Headless Chromium on the chat page at ``page_url``, once it shows itself connected; closed after.

    ``record_states`` adds STATE_RECORDER (``window.__states``); ``sent`` collects every frame the
    page sends on its WebSockets.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            if record_states:
                page.add_init_script(STATE_RECORDER)
            if sent is not None:
                page.on("websocket", lambda socket: socket.on("framesent", lambda payload: sent.append(str(payload))))
            page.goto(page_url)
            page.wait_for_selector("#status.connected", timeout=10_000)
            yield page
        finally:
            browser.close()


def ask(page: Any, prompt: str) -> None:
    """Type ``prompt`` and send it."""
    page.fill("#prompt", prompt)
    page.click("#send")


def drive(chromium: str, page_url: str, screenshot: Path) -> dict[str, str]:
    seen: dict[str, str] = {}
    with open_chat_page(chromium, page_url) as page:
        # One prompt: tokens appear, then done with usage.
        ask(page, "hello browser")
        first = page.locator('.answer[data-id="b1"]')
        first.locator(".text").filter(has_text="hello").wait_for(timeout=10_000)
        page.wait_for_selector('.answer[data-id="b1"].state-done', timeout=10_000)
        seen["b1 text"] = first.locator(".text").inner_text()
        seen["b1 usage"] = first.locator(".usage").inner_text()

        # A long answer, stopped mid-stream; another queued behind it and then served.
        ask(page, "long story")
        long = page.locator('.answer[data-id="b2"]')
        long.locator(".text").filter(has_text="s3 ").wait_for(timeout=10_000)
        ask(page, "second question")
        queued = page.locator('.answer[data-id="b3"]')
        queued.locator(".state").filter(has_text="queued (position 1)").wait_for(timeout=10_000)
        seen["b3 queued"] = queued.locator(".state").inner_text()
        long.locator(".stop").click()
        page.wait_for_selector('.answer[data-id="b2"].state-cancelled', timeout=10_000)
        page.wait_for_selector('.answer[data-id="b3"].state-done', timeout=10_000)
        seen["b2 state"] = long.locator(".state").inner_text()
        seen["b3 text"] = queued.locator(".text").inner_text()

        # Errors are shown on their answer.
        ask(page, "fail")
        page.wait_for_selector('.answer[data-id="b4"].state-error', timeout=10_000)
        seen["b4 state"] = page.locator('.answer[data-id="b4"] .state').inner_text()

        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    return seen


async def test_chat_page_in_chromium(start_gateway: StartGateway, upstream: FakeUpstream, chromium: str) -> None:
    upstream.script = script
    server = await start_gateway(http_port=0, max_concurrency=1)
    assert server.http_url is not None
    async with httpx.AsyncClient() as client:
        page = await client.get(server.http_url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f'WS_PORT = "{server.port}"' in page.text
    screenshot = ARTIFACTS / "chat-page.png"
    with trio.fail_after(120):
        seen = await trio.to_thread.run_sync(drive, chromium, server.http_url + "/", screenshot)
    assert seen["b1 text"].strip() == "hello browser hello browser hello browser"
    assert "6 tokens" in seen["b1 usage"] and "first token" in seen["b1 usage"]
    assert seen["b3 queued"] == "queued (position 1)"
    assert seen["b2 state"] == "cancelled"
    assert seen["b3 text"].strip() == "second question second question second question"
    assert seen["b4 state"] == "error: invalid_request: that prompt is not allowed"
    assert screenshot.stat().st_size > 10_000
    long = next(r for r in upstream.requests if r.body["messages"][-1]["content"] == "long story")
    assert long.disconnected_at is not None  # Stop reached the engine


# Records, for every answer card, each change of (state text, answer length, card class) as the page
# renders it, so a test can check what the user saw between events, not only where it ended.
STATE_RECORDER = """
window.__states = {};
document.addEventListener("DOMContentLoaded", () => {
  const snapshot = () => {
    for (const card of document.querySelectorAll("#answers .answer")) {
      const row = [card.querySelector(".state").textContent, card.querySelector(".text").textContent.length,
                   card.className];
      const log = (window.__states[card.dataset.id] ||= []);
      const last = log[log.length - 1];
      if (!last || last.some((value, i) => value !== row[i])) log.push(row);
    }
  };
  new MutationObserver(snapshot).observe(document.getElementById("answers"),
                                         { childList: true, subtree: true, characterData: true, attributes: true });
});
"""


def queue_script(body: dict[str, Any]) -> Script:
    prompt = body["messages"][-1]["content"]
    if prompt == "first question":
        return Script(tokens=tuple(f"a{i} " for i in range(30)), delay=0.05)  # ~1.5 s: the second one waits
    return Script(tokens=tuple(f"b{i} " for i in range(40)), delay=0.05)  # slow enough to look at mid-stream


def drive_queue(chromium: str, page_url: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with open_chat_page(chromium, page_url, record_states=True) as page:
        # Two questions, one right after the other, with one engine slot.
        ask(page, "first question")
        ask(page, "second question")
        second = page.locator('.answer[data-id="b2"]')
        second.locator(".state").filter(has_text="queued (position 1)").wait_for(timeout=10_000)
        seen["b1 done while b2 queued"] = page.locator('.answer[data-id="b1"].state-done').count() > 0

        # The second one's tokens stream: look at its status while they do.
        second.locator(".text").filter(has_text="b3 ").wait_for(timeout=10_000)
        seen["b2 mid-stream"] = page.evaluate(
            """() => { const c = document.querySelector('.answer[data-id="b2"]');
                       return { state: c.querySelector('.state').textContent, cls: c.className }; }""")
        page.wait_for_selector('.answer[data-id="b2"].state-done', timeout=10_000)
        seen["b1 state"] = page.locator('.answer[data-id="b1"] .state').inner_text()
        seen["b2 state"] = second.locator(".state").inner_text()
        seen["b2 text"] = second.locator(".text").inner_text()
        seen["history"] = page.evaluate("() => window.__states")
    return seen


async def test_queued_status_clears_once_tokens_stream(
    start_gateway: StartGateway, upstream: FakeUpstream, chromium: str
) -> None:
    """Issue 13: a queued answer kept saying "queued (position 1)" while its tokens streamed."""
    upstream.script = queue_script
    server = await start_gateway(http_port=0, max_concurrency=1)
    assert server.http_url is not None
    with trio.fail_after(120):
        seen = await trio.to_thread.run_sync(drive_queue, chromium, server.http_url + "/")
    history: dict[str, list[list[Any]]] = seen["history"]
    assert not seen["b1 done while b2 queued"]  # the second question really waited behind the first
    # The first was admitted at once: never shown as queued.
    assert history["b1"] and not any("queued" in state for state, _, _ in history["b1"]), history["b1"]
    # The second showed its place in line while it had no text...
    assert ["queued (position 1)", 0] in [row[:2] for row in history["b2"]], history["b2"]
    # ...and not once its tokens started to arrive, nor mid-stream, nor at the end.
    assert not any("queued" in state for state, length, _ in history["b2"] if length > 0), history["b2"]
    assert "queued" not in seen["b2 mid-stream"]["state"], seen["b2 mid-stream"]
    assert "state-done" not in seen["b2 mid-stream"]["cls"]  # it really was looked at mid-stream
    assert seen["b1 state"] == "done" and seen["b2 state"] == "done"
    assert seen["b2 text"].strip() == " ".join(f"b{i}" for i in range(40))
    assert len(upstream.requests) == 2


# --- Reasoning and tool calls, against a scripted server (tests/test_client.py's ScriptedServer). ------

TOOLS_SHOWN = ['get_weather({"city": "Paris"})', 'get_time({"tz": "CET"})']


def page_script(before_done: trio.Event) -> Callable[[dict[str, Any]], list[ScriptItem]]:
    def script(message: dict[str, Any]) -> list[ScriptItem]:
        prompt = message["messages"][-1]["content"]
        if prompt == "weather?":
            # Waits in line first, then thinks (no answer text yet), answers, calls two functions;
            # `done` waits until the test has looked at the calls built from the fragments.
            events = rich_events()
            paced: list[ScriptItem] = [events[0], {"type": "queued", "position": 1}, 0.3]
            for event in events[1:-1]:
                paced += [event, 0.05]
            return [*paced, before_done, events[-1]]
        if prompt == "calls in done only":
            return [{"type": "start", "model": "m"}, DONE_TOOL_CALLS]
        return [{"type": "start", "model": "m"}, {"type": "token", "content": f"plain {prompt}"},
                {"type": "done", "finish_reason": "stop", "usage": USAGE}]

    return script


def card_info(page: Any, card_id: str) -> dict[str, Any]:
    info: dict[str, Any] = page.evaluate(
        """(id) => { const c = document.querySelector(`.answer[data-id="${id}"]`);
                     const r = c.querySelector("details.reasoning"), t = c.querySelector(".tools");
                     return { state: c.querySelector(".state").textContent, text: c.querySelector(".text").textContent,
                              reasoningHidden: r.hidden, reasoningOpen: r.open,
                              summary: r.querySelector("summary").textContent,
                              reasoning: r.querySelector(".reasoning-text").textContent, toolsHidden: t.hidden,
                              tools: [...t.querySelectorAll("li")].map((li) => li.textContent) }; }""",
        card_id)
    return info


def drive_reasoning(chromium: str, page_url: str, before_done: trio.Event, screenshot: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    with open_chat_page(chromium, page_url, record_states=True) as page:
        ask(page, "weather?")
        card = page.locator('.answer[data-id="b1"]')
        card.locator(".tool").filter(has_text='"CET"}').wait_for(timeout=10_000)
        seen["b1 before done"] = card_info(page, "b1")
        trio.from_thread.run_sync(before_done.set)
        page.wait_for_selector('.answer[data-id="b1"].state-done', timeout=10_000)
        seen["b1 done"] = card_info(page, "b1")

        ask(page, "calls in done only")
        page.wait_for_selector('.answer[data-id="b2"].state-done', timeout=10_000)
        seen["b2"] = card_info(page, "b2")

        ask(page, "hello")
        page.wait_for_selector('.answer[data-id="b3"].state-done', timeout=10_000)
        seen["b3"] = card_info(page, "b3")
        seen["history"] = page.evaluate("() => window.__states")

        card.locator("details.reasoning summary").click()  # the user opens it
        seen["b1 opened"] = card.locator(".reasoning-text").inner_text()
        page.screenshot(path=str(screenshot), full_page=True)
    return seen


async def test_reasoning_and_tool_calls_on_the_page(nursery: trio.Nursery, chromium: str, tmp_path: Path) -> None:
    before_done = trio.Event()
    scripted = ScriptedServer(page_script(before_done))
    await nursery.start(scripted.serve)
    page_file = tmp_path / "index.html"
    page_file.write_bytes(chat_page(scripted.port, False))
    screenshot = ARTIFACTS / "chat-page-reasoning.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with trio.fail_after(120):
        seen = await trio.to_thread.run_sync(drive_reasoning, chromium, f"{page_file.as_uri()}?ws={scripted.url}",
                                             before_done, screenshot)
    reasoning = "The user asks for the weather."
    # While streaming: the reasoning collapsed above the answer, the calls built from their fragments.
    assert seen["b1 before done"] == {
        "state": "streaming", "text": "Checking.", "reasoningHidden": False, "reasoningOpen": False,
        "summary": "Reasoning", "reasoning": reasoning, "toolsHidden": False, "tools": TOOLS_SHOWN}
    assert seen["b1 done"] == {**seen["b1 before done"], "state": "done"}
    assert seen["b1 opened"] == reasoning
    # Calls that only `done` carries are shown too; an answer without either shows neither block.
    assert seen["b2"]["tools"] == TOOLS_SHOWN and not seen["b2"]["toolsHidden"] and seen["b2"]["reasoningHidden"]
    assert seen["b3"] == {"state": "done", "text": "plain hello", "reasoningHidden": True, "reasoningOpen": False,
                          "summary": "Reasoning", "reasoning": "", "toolsHidden": True, "tools": []}
    # The status went queued -> streaming at the first reasoning event, before any answer text.
    states = [row[:2] for row in seen["history"]["b1"]]
    assert ["queued (position 1)", 0] in states, states
    streaming_at = states.index(["streaming", 0])
    assert streaming_at > states.index(["queued (position 1)", 0])
    assert not any("queued" in state for state, _ in states[streaming_at:]), states
    assert screenshot.stat().st_size > 10_000


def drive_end_to_end(chromium: str, page_url: str) -> dict[str, Any]:
    with open_chat_page(chromium, page_url) as page:
        ask(page, "weather?")
        page.wait_for_selector('.answer[data-id="b1"].state-done', timeout=10_000)
        return card_info(page, "b1")


async def test_end_to_end_reasoning_and_tool_calls(
    start_gateway: StartGateway, upstream: FakeUpstream, chromium: str
) -> None:
    """Through the real gateway (its page and WebSocket) and the fake engine scripting reasoning and calls."""
    upstream.script = engine_rich_script
    server = await start_gateway(http_port=0)
    assert server.http_url is not None
    with trio.fail_after(120):
        seen = await trio.to_thread.run_sync(drive_end_to_end, chromium, server.http_url + "/")
    assert seen == {"state": "done", "text": "Checking.", "reasoningHidden": False, "reasoningOpen": False,
                    "summary": "Reasoning", "reasoning": "The user asks for the weather.", "toolsHidden": False,
                    "tools": TOOLS_SHOWN}


# --- Resume: an answer survives a cut connection (tests/proxy.py between the page and the gateway). ---


def drive_resume(chromium: str, page_url: str) -> dict[str, Any]:
    sent: list[str] = []
    with open_chat_page(chromium, page_url, record_states=True, sent=sent) as page:
        page.locator("details summary").first.click()  # Settings
        page.fill("#max", str(COUNT))
        ask(page, "count")
        page.wait_for_selector('.answer[data-id="b1"]:is(.state-done, .state-error, .state-cancelled)',
                               timeout=30_000)
        seen = card_info(page, "b1")
        seen["usage"] = page.locator('.answer[data-id="b1"] .usage').inner_text()
        seen["history"] = page.evaluate("() => window.__states")["b1"]
        seen["sent"] = [json.loads(frame) for frame in sent]
        return seen


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_page_resumes_an_answer_after_a_cut(
    nursery: trio.Nursery, start_gateway: StartGateway, upstream: FakeUpstream, chromium: str, rst: bool
) -> None:
    upstream.script = numbered_script
    server = await start_gateway(http_port=0)
    assert server.http_url is not None
    proxy = CutProxy("127.0.0.1", server.port)
    await nursery.start(proxy.serve)
    proxy.rst = rst
    proxy.cut_after = 3000  # the page's WebSocket goes through the proxy, cut mid-answer
    with trio.fail_after(120):
        seen = await trio.to_thread.run_sync(drive_resume, chromium, f"{server.http_url}/?ws={proxy.url}")
    assert seen["state"] == "done"
    assert seen["text"] == NUMBERED  # the whole answer, once
    assert "reconnected" in seen["usage"]
    assert len(proxy.relays) == 2 and proxy.relays[0].to_client == 3000
    assert len(upstream.requests) == 1  # resumed, not asked again
    message, resume = seen["sent"]
    assert message["type"] == "message" and message["resumable"] is True
    assert resume["type"] == "resume" and resume["id"] == "b1" and resume["resume_token"]
    assert 1 < resume["after"] < COUNT + 2  # the last seq it had: mid-answer
    # What the user saw: "reconnecting…" with part of the text, then the rest; never an error.
    states = [row[:2] for row in seen["history"]]
    assert any(state == "reconnecting…" and 0 < length < len(NUMBERED) for state, length in states), states
    assert not any("error" in state for state, _ in states), states
