"""Settings from defaults, a TOML file, TRIOAI_* variables and the command line (in that order)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioai.config import ConfigError, Settings, load_settings
from trioai.protocol import Limits


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trioai.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings({}, {}, None)
    assert settings == Settings()
    assert (settings.host, settings.port, settings.upstream) == ("127.0.0.1", 8080, None)
    assert settings.max_concurrency == 16 and settings.max_streams_per_connection == 8
    assert settings.http_port is None and settings.drain_timeout == 30.0


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 9000\nmax-concurrency = 4\nupstream = "http://file/v1"\ntoken_timeout = 7\n')
    from_file = load_settings({}, {}, path)
    assert (from_file.port, from_file.max_concurrency, from_file.upstream) == (9000, 4, "http://file/v1")
    assert from_file.token_timeout == 7.0 and isinstance(from_file.token_timeout, float)
    env = {"TRIOAI_PORT": "9100", "TRIOAI_UPSTREAM": "http://env/v1", "OTHER": "x"}
    from_env = load_settings({}, env, path)
    assert (from_env.port, from_env.max_concurrency, from_env.upstream) == (9100, 4, "http://env/v1")
    from_cli = load_settings({"port": "9200"}, env, path)
    assert (from_cli.port, from_cli.upstream) == (9200, "http://env/v1")


def test_env_strings_are_converted() -> None:
    settings = load_settings({}, {"TRIOAI_FIRST_TOKEN_TIMEOUT": " 2.5 ", "TRIOAI_HTTP_PORT": "0",
                                  "TRIOAI_DEFAULT_MAX_TOKENS": "none", "TRIOAI_MODEL": "m"})
    assert settings.first_token_timeout == 2.5
    assert settings.http_port == 0
    assert settings.default_max_tokens is None
    assert settings.model == "m"


@pytest.mark.parametrize(
    ("cli", "env", "message"),
    [
        ({"port": "eighty"}, {}, "--port must be int, got 'eighty'"),
        ({}, {"TRIOAI_PORT": "-1"}, "TRIOAI_PORT must be at least 0, got -1"),
        ({}, {"TRIOAI_MAX_CONCURRENCY": "0"}, "TRIOAI_MAX_CONCURRENCY must be at least 1"),
        ({"token_timeout": "soon"}, {}, "--token-timeout must be float"),
        ({"log_level": "loud"}, {}, "log_level must be debug, info, warning or error"),
        ({"log_format": "xml"}, {}, "log_format must be text or json"),
        ({"keyfile": "k.pem"}, {}, "keyfile needs certfile"),
        ({"no_such": "1"}, {}, "unknown setting 'no_such'"),
    ],
)
def test_bad_values_name_the_setting_and_source(cli: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(cli, env, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 'blue'\n", "unknown setting 'colour'"),
        ("port = 'eighty'\n", "port must be int"),
        ("port = 80.5\n", "port must be int"),
        ("max_concurrency = true\n", "max_concurrency must be int"),
        ("drain_timeout = -1\n", "drain_timeout must be at least 0"),
        ("port = \n", "cannot read config file"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings({}, {}, path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings({}, {}, tmp_path / "absent.toml")


def test_limits_follow_the_settings() -> None:
    settings = load_settings({"max_messages": "3", "max_tokens_limit": "50", "default_max_tokens": "20"}, {})
    assert settings.limits() == Limits(max_messages=3, max_tokens_limit=50, default_max_tokens=20)
