"""Retries before the first token: only for failures that may pass, never once text was sent."""

from __future__ import annotations

from typing import Any

import pytest

from trioai.fake_upstream import FakeUpstream, Script
from trioai.upstream import MAX_RETRY_AFTER, parse_retry_after

from .conftest import StartGateway
from .helpers import chat, collect_until_terminal, connect, send

OK = Script(tokens=("fine ", "now "))


def failing_first(count: int, failure: Script) -> Any:
    """A script that fails ``count`` times, then answers."""
    calls = 0

    def script(body: dict[str, Any]) -> Script:
        nonlocal calls
        calls += 1
        return failure if calls <= count else OK

    return script


async def run_one(start_gateway: StartGateway, **overrides: Any) -> list[dict[str, Any]]:
    server = await start_gateway(**overrides)
    async with connect(server) as ws:
        await send(ws, chat("x", id="q"))
        return (await collect_until_terminal(ws, {"q"}))["q"]


@pytest.mark.parametrize("failure", [Script(status=503), Script(status=429), Script(tokens=("a ",), drop_after=0)])
async def test_passing_failures_are_retried(
    start_gateway: StartGateway, upstream: FakeUpstream, failure: Script
) -> None:
    upstream.script = failing_first(2, failure)
    events = await run_one(start_gateway)
    assert [e["type"] for e in events] == ["start", "token", "done"] or [e["type"] for e in events] == [
        "start", "token", "token", "done"]
    assert "".join(e["content"] for e in events if e["type"] == "token") == "fine now "
    assert len(upstream.requests) == 3


async def test_retries_are_bounded(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(status=503)
    events = await run_one(start_gateway, upstream_retries=1)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_unavailable"
    assert len(upstream.requests) == 2


async def test_no_retry_once_a_token_was_sent(start_gateway: StartGateway, upstream: FakeUpstream) -> None:
    upstream.script = failing_first(1, Script(tokens=("a ", "b ", "c "), drop_after=2))
    events = await run_one(start_gateway)
    assert events[-1]["code"] == "upstream_disconnected"
    assert "".join(e["content"] for e in events if e["type"] == "token") == "a b "
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("failure", "code"),
    [(Script(status=400), "invalid_request"), (Script(status=500), "upstream_error"),
     (Script(tokens=("a ",), stall_after=0), "upstream_timeout")],
)
async def test_failures_that_would_fail_again_are_not_retried(
    start_gateway: StartGateway, upstream: FakeUpstream, failure: Script, code: str
) -> None:
    upstream.script = lambda body: failure
    events = await run_one(start_gateway, first_token_timeout=0.3)
    assert events[-1]["type"] == "error" and events[-1]["code"] == code
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("2", 2.0), (" 0.5 ", 0.5), ("0", 0.0), ("86400", MAX_RETRY_AFTER),
     pytest.param("9" * 400, MAX_RETRY_AFTER, id="400 nines"), ("inf", None), ("Infinity", None), ("1e999", None),
     ("nan", None), ("-5", None), ("+5", None), ("1_000", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("", None), ("٣", None)],
)
def test_retry_after_is_finite_and_capped(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    ("header", "retry_after"), [("inf", None), ("nan", None), ("-5", None), ("86400", MAX_RETRY_AFTER)]
)
async def test_an_absurd_retry_after_is_an_error_event_not_a_closed_connection(
    start_gateway: StartGateway, upstream: FakeUpstream, status: int, header: str, retry_after: float | None
) -> None:
    failure = Script(status=status, response_headers=(("retry-after", header),))
    upstream.script = lambda body: OK if body["messages"][0]["content"] == "ok" else failure
    server = await start_gateway(upstream_retries=0)
    async with connect(server) as ws:
        await send(ws, chat("x", id="q"))
        error = (await collect_until_terminal(ws, {"q"}))["q"][-1]
        assert error["type"] == "error"
        assert error["code"] == ("upstream_overloaded" if status == 429 else "upstream_unavailable")
        assert error.get("retry_after") == retry_after
        await send(ws, chat("ok", id="next"))  # the same connection goes on serving
        assert (await collect_until_terminal(ws, {"next"}))["next"][-1]["type"] == "done"
    assert [r.body["messages"][0]["content"] for r in upstream.requests] == ["x", "ok"]
