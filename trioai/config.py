"""Server settings: one frozen dataclass, filled from defaults < TOML file < ``TRIOAI_*`` env < CLI.

Each field's ``help`` metadata is the single description of a setting: the command line, the
environment variable (``TRIOAI_`` + the name in capitals) and the config file key (the name, with
``_`` or ``-``) are all derived from the fields, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

from .enginespec import EngineSpec, parse_engine_tables
from .protocol import Limits

ENV_PREFIX = "TRIOAI_"
BOOLEAN_WORDS: Final = {"true": True, "1": True, "yes": True, "on": True,
                        "false": False, "0": False, "no": False, "off": False}
PORT_MAX: Final = 65535
EMBEDDED_DEFAULT_MAX_TOKENS: Final = 256
"""``default_max_tokens`` with the embedded engine when unset: a base model writes on until its context is full."""


class ConfigError(ValueError):
    """A setting has a wrong name, type or value; the message says which and why."""


Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDRs as networks (an address is a /32 or /128).

    Raises :class:`ValueError` with the first bad entry as its message.
    """
    networks = []
    for entry in (e.strip() for e in text.split(",")):
        if entry:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(entry) from None
    return tuple(networks)


def _check_networks(value: str) -> str | None:
    try:
        parse_networks(value)
    except ValueError as exc:
        return f"must be comma-separated IP addresses or CIDRs, got {str(exc)!r}"
    return None


def upstream_urls(value: str | None) -> tuple[str, ...]:
    """The engine base URLs of the ``upstream`` setting (space-separated)."""
    return tuple(value.split()) if value else ()


def _check_upstreams(value: str) -> str | None:
    urls = upstream_urls(value)
    if not urls:
        return "must not be empty (to unset it, leave it out)"
    for url in urls:
        if not url.startswith(("http://", "https://")) or len(url) < 10:
            return f"must be http:// or https:// base URLs, got {url!r}"
    if len(set(urls)) != len(urls):
        return f"names an engine twice: {' '.join(urls)}"
    return None


def _check_not_empty(value: str) -> str | None:
    # An empty value would read as "off" (no keys, no TLS, ...) where the user asked for something.
    return "must not be empty (to unset it, leave it out)" if not value.strip() else None


