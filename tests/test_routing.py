"""Several engines, the pure parts: [[engines]] parsing, routing (choose), engine health and load,
vLLM metrics parsing, continuation requests, usage across engines, the fake engine's continuation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from trioai.cli import main
from trioai.config import ConfigError, Settings, load_settings
from trioai.enginepool import (
    FIRST_BACKOFF,
    KV_CACHE_FULL,
    LOCALITY_SLACK,
    MAX_BACKOFF,
    Engine,
    EngineLoad,
    EnginePool,
    choose,
    is_engine_fault,
    metrics_url,
    parse_engine_metrics,
)
from trioai.enginespec import MAX_ENGINES, MAX_NAME_LENGTH, EngineSpec, combine, default_name, parse_engine_tables
from trioai.errors import ErrorCode, UpstreamError
from trioai.fake_upstream import FakeUpstream, Script, continuation_problem, continued_text, numbered_script
from trioai.gateway import NOT_CONTINUABLE, Progress, continuation, payload, trailing_whitespace
from trioai.protocol import ChatRequest, Sampling, Usage
from trioai.server import RunningServer, serve
from trioai.upstream import Upstream

from .helpers import chat, connect, recv, send, text_of

# --- [[engines]] tables ------------------------------------------------------------------------------


def parse_one(**table: Any) -> EngineSpec:
    """One [[engines]] table parsed."""
    (spec,) = parse_engine_tables([table], "f.toml: engines")
    return spec


def test_a_full_table_is_parsed_with_every_key() -> None:
    spec = parse_one(url=" http://10.0.0.5:8000/v1/ ", name="gpu-a", api_key="k", models=["m1", "m2"],
                     max_concurrency=32, weight=2, metrics=True, **{"continue": False})
    assert spec == EngineSpec("http://10.0.0.5:8000/v1", "gpu-a", "k", ("m1", "m2"), 32, 2.0,
                              can_continue=False, metrics=True)
    assert isinstance(spec.weight, float)


def test_a_table_with_only_a_url_gets_the_defaults() -> None:
    spec = parse_one(url="https://engine.example/v1")
    assert spec == EngineSpec("https://engine.example/v1", "engine.example:443", None, None, None, 1.0,
                              can_continue=True, metrics=None)
    assert parse_one(url="http://h:1/v1", metrics=False).metrics is False
    assert parse_one(url="http://h:1/v1", **{"continue": True}).can_continue is True


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://10.0.0.5:8000/v1", "10.0.0.5:8000"),
        ("http://gpu-a/v1", "gpu-a:80"),
        ("https://gpu-a/v1", "gpu-a:443"),
        ("http://[::1]:8000/v1", "[::1]:8000"),
        ("https://[fe80::1]/v1", "[fe80::1]:443"),
        ("http://GPU.example:9/v1", "gpu.example:9"),  # urlsplit lower-cases the host
    ],
)
def test_default_names_are_host_and_port(url: str, name: str) -> None:
    assert default_name(url) == name
    assert parse_one(url=url).name == name


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "http://h:1/v1", "colour": "red"}, r"engines\[0\]: unknown key 'colour' \(known: api_key, "),
        ({"url": "http://h:1/v1", "b": 1, "a": 2}, r"unknown key 'a'"),  # the first in order
        ({"name": "x"}, r"engines\[0\]: 'url' is required"),
        ({"url": ""}, r"engines\[0\]\.url must be a non-empty string"),
        ({"url": 8000}, r"engines\[0\]\.url must be a non-empty string"),
        ({"url": "ftp://h/v1"}, r"must be an http:// or https:// base URL, got 'ftp://h/v1'"),
        ({"url": "h:8000/v1"}, r"must be an http:// or https:// base URL"),
        ({"url": "http:///v1"}, r"must be an http:// or https:// base URL"),
        ({"url": "http://h:99999/v1"}, r"engines\[0\]\.url is not a valid URL: 'http://h:99999/v1'"),
        ({"url": "http://h:port/v1"}, r"is not a valid URL"),
        ({"url": "http://h:1/v1", "name": ""}, rf"\.name must be 1 to {MAX_NAME_LENGTH} printable characters"),
        ({"url": "http://h:1/v1", "name": "x" * (MAX_NAME_LENGTH + 1)}, r"\.name must be 1 to"),
        ({"url": "http://h:1/v1", "name": "a\nb"}, r"\.name must be 1 to"),
        ({"url": "http://h:1/v1", "name": 7}, r"\.name must be 1 to"),
        ({"url": "http://h:1/v1", "api_key": ""}, r"\.api_key must be a non-empty string"),
        ({"url": "http://h:1/v1", "api_key": 12}, r"\.api_key must be a non-empty string"),
        ({"url": "http://h:1/v1", "models": []}, r"\.models must be a non-empty array of model names"),
        ({"url": "http://h:1/v1", "models": "m"}, r"\.models must be a non-empty array"),
        ({"url": "http://h:1/v1", "models": ["m", ""]}, r"\.models must be a non-empty array"),
        ({"url": "http://h:1/v1", "models": ["m", 3]}, r"\.models must be a non-empty array"),
        ({"url": "http://h:1/v1", "models": ["x" * 257]}, r"\.models must be a non-empty array"),
        ({"url": "http://h:1/v1", "models": ["m", "n", "m"]}, r"\.models lists a model twice"),
        ({"url": "http://h:1/v1", "max_concurrency": 0}, r"\.max_concurrency must be a positive integer"),
        ({"url": "http://h:1/v1", "max_concurrency": -3}, r"\.max_concurrency must be a positive integer"),
        ({"url": "http://h:1/v1", "max_concurrency": 2.5}, r"\.max_concurrency must be a positive integer"),
        ({"url": "http://h:1/v1", "max_concurrency": True}, r"\.max_concurrency must be a positive integer"),
        ({"url": "http://h:1/v1", "weight": 0}, r"\.weight must be a positive number"),
        ({"url": "http://h:1/v1", "weight": -1.5}, r"\.weight must be a positive number"),
        ({"url": "http://h:1/v1", "weight": math.inf}, r"\.weight must be a positive number"),
        ({"url": "http://h:1/v1", "weight": math.nan}, r"\.weight must be a positive number"),
        ({"url": "http://h:1/v1", "weight": True}, r"\.weight must be a positive number"),
        ({"url": "http://h:1/v1", "weight": "2"}, r"\.weight must be a positive number"),
        ({"url": "http://h:1/v1", "continue": "yes"}, r"engines\[0\]\.continue must be true or false"),
        ({"url": "http://h:1/v1", "continue": 1}, r"\.continue must be true or false"),
        ({"url": "http://h:1/v1", "metrics": "auto"}, r"engines\[0\]\.metrics must be true or false"),
    ],
)
def test_every_bad_table_names_the_table_and_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_engine_tables([table], "f.toml: engines")


def test_the_index_of_the_bad_table_is_named() -> None:
    with pytest.raises(ValueError, match=r"^f\.toml: engines\[1\]\.weight must be"):
        parse_engine_tables([{"url": "http://a:1/v1"}, {"url": "http://b:1/v1", "weight": 0}], "f.toml: engines")


@pytest.mark.parametrize("tables", [{"url": "http://h:1/v1"}, ["http://h:1/v1"], [{"url": "http://h:1/v1"}, 3]])
def test_engines_must_be_an_array_of_tables(tables: Any) -> None:
    with pytest.raises(ValueError, match=r"engines must be an array of tables \(\[\[engines\]\]\)"):
        parse_engine_tables(tables, "engines")


def test_at_most_max_engines() -> None:
    tables = [{"url": f"http://h:{port}/v1"} for port in range(1, MAX_ENGINES + 2)]
    with pytest.raises(ValueError, match=f"at most {MAX_ENGINES} engines"):
        parse_engine_tables(tables, "engines")
    assert len(parse_engine_tables(tables[:MAX_ENGINES], "engines")) == MAX_ENGINES


def test_combine_puts_upstream_urls_first_and_fills_in_max_concurrency() -> None:
    tables = parse_engine_tables([{"url": "http://c:3/v1", "name": "c", "max_concurrency": 5},
                                  {"url": "http://d:4/v1", "name": "d"}], "engines")
    specs = combine(["http://a:1/v1/", "http://[::1]:2/v1"], tables, 16)
    assert [(s.url, s.name, s.max_concurrency) for s in specs] == [
        ("http://a:1/v1", "a:1", 16), ("http://[::1]:2/v1", "[::1]:2", 16), ("http://c:3/v1", "c", 5),
        ("http://d:4/v1", "d", 16)]
    assert combine([], (), 16) == ()


@pytest.mark.parametrize(
    ("urls", "tables", "message"),
    [
        (["http://a:1/v1", "http://a:1/v1/"], [], r"engine http://a:1/v1 is configured twice"),
        (["http://a:1/v1"], [{"url": "http://a:1/v1", "name": "other"}], r"engine http://a:1/v1 is configured twice"),
        ([], [{"url": "http://a:1/v1", "name": "x"}, {"url": "http://a:1/v1", "name": "y"}], r"configured twice"),
        ([], [{"url": "http://a:1/v1", "name": "x"}, {"url": "http://b:1/v1", "name": "x"}],
         r"two engines are named 'x' \(http://a:1/v1 and http://b:1/v1\): give them distinct names"),
        (["http://a:1/v1"], [{"url": "http://b:1/v1", "name": "a:1"}], r"two engines are named 'a:1'"),
        (["http://a:1/v1", "http://a:1/other/v1"], [], r"two engines are named 'a:1'"),  # same host:port
        (["ftp://a/v1"], [], r"upstream 'ftp://a/v1' must be an http:// or https:// base URL"),
    ],
)
def test_combine_rejects_duplicates_and_bad_urls(urls: list[str], tables: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        combine(urls, parse_engine_tables(tables, "engines"), 16)


# --- the settings: a config file, --upstream ----------------------------------------------------------


def test_load_settings_reads_engines_tables_and_an_upstream_list(tmp_path: Path) -> None:
    path = tmp_path / "trioai.toml"
    path.write_text('upstream = ["http://a:1/v1", "http://b:2/v1"]\nmax_concurrency = 8\n\n'
                    '[[engines]]\nurl = "http://c:3/v1"\nname = "gpu-c"\nmodels = ["m"]\nweight = 3\n\n'
                    '[[engines]]\nurl = "http://[::1]:4/v1"\nmax_concurrency = 2\n"continue" = false\n')
    settings = load_settings({}, {}, path)
    assert settings.upstream == "http://a:1/v1 http://b:2/v1"
    specs = settings.engine_specs()
    assert [(s.url, s.name, s.models, s.max_concurrency, s.weight, s.can_continue) for s in specs] == [
        ("http://a:1/v1", "a:1", None, 8, 1.0, True),
        ("http://b:2/v1", "b:2", None, 8, 1.0, True),
        ("http://c:3/v1", "gpu-c", ("m",), 8, 3.0, True),
        ("http://[::1]:4/v1", "[::1]:4", None, 2, 1.0, False),
    ]


def test_an_upstream_on_the_command_line_replaces_the_files(tmp_path: Path) -> None:
    path = tmp_path / "trioai.toml"
    path.write_text('upstream = ["http://a:1/v1"]\n[[engines]]\nurl = "http://c:3/v1"\n')
    settings = load_settings({"upstream": "http://z:9/v1"}, {}, path)
    assert [s.name for s in settings.engine_specs()] == ["z:9", "c:3"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[engines]]\nurl = "http://c:3/v1"\nport = 1\n', r"trioai\.toml: engines\[0\]: unknown key 'port'"),
        ('[[engines]]\nname = "c"\n', r"trioai\.toml: engines\[0\]: 'url' is required"),
        ('engines = "http://c:3/v1"\n', r"engines must be an array of tables"),
        ('upstream = ["http://a:1/v1"]\n[[engines]]\nurl = "http://a:1/v1"\n',
         r"engine http://a:1/v1 is configured twice"),
        ('[[engines]]\nurl = "http://a:1/v1"\nname = "x"\n[[engines]]\nurl = "http://b:1/v1"\nname = "x"\n',
         r"two engines are named 'x'"),
        ('upstream = ["http://a:1/v1", "http://a:1/v1"]\n', r"upstream names an engine twice"),
        ('upstream = ["ftp://a/v1"]\n', r"upstream must be http:// or https:// base URLs"),
        ("upstream = []\n", r"upstream must not be empty"),
    ],
)
def test_bad_engines_in_a_file_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "trioai.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings({}, {}, path)


def serve_settings(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, list[Settings]]:
    """``trioai serve ARGV`` through the real parser, stopping where the server would start."""
    started: list[Settings] = []

    async def fake_run_server(settings: Settings, *args: Any, **kwargs: Any) -> None:
        started.append(settings)

    monkeypatch.setattr("trioai.cli.run_server", fake_run_server)
    monkeypatch.setattr("trioai.cli.setup_logging", lambda *args, **kwargs: None)
    monkeypatch.delenv("TRIOAI_CONFIG", raising=False)
    monkeypatch.delenv("TRIOAI_UPSTREAM", raising=False)
    return main(["serve", *argv]), started


def test_repeated_upstream_options_become_several_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    code, started = serve_settings(monkeypatch, ["--upstream", "http://a:1/v1", "--upstream", "http://[::1]:2/v1",
                                                 "--max-concurrency", "3"])
    assert code == 0
    (settings,) = started
    assert settings.upstream == "http://a:1/v1 http://[::1]:2/v1"
    assert [(s.url, s.name, s.max_concurrency) for s in settings.engine_specs()] == [
        ("http://a:1/v1", "a:1", 3), ("http://[::1]:2/v1", "[::1]:2", 3)]


def test_the_same_upstream_twice_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, started = serve_settings(monkeypatch, ["--upstream", "http://a:1/v1", "--upstream", "http://a:1/v1"])
    assert (code, started) == (2, [])
    assert "--upstream names an engine twice" in capsys.readouterr().err


def test_upstream_and_engines_tables_may_not_share_a_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trioai.toml"
    path.write_text('[[engines]]\nurl = "http://a:1/v1/"\nname = "a"\n')
    code, started = serve_settings(monkeypatch, ["--config", str(path), "--upstream", "http://a:1/v1"])
    assert (code, started) == (2, [])
    assert "engine http://a:1/v1 is configured twice" in capsys.readouterr().err


# --- engines: load, health ---------------------------------------------------------------------------


def make(name: str, capacity: int = 4, *, in_flight: int = 0, weight: float = 1.0, healthy: bool = True,
         reported: EngineLoad | None = None) -> Engine:
    """An engine of model ``m`` (no client: routing never touches it)."""
    engine = Engine(EngineSpec(f"http://{name}:8000/v1", name, models=("m",), max_concurrency=capacity,
                               weight=weight), cast(Upstream, None))
    engine.in_flight = in_flight
    engine.healthy = healthy
    engine.reported = reported
    return engine


def names(engine: Engine | None) -> str | None:
    return None if engine is None else engine.name


def test_load_is_in_flight_over_capacity() -> None:
    assert make("a", 8, in_flight=2).load == 0.25
    assert make("a", 8).load == 0.0
    full = make("a", 2, in_flight=2)
    assert full.load == 1.0 and not full.has_room
    assert make("a", 2, in_flight=1).has_room


def test_load_counts_what_the_engine_reports() -> None:
    # The engine runs more than this gateway sent (other clients): its count wins, and its queue adds.
    assert make("a", 4, in_flight=1, reported=EngineLoad(running=3, waiting=2, kv_cache=0.5)).load == 1.25
    # This gateway's requests not yet seen by the last scrape: ours win.
    assert make("a", 8, in_flight=5, reported=EngineLoad(running=2, waiting=0, kv_cache=0.0)).load == 0.625


@pytest.mark.parametrize(("kv_cache", "extra"), [(0.5, 0.0), (0.97, 0.0), (KV_CACHE_FULL, 1.0), (1.0, 1.0)])
def test_a_full_kv_cache_counts_as_one_capacity_more(kv_cache: float, extra: float) -> None:
    engine = make("a", 4, in_flight=1, reported=EngineLoad(running=1, waiting=0, kv_cache=kv_cache))
    assert engine.load == 0.25 + extra


def test_failures_in_a_row_eject_and_a_restore_brings_it_back() -> None:
    engine = make("a")
    assert not engine.failed(100.0, 3) and not engine.failed(100.0, 3)
    assert engine.healthy and engine.failures == 2 and not engine.wake.is_set()
    engine.succeeded()
    assert engine.failures == 0
    assert [engine.failed(100.0, 3) for _ in range(3)] == [False, False, True]
    assert not engine.healthy and engine.ejections == 1 and engine.wake.is_set()
    assert engine.probe_after == 100.0 + FIRST_BACKOFF
    assert not engine.failed(101.0, 3)  # already ejected: no second ejection
    assert engine.ejections == 1 and engine.failures == 4
    engine.restore()
    assert engine.healthy and engine.failures == 0 and engine.ejections == 1  # the backoff remembers


def test_eject_after_one_failure() -> None:
    engine = make("a")
    assert engine.failed(5.0, 1)
    assert not engine.healthy and engine.probe_after == 6.0


def test_the_backoff_doubles_up_to_its_cap() -> None:
    engine = make("a")
    waits = []
    for _ in range(8):
        engine.eject(1000.0)
        waits.append(engine.probe_after - 1000.0)
        engine.restore()
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]


def test_the_backoff_stays_capped_after_very_many_ejections() -> None:
    # FIRST_BACKOFF * 2 ** (ejections - 1) as a float overflowed from the 1,025th ejection in a row
    # (OverflowError in a probe or a request's task; failed at 0a2ff60). An engine that flaps
    # (a probe restores it, its next probe or requests eject it again) keeps counting.
    engine = make("a")
    for _ in range(1100):
        engine.eject(0.0)
        engine.restore()
    assert engine.probe_after == MAX_BACKOFF


@pytest.mark.parametrize(
    ("code", "status", "fault"),
    [
        (ErrorCode.UPSTREAM_UNAVAILABLE, None, True),  # refused
        (ErrorCode.UPSTREAM_UNAVAILABLE, 503, True),
        (ErrorCode.UPSTREAM_UNAVAILABLE, 502, True),
        (ErrorCode.UPSTREAM_DISCONNECTED, None, True),  # cut mid-stream
        (ErrorCode.UPSTREAM_TIMEOUT, None, True),  # stalled
        (ErrorCode.UPSTREAM_TIMEOUT, 504, True),
        (ErrorCode.UPSTREAM_ERROR, None, True),  # an error in the stream
        (ErrorCode.UPSTREAM_ERROR, 500, True),
        (ErrorCode.UPSTREAM_ERROR, 501, True),
        (ErrorCode.UPSTREAM_ERROR, 404, False),  # its answer, not its health
        (ErrorCode.UPSTREAM_ERROR, 401, False),
        (ErrorCode.UPSTREAM_OVERLOADED, 429, False),  # busy but alive
        (ErrorCode.INVALID_REQUEST, 400, False),
        (ErrorCode.MODEL_NOT_FOUND, None, False),
        (ErrorCode.INTERNAL_ERROR, None, False),
    ],
)
def test_which_failures_count_against_an_engine(code: ErrorCode, status: int | None, fault: bool) -> None:
    assert is_engine_fault(UpstreamError(code, "x", status=status)) is fault


# --- routing ----------------------------------------------------------------------------------------


def test_the_least_loaded_engine_wins() -> None:
    engines = [make("a", in_flight=2), make("b", in_flight=1), make("c", in_flight=3)]
    assert names(choose(engines)) == "b"


def test_load_is_relative_to_capacity() -> None:
    # a runs more requests but is less full: 3/8 against 1/2.
    assert names(choose([make("b", 2, in_flight=1), make("a", 8, in_flight=3)])) == "a"
    assert names(choose([make("b", 2, in_flight=1), make("a", 8, in_flight=5)])) == "b"


def test_weight_breaks_exact_ties_only() -> None:
    assert names(choose([make("a", weight=1), make("b", weight=2)])) == "b"
    assert names(choose([make("b", weight=2), make("a", weight=1)])) == "b"
    assert names(choose([make("a", weight=1), make("b", weight=1)])) == "a"  # equal: the first configured
    # Not a tie: the lighter engine wins whatever the weights.
    assert names(choose([make("a", 8, weight=1), make("b", 8, in_flight=1, weight=100)])) == "a"


def test_reported_queues_steer_traffic_away() -> None:
    busy = make("a", 4, reported=EngineLoad(running=4, waiting=3, kv_cache=0.2))
    assert names(choose([busy, make("b", 4, in_flight=2)])) == "b"


def test_avoided_engines_are_used_only_when_nothing_else_has_room() -> None:
    engines = [make("a", in_flight=2), make("b", in_flight=0), make("c", in_flight=1)]
    assert names(choose(engines, avoid={"b"})) == "c"
    assert names(choose(engines, avoid={"b", "c"})) == "a"
    assert names(choose(engines, avoid={"a", "b", "c"})) == "b"  # all tried: the best of them again
    # The only untried engine is full: a tried one with room rather than none.
    assert names(choose([make("a", 1, in_flight=1), make("b", 1)], avoid={"b"})) == "b"


def test_ejected_engines_get_no_traffic() -> None:
    engines = [make("a", in_flight=3), make("b", healthy=False), make("c", in_flight=2, healthy=False)]
    assert names(choose(engines)) == "a"
    assert names(choose(engines, prefer="b")) == "a"  # not even the connection's last engine


def test_a_model_with_every_engine_ejected_is_still_routed() -> None:
    engines = [make("a", in_flight=3, healthy=False), make("b", in_flight=1, healthy=False)]
    assert names(choose(engines)) == "b"
    assert names(choose(engines, prefer="a")) == "b"  # 3/4 is more than 1/8 above 1/4
    close = [make("a", 16, in_flight=1, healthy=False), make("b", 16, healthy=False)]
    assert names(choose(close, prefer="a")) == "a"  # locality holds among ejected engines too
    assert choose([make("a", 1, in_flight=1, healthy=False)]) is None  # but never beyond capacity


def test_healthy_but_full_engines_make_the_request_wait_rather_than_go_to_an_ejected_one() -> None:
    assert choose([make("a", 1, in_flight=1), make("b", healthy=False)]) is None


def test_engines_without_room_are_never_chosen() -> None:
    assert choose([make("a", 1, in_flight=1), make("b", 2, in_flight=2)]) is None
    assert choose([]) is None
    # The preferred engine is within the slack of the best but full.
    full, almost = make("a", 1, in_flight=1), make("b", 16, in_flight=15)
    assert full.load <= almost.load + LOCALITY_SLACK
    assert names(choose([full, almost], prefer="a")) == "b"


def test_the_connections_last_engine_wins_within_the_slack() -> None:
    # LOCALITY_SLACK is 1/8: with capacity 16, two requests more.
    assert LOCALITY_SLACK == 0.125
    engines = [make("a", 16, in_flight=2), make("b", 16, in_flight=0)]
    assert names(choose(engines)) == "b"
    assert names(choose(engines, prefer="a")) == "a"  # 2/16 = 0/16 + 1/8
    engines[0].in_flight = 3
    assert names(choose(engines, prefer="a")) == "b"  # 3/16 > 1/8 more
    assert names(choose(engines, prefer="gone")) == "b"


def test_the_preferred_engine_is_not_used_when_avoided_or_ejected() -> None:
    engines = [make("a", 16, in_flight=1), make("b", 16)]
    assert names(choose(engines, prefer="a")) == "a"
    assert names(choose(engines, prefer="a", avoid={"a"})) == "b"
    engines[0].healthy = False
    assert names(choose(engines, prefer="a")) == "b"


def test_a_models_capacity_is_that_of_its_healthy_engines() -> None:
    a, b, c = make("a", 4), make("b", 2), make("c", 8)
    c.spec = EngineSpec("http://c:8000/v1", "c", models=("other",), max_concurrency=8)
    c.models = ("other",)
    pool = EnginePool([a, b, c], Settings())
    assert pool.models == ["m", "other"]
    assert pool.admission("m").limiter.total_tokens == 6
    assert pool.admission("other").limiter.total_tokens == 8
    a.eject(0.0)
    pool.health_changed(a)
    assert pool.admission("m").limiter.total_tokens == 2
    b.eject(0.0)
    pool.health_changed(b)
    assert pool.admission("m").limiter.total_tokens == 6  # none healthy: all are tried, so all count
    a.restore()
    pool.health_changed(a)
    assert pool.admission("m").limiter.total_tokens == 4


def test_alternative_is_a_healthy_untried_engine_with_room() -> None:
    a, b, c = make("a", 2, in_flight=1), make("b", 2, in_flight=1), make("c", 2)
    pool = EnginePool([a, b, c], Settings())
    assert names(pool.alternative("m", ["c"])) == "a"
    assert names(pool.alternative("m", [])) == "c"
    b.healthy = False
    assert names(pool.alternative("m", ["a", "c"])) is None  # never an ejected one
    a.in_flight = 2
    assert names(pool.alternative("m", ["c"])) is None  # nor a full one
    assert names(pool.alternative("unknown", [])) is None


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("http://h:8000/v1", "http://h:8000/metrics"),
        ("http://h:8000/prefix/v1", "http://h:8000/prefix/metrics"),
        ("http://h:8000", "http://h:8000/metrics"),
        ("https://h/api/", "https://h/api/metrics"),
    ],
)
def test_metrics_are_read_beside_the_v1_base(base: str, url: str) -> None:
    assert metrics_url(base) == url


# --- vLLM's /metrics ----------------------------------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.4375
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 123456.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.5
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
"""


