"""Settings that cannot work are refused at start, from the command line, the environment and the file alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioai.cli import main
from trioai.config import ConfigError, Settings, load_settings

SOURCES = ("cli", "env", "file")


def load_one(source: str, name: str, text: str, toml: str, tmp_path: Path) -> Settings:
    """Load one setting given as ``text`` (command line, environment) or as the TOML value ``toml``."""
    if source == "cli":
        return load_settings({name: text}, {})
    if source == "env":
        return load_settings({}, {"TRIOAI_" + name.upper(): text})
    path = tmp_path / "trioai.toml"
    path.write_text(f"{name} = {toml}\n")
    return load_settings({}, {}, path)


def source_name(source: str, name: str, tmp_path: Path) -> str:
    """How the error message names where the value came from."""
    return {"cli": "--" + name.replace("_", "-"), "env": "TRIOAI_" + name.upper(),
            "file": f"{tmp_path / 'trioai.toml'}: {name}"}[source]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    ("name", "text", "toml", "message"),
    [
        ("token_timeout", "nan", "nan", "must be a finite number, got nan"),
        ("ping_timeout", "nan", "nan", "must be a finite number, got nan"),
        ("handshake_timeout", "NaN", "nan", "must be a finite number, got nan"),
        ("drain_timeout", "inf", "inf", "must be a finite number, got inf"),
        ("idle_timeout", "inf", "+inf", "must be a finite number, got inf"),
        ("connect_timeout", "-inf", "-inf", "must be a finite number, got -inf"),
        ("port", "70000", "70000", "must be at most 65535, got 70000"),
        ("http_port", "99999", "99999", "must be at most 65535, got 99999"),
        ("local_port", "65536", "65536", "must be at most 65535, got 65536"),
        ("default_max_tokens", "0", "0", "must be at least 1, got 0"),
        ("trusted_proxies", "10.0.0.0/8, proxy.local", '"10.0.0.0/8, proxy.local"',
         "must be comma-separated IP addresses or CIDRs, got 'proxy.local'"),
        ("trusted_proxies", "10.0.0.0/33", '"10.0.0.0/33"',
         "must be comma-separated IP addresses or CIDRs, got '10.0.0.0/33'"),
        ("api_keys_file", "", '""', "must not be empty (to unset it, leave it out)"),
        ("certfile", "", '""', "must not be empty (to unset it, leave it out)"),
        ("local_model", " ", '" "', "must not be empty (to unset it, leave it out)"),
        ("upstream", "", '""', "must not be empty (to unset it, leave it out)"),
    ],
)
def test_impossible_values_are_refused(source: str, name: str, text: str, toml: str, message: str,
                                       tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_one(source, name, text, toml, tmp_path)
    assert str(caught.value) == f"{source_name(source, name, tmp_path)} {message}"


@pytest.mark.parametrize("source", SOURCES)
def test_edge_values_still_work(source: str, tmp_path: Path) -> None:
    assert load_one(source, "port", "65535", "65535", tmp_path).port == 65535
    assert load_one(source, "http_port", "0", "0", tmp_path).http_port == 0
    assert load_one(source, "token_timeout", "1e3", "1e3", tmp_path).token_timeout == 1000.0
    proxies = load_one(source, "trusted_proxies", " 10.0.0.1, 192.168.0.0/16 ,::1,", '"10.0.0.1, 192.168.0.0/16 ,::1,"',
                       tmp_path)
    assert [str(n) for n in proxies.trusted_networks()] == ["10.0.0.1/32", "192.168.0.0/16", "::1/128"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token-timeout", "nan"], "--token-timeout must be a finite number, got nan"),
        (["--port", "70000"], "--port must be at most 65535, got 70000"),
        (["--api-keys-file="], "--api-keys-file must not be empty"),
        (["--trusted-proxies", "nginx"],
         "--trusted-proxies must be comma-separated IP addresses or CIDRs, got 'nginx'"),
    ],
)
def test_the_command_exits_2_with_the_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def run(settings: Settings) -> int:
        raise AssertionError(f"the server started with {settings}")

    monkeypatch.setattr("trioai.cli._run", run)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"trioai: {message}")
    assert "Traceback" not in err