def _setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A settings field; ``check`` returns what is wrong with a value (``None``: nothing)."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum, "check": check})


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; see ``trioai serve --help``."""

    host: str = _setting("127.0.0.1", "interface to listen on")
    port: int = _setting(8080, "WebSocket port (0 picks a free one)", minimum=0, maximum=PORT_MAX)
    certfile: str | None = _setting(
        None, "TLS certificate chain (PEM) to serve wss:// directly, without Nginx", check=_check_not_empty
    )
    keyfile: str | None = _setting(
        None, "TLS private key (PEM) for --certfile (unset: in the certfile)", check=_check_not_empty
    )
    http_host: str = _setting("127.0.0.1", "interface of the health and metrics HTTP port")
    http_port: int | None = _setting(
        None, "HTTP port for /healthz, /readyz and /metrics (unset: none; 0 picks a free one)", minimum=0,
        maximum=PORT_MAX
    )
    upstream: str | None = _setting(
        None,
        "base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 for vLLM; repeat the option (or "
        "separate URLs by spaces) for several engines; more per-engine settings: [[engines]] in the config file "
        "(unset, and no [[engines]]: start the embedded local engine)",
        check=_check_upstreams,
    )
    api_keys_file: str | None = _setting(
        None, "file of accepted client API keys, one per line, reloaded on SIGHUP (unset: no authentication)",
        check=_check_not_empty,
    )
    allowed_origins: str | None = _setting(
        None, "comma-separated Origin values browsers may connect from (unset: any); others get 403"
    )
    trusted_proxies: str | None = _setting(
        None, "comma-separated addresses or CIDRs of reverse proxies (e.g. Nginx) whose X-Forwarded-For / "
        "X-Real-IP name the client, for rate limits and logs (unset: trust none, use the peer address)",
        check=_check_networks,
    )
    max_connections: int = _setting(10000, "open WebSocket connections at most; more get 503 at the handshake",
                                    minimum=1)
    rate_limit_requests: int | None = _setting(
        None, "requests per minute per client (API key, or IP without keys); beyond: 'rate_limited'", minimum=1
    )
    rate_limit_tokens: int | None = _setting(
        None, "generated tokens per minute per client; beyond: 'rate_limited'", minimum=1
    )
    upstream_api_key: str | None = _setting(None, "bearer token sent to the upstream (never logged)")
    model: str | None = _setting(
        None, "model of requests that name none (unset: the first one the first engine lists)", check=_check_not_empty
    )
    max_concurrency: int = _setting(
        16, "generations running at once per engine, across all clients (an [[engines]] entry may set its own)",
        minimum=1,
    )
    max_queue: int | None = _setting(
        1024, "generations that may wait for capacity; beyond it, 'overloaded' at once (none: no cap)", minimum=0
    )
    max_streams_per_connection: int = _setting(8, "generations one connection may run at once", minimum=1)
    max_message_size: int = _setting(1 << 20, "largest client frame in bytes (larger: close 1009)", minimum=1024)
    max_messages: int = _setting(256, "most entries in a request's 'messages'", minimum=1)
    max_tokens_limit: int = _setting(8192, "largest 'max_tokens' a client may ask for", minimum=1)
    default_max_tokens: int | None = _setting(
        None, "max_tokens when a client sends none (unset: the engine's limit; with the embedded engine, "
        f"{EMBEDDED_DEFAULT_MAX_TOKENS})", minimum=1
    )
    max_tools: int = _setting(128, "most entries in a request's 'tools'", minimum=0)
    max_schema_bytes: int = _setting(
        65536, "largest JSON Schema (a tool's parameters, a response_format schema), as compact JSON", minimum=64
    )
    max_schema_depth: int = _setting(32, "deepest nesting of a JSON Schema", minimum=2)
    upstream_retries: int = _setting(
        2, "retries of a request the engine refused (unreachable, 503, 429, cut off) before its first token",
        minimum=0
    )
    probe_interval: float = _setting(
        5.0, "seconds between health probes (GET /v1/models) of each engine; an ejected engine gets traffic "
        "again once a probe passes", minimum=0.05
    )
    probe_timeout: float = _setting(2.0, "seconds an engine has to answer a health probe", minimum=0.01)
    eject_after_failures: int = _setting(
        3, "consecutive failures (refused connections, 5xx, broken streams) that eject an engine until a probe "
        "passes; the wait before it is probed back doubles with each ejection, up to 30 s", minimum=1
    )
    engine_metrics_interval: float = _setting(
        2.0, "seconds between reads of each engine's Prometheus /metrics (vLLM's queue and KV cache), for "
        "routing; an engine without them is not asked again (0: never)", minimum=0.0
    )
    connect_timeout: float = _setting(5.0, "seconds to connect to the upstream", minimum=0.001)
    first_token_timeout: float = _setting(
        120.0, "seconds from sending a request upstream to its first token", minimum=0.001
    )
    token_timeout: float = _setting(30.0, "seconds allowed between two tokens", minimum=0.001)
    handshake_timeout: float = _setting(10.0, "seconds a client has to finish the WebSocket handshake", minimum=0.001)
    close_timeout: float = _setting(5.0, "seconds to wait for the WebSocket closing handshake", minimum=0.001)
    ping_interval: float = _setting(
        20.0, "seconds between the server's WebSocket pings, which keep proxies from timing out idle "
        "connections (0: none)", minimum=0.0
    )
    ping_timeout: float = _setting(20.0, "seconds a client has to answer a ping before it is disconnected",
                                   minimum=0.001)
    send_timeout: float = _setting(
        30.0, "seconds a client may read nothing while the server has frames for it, before it is "
        "disconnected (1008) and its generations aborted", minimum=0.001
    )
    idle_timeout: float = _setting(
        0.0, "seconds a connection may run no generation and send nothing before it is closed (0: never)",
        minimum=0.0
    )
    drain_timeout: float = _setting(
        30.0, "seconds active generations may finish after SIGTERM before they are ended", minimum=0.0
    )
    resumable_default: bool = _setting(
        False, "every generation is resumable, as if each message said \"resumable\": true"
    )
    resume_window: float = _setting(
        60.0, "seconds a resumable generation keeps running and its events are kept after its connection "
        "is lost (and after it ends, for a lost done); then it is abandoned (0: resume off)", minimum=0.0
    )
    resume_buffer_bytes: int = _setting(
        1 << 20, "event log kept per resumable generation; a detached generation whose log is full waits",
        minimum=4096
    )
    resume_memory_bytes: int = _setting(
        256 << 20, "event logs of all generations together; beyond, the oldest detached one is abandoned",
        minimum=65536
    )
    stream_buffer_bytes: int = _setting(
        65536, "unsent text per stream before the engine is made to wait (slow clients)", minimum=1024
    )
    connection_buffer_bytes: int = _setting(
        262144, "unsent bytes per connection, all streams together, before its engine streams wait and its "
        "new requests wait to start (slow clients)", minimum=4096
    )
    local_model: str | None = _setting(
        None, "GGUF file for the embedded engine (unset: bundled Gemma 3 270M)", check=_check_not_empty
    )
    local_port: int = _setting(
        0, "port of the embedded engine on 127.0.0.1 (0 picks a free one)", minimum=0, maximum=PORT_MAX
    )
    local_threads: int | None = _setting(None, "CPU threads of the embedded engine (unset: all cores)", minimum=1)
    local_ctx: int = _setting(2048, "context length of the embedded engine", minimum=256)
    local_start_timeout: float = _setting(180.0, "seconds the embedded engine has to start", minimum=1.0)
    workers: int = _setting(
        1, "server processes sharing the port (SO_REUSEPORT), each its own Trio loop, supervised by the first; "
        "worker i serves --http-port + i - 1",
        minimum=1, maximum=256
    )
    redis: str | None = _setting(
        None, "redis://, rediss:// or unix:// URL of the Redis (or Valkey) that instances share state through, or "
        "redis+sentinel://host:port[,host:port...]/service[/db] to follow the primary Sentinel names, or "
        "redis+cluster://host:port[,host:port...] for a Redis Cluster (unset: each process keeps its own)",
        check=_check_not_empty
    )
    #: ``[[engines]]`` tables of the config file (not an option or variable: see :mod:`trioai.enginespec`).
    engines: tuple[EngineSpec, ...] = field(default=(), metadata={"help": "", "file_only": True})
    lease_seconds: float = _setting(
        5.0, "with --redis: seconds an instance holds a generation (or a capacity slot) without renewing it; "
        "after an instance dies, its generations are continued and its slots freed within this time",
        minimum=0.5, maximum=600.0
    )
    shared_log_gather: float = _setting(
        0.001, "with --redis: seconds the shared log's flusher waits at most, before a Redis round trip, for "
        "frames of this instance's other shared generations (it goes at once when each has one): streams an "
        "engine steps together share one round trip; 0: never waits",
        minimum=0.0, maximum=0.05
    )
    log_level: str = _setting("info", "debug, info, warning or error")
    log_format: str = _setting("text", "text (one line per event) or json (one object per line, for log shippers)")

    def origins(self) -> tuple[str, ...]:
        """``allowed_origins`` as a tuple (empty: any origin)."""
        if not self.allowed_origins:
            return ()
        return tuple(o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip())

    def trusted_networks(self) -> tuple[Network, ...]:
        """``trusted_proxies`` as networks (an address is a /32 or /128); empty: trust no proxy."""
        return parse_networks(self.trusted_proxies or "")

    def engine_specs(self) -> tuple[EngineSpec, ...]:
        """Every configured engine: ``--upstream`` URLs then ``[[engines]]`` (empty: the embedded one).

        Raises :class:`ConfigError` when two share a name or a URL."""
        from .enginespec import combine

        try:
            return combine(upstream_urls(self.upstream), self.engines, self.max_concurrency)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def limits(self) -> Limits:
        """The protocol's validation bounds."""
        return Limits(
            max_messages=self.max_messages,
            max_tokens_limit=self.max_tokens_limit,
            default_max_tokens=self.default_max_tokens,
            max_tools=self.max_tools,
            max_schema_bytes=self.max_schema_bytes,
            max_schema_depth=self.max_schema_depth,
        )