def test_vllm_metrics_are_read() -> None:
    assert parse_engine_metrics(VLLM_METRICS) == EngineLoad(running=7.0, waiting=3.0, kv_cache=0.4375)


def test_request_counts_of_several_label_sets_are_added() -> None:
    text = VLLM_METRICS + ('vllm:num_requests_running{engine="1",model_name="m2"} 2\n'
                           'vllm:num_requests_waiting{engine="1",model_name="m2"} 5\n')
    load = parse_engine_metrics(text)
    assert load is not None and (load.running, load.waiting) == (9.0, 8.0)


def test_untyped_metrics_without_comments_are_read() -> None:
    text = 'vllm:num_requests_running{model_name="m"} 2\nvllm:num_requests_waiting 1\n'
    assert parse_engine_metrics(text) == EngineLoad(running=2.0, waiting=1.0, kv_cache=0.0)
    assert parse_engine_metrics('vllm:kv_cache_usage_perc{model_name="m"} 1\n') == EngineLoad(0.0, 0.0, 1.0)


def test_the_kv_cache_share_of_several_label_sets_stays_a_share() -> None:
    # kv_cache_usage_perc is a share (EngineLoad: "0..1"): vLLM with data parallelism publishes one
    # label set per rank, and summing them (as at 0a2ff60) read two ranks at 60% as 1.2, a full
    # cache (>= KV_CACHE_FULL), one capacity of extra load. Running and waiting are still added.
    text = ('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.6\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 1\n')
    load = parse_engine_metrics(text)
    assert load is not None
    assert load.kv_cache <= 1.0
    engine = make("a", 4, reported=load)
    assert engine.load < 1.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# HELP process_cpu_seconds_total Total CPU\n# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 1.5\n",  # a Prometheus exposition, not a vLLM one
        'llamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n',  # llama.cpp's names
        "<html><body>404 Not Found</body></html>",
        "vllm:num_requests_running{model_name=\"m\" 3\n",  # unterminated labels
        "vllm:num_requests_running NaN\n",  # no finite value
        "\x00\x01garbage{{{",
    ],
)
def test_other_texts_are_not_vllm_metrics(text: str) -> None:
    assert parse_engine_metrics(text) is None