def setting_fields() -> list[dataclasses.Field[Any]]:
    """The fields of :class:`Settings` an option or variable can set, in declaration order."""
    return [f for f in dataclasses.fields(Settings) if not f.metadata.get("file_only")]


def field_type(f: dataclasses.Field[Any]) -> type:
    """The base type of a setting (``int`` for ``int | None``)."""
    hint = typing.get_type_hints(Settings)[f.name]
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    assert isinstance(hint, type)
    return hint


def convert(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    """Check and convert one value (a string from env/CLI, or a TOML value) for field ``f``.

    ``source`` names where the value came from (``--port``, ``TRIOAI_PORT``, ``file.toml: port``).
    """
    kind = field_type(f)
    optional = isinstance(typing.get_type_hints(Settings)[f.name], types.UnionType)
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
            value = BOOLEAN_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{source} must be true or false, got {value!r}")
        return value
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if optional and text.lower() in ("", "none", "null"):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{source} must be {kind.__name__}, got {value!r}") from None
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{source} must be {kind.__name__}, got {value!r}")
    # nan passes every comparison below, and no timeout or size can be infinite.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source} must be a finite number, got {value!r}")
    minimum = f.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{source} must be at least {minimum}, got {value!r}")
    maximum = f.metadata.get("maximum")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{source} must be at most {maximum}, got {value!r}")
    check = f.metadata.get("check")
    if check is not None and (problem := check(value)) is not None:
        raise ConfigError(f"{source} {problem}")
    return value


def load_settings(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Merge the sources (later wins): defaults, the TOML file, ``TRIOAI_*`` variables, ``cli``.

    ``cli`` maps field names to values already given on the command line (absent means unset).
    Raises :class:`ConfigError` for unknown keys or bad values.
    """
    fields = {f.name: f for f in setting_fields()}
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        tables = data.pop("engines", None)
        if tables is not None:
            try:
                values["engines"] = parse_engine_tables(tables, f"{config_file}: engines")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if isinstance(data.get("upstream"), list):  # upstream = ["http://a/v1", "http://b/v1"]
            data["upstream"] = " ".join(str(url) for url in data["upstream"])
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"{config_file}: unknown setting {key!r}")
            values[name] = convert(fields[name], value, f"{config_file}: {key}")
    for name, f in fields.items():
        raw = (env or {}).get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = convert(f, raw, ENV_PREFIX + name.upper())
    for name, value in (cli or {}).items():
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = convert(fields[name], value, "--" + name.replace("_", "-"))
    if values.get("log_level", "info") not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {values['log_level']!r}")
    if values.get("log_format", "text") not in ("text", "json"):
        raise ConfigError(f"log_format must be text or json, got {values['log_format']!r}")
    if values.get("keyfile") and not values.get("certfile"):
        raise ConfigError("keyfile needs certfile")
    settings = Settings(**values)
    settings.engine_specs()  # duplicate names or URLs across --upstream and [[engines]]: an error now
    return settings