# --- continuations ------------------------------------------------------------------------------------


def request(max_tokens: int | None = 10, **chat_fields: Any) -> ChatRequest:
    return ChatRequest("r1", ({"role": "system", "content": "be brief"}, {"role": "user", "content": "count"}),
                       max_tokens, Sampling(temperature=0.0), chat_fields)


def test_payload_has_the_model_messages_and_fields() -> None:
    body = payload(request(10, tools=[{"type": "function"}]), "m")
    assert body == {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "count"}],
                    "max_tokens": 10, "temperature": 0.0, "tools": [{"type": "function"}]}


def test_a_continuation_appends_the_partial_answer_and_asks_for_the_rest() -> None:
    original = request(10)
    body = payload(original, "m")
    follow_up = continuation(body, "w0 w1 w2 ", 3, original)
    assert follow_up == {
        "model": "m", "temperature": 0.0,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count"},
                     {"role": "assistant", "content": "w0 w1 w2"}],  # the template would trim the space
        "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 7,
    }
    assert len(body["messages"]) == 2 and "continue_final_message" not in body  # the original is untouched
    assert continuation_problem(follow_up) is None  # what vLLM accepts


def test_a_continuation_without_max_tokens_sets_none() -> None:
    original = request(None)
    follow_up = continuation(payload(original, "m"), "w0 ", 1, original)
    assert follow_up is not None and "max_tokens" not in follow_up


def test_no_continuation_when_nothing_is_left_or_nothing_was_said() -> None:
    original = request(3)
    body = payload(original, "m")
    assert continuation(body, "w0 w1 ", 2, original) is not None
    assert continuation(body, "w0 w1 w2 ", 3, original) is None  # every token produced
    assert continuation(body, "w0 w1 w2 w3 ", 4, original) is None
    assert continuation(body, "", 0, original) is None


@pytest.mark.parametrize("field", sorted(NOT_CONTINUABLE))
def test_no_continuation_of_constrained_output(field: str) -> None:
    original = request(10, **{field: {"type": "json_object"}})
    assert continuation(payload(original, "m"), "{\"a\"", 2, original) is None


def test_no_continuation_for_response_format() -> None:
    original = request(10, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})
    assert continuation(payload(original, "m"), "{", 1, original) is None


def test_usage_of_one_part() -> None:
    progress = Progress(payload(request(), "m"))
    assert progress.usage(5, 9, 9) == Usage(5, 9, source="engine")
    assert progress.usage(None, None, 9) == Usage(None, 9, source="gateway")


def test_usage_adds_the_parts_of_a_continued_answer() -> None:
    original = request(10)
    progress = Progress(payload(original, "m"))
    progress.text.extend(["w0 ", "w1 ", "w2 "])  # the first engine relayed three deltas, then died
    follow_up = continuation(progress.original, "".join(progress.text), len(progress.text), original)
    assert follow_up is not None
    progress.next_part(follow_up)
    assert progress.payload is follow_up and progress.continuations == 1
    progress.text.extend(["w3 ", "w4 "])
    # The second engine counted its own two tokens (and the prompt with the partial answer in it).
    assert progress.usage(12, 2, 5) == Usage(12, 5, source="mixed")
    assert progress.usage(None, None, 5) == Usage(None, 5, source="gateway")


def test_usage_after_two_continuations() -> None:
    original = request(20)
    progress = Progress(payload(original, "m"))
    for part in (["a ", "b "], ["c "]):
        progress.text.extend(part)
        follow_up = continuation(progress.original, "".join(progress.text), len(progress.text), original)
        assert follow_up is not None
        progress.next_part(follow_up)
    assert progress.payload["max_tokens"] == 17 and progress.continuations == 2
    assert progress.payload["messages"][-1] == {"role": "assistant", "content": "a b c"}
    assert len(progress.payload["messages"]) == 3  # built from the original, not stacked
    progress.text.extend(["d ", "e ", "f ", "g "])
    assert progress.usage(30, 4, 7) == Usage(30, 7, source="mixed")


def test_whitespace_a_partial_answer_ends_with_is_not_sent_twice() -> None:
    """Chat templates trim the partial answer, so the engine writes its trailing whitespace again
    (seen with Gemma 3 on vLLM: "sea.\n\n" continued as "\n\nThe story"): the gateway swallows it,
    and the whitespace-only deltas do not count against max_tokens."""
    assert trailing_whitespace(["sea", ".", "\n\n"]) == ("\n\n", 1)
    assert trailing_whitespace(["w0 ", "w1 "]) == (" ", 0)
    assert trailing_whitespace(["a", " ", "\n"]) == (" \n", 2)
    assert trailing_whitespace(["a"]) == ("", 0)
    original = request(10)
    progress = Progress(payload(original, "m"))
    progress.text.extend(["The", " sea", ".", "\n\n"])
    _, count = trailing_whitespace(progress.text)
    follow_up = continuation(progress.original, "".join(progress.text), len(progress.text) - count, original)
    assert follow_up is not None and follow_up["max_tokens"] == 7
    assert follow_up["messages"][-1]["content"] == "The sea."
    progress.next_part(follow_up)
    assert progress.skip == "\n\n"
    assert [progress.unsent(d) for d in ("\n", "\nThe", " story")] == ["", "The", " story"]
    progress.skip = " "
    assert progress.unsent("w6 ") == "w6 " and progress.skip == ""  # the engine did not write it again
    assert continuation(payload(original, "m"), " \n", 2, original) is None  # only whitespace: nothing to continue


# --- the fake engine's continuation ----------------------------------------------------------------


def test_numbered_script_continues_after_the_partial_answer() -> None:
    assert numbered_script({"max_tokens": 3}).tokens == ("w0 ", "w1 ", "w2 ")
    body = {"max_tokens": 4, "continue_final_message": True, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": "w0 w1 w2 "}]}
    assert numbered_script(body).tokens == ("w3 ", "w4 ", "w5 ", "w6 ")
    assert continued_text(body) == "w0 w1 w2 "
    # Without the flag the last message is not a partial answer: the numbering starts over.
    assert numbered_script({**body, "continue_final_message": False}).tokens[0] == "w0 "
    assert continued_text({"messages": [], "continue_final_message": True}) == ""


def test_a_continued_numbered_answer_equals_the_uninterrupted_one() -> None:
    original = request(8)
    whole = "".join(numbered_script(payload(original, "m")).tokens)
    first = "".join(numbered_script(payload(original, "m")).tokens[:3])
    follow_up = continuation(payload(original, "m"), first, 3, original)
    assert follow_up is not None
    assert first + "".join(numbered_script(follow_up).tokens) == whole


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, None),
        ({"continue_final_message": False, "messages": []}, None),
        ({"continue_final_message": True, "add_generation_prompt": False,
          "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "w0 "}]}, None),
        ({"continue_final_message": True, "add_generation_prompt": False,
          "messages": [{"role": "assistant", "content": "w0 "}, {"role": "user", "content": "x"}]},
         "continue_final_message needs the last message to be the assistant's"),
        ({"continue_final_message": True, "add_generation_prompt": False, "messages": []},
         "continue_final_message needs the last message to be the assistant's"),
        ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message needs the last"),
        ({"continue_final_message": True, "messages": [{"role": "assistant", "content": "w0 "}]},
         "Cannot set both `continue_final_message` and `add_generation_prompt` to True."),
        ({"continue_final_message": True, "add_generation_prompt": True,
          "messages": [{"role": "assistant", "content": "w0 "}]}, "Cannot set both"),
    ],
)
def test_continuation_problems_are_vllms_400s(body: dict[str, Any], problem: str | None) -> None:
    found = continuation_problem(body)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


# --- continuation target (a gateway with three fake engines) -----------------------------------------


async def test_a_continuation_goes_to_an_engine_that_may_continue(nursery: trio.Nursery) -> None:
    # "dies" is chosen first (highest weight); among the others "keeps" (continue = false) wins the
    # tie. At 0a2ff60 the continuation target was the least loaded other engine, and when that one
    # could not continue the answer was given up (upstream_disconnected) though "rescue" could.
    def dies(body: dict[str, Any]) -> Script:
        return Script(tokens=numbered_script(body).tokens, drop_after=3, finish_reason="length")

    fakes = {"dies": FakeUpstream(dies, model="m"), "keeps": FakeUpstream(numbered_script, model="m"),
             "rescue": FakeUpstream(numbered_script, model="m")}
    for fake in fakes.values():
        await nursery.start(fake.serve)
    specs = (EngineSpec(fakes["dies"].base_url, "dies", models=("m",), weight=3.0),
             EngineSpec(fakes["keeps"].base_url, "keeps", models=("m",), weight=2.0, can_continue=False),
             EngineSpec(fakes["rescue"].base_url, "rescue", models=("m",), weight=1.0))
    settings = Settings(host="127.0.0.1", port=0, engines=specs, probe_interval=600.0, engine_metrics_interval=0)
    server: RunningServer = await nursery.start(serve, settings)
    async with connect(server) as ws:
        await send(ws, chat("count", max_tokens=8, id=1))
        events = [await recv(ws)]
        while events[-1]["type"] not in ("done", "error", "cancelled"):
            events.append(await recv(ws))
    assert len(fakes["dies"].requests) == 1
    assert text_of(events) == "".join(f"w{i} " for i in range(8)), events
    assert events[-1]["type"] == "done"
    assert [(e["from"], e["to"]) for e in events if e["type"] == "failover"] == [("dies", "rescue")]
    assert len(fakes["keeps"].requests) == 0
