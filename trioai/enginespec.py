"""The configured engines: ``--upstream`` URLs and the config file's ``[[engines]]`` tables (pure).

An ``[[engines]]`` table::

    [[engines]]
    url = "http://10.0.0.5:8000/v1"    # required: the OpenAI-compatible base URL
    name = "gpu-a"                     # in logs, metrics and failover events (default: host:port)
    api_key = "..."                    # bearer token for this engine (default: upstream_api_key)
    models = ["meta-llama/Llama-3.1-8B-Instruct"]   # default: what its GET /v1/models lists
    max_concurrency = 32               # its requests at once (default: the max_concurrency setting)
    weight = 2.0                       # breaks ties between equally loaded engines (default 1)
    continue = true                    # may continue another engine's cut answer (default true)
    metrics = true                     # read its Prometheus /metrics for routing (default: try once)

Every error names the table and key, and is raised as :class:`ValueError` (the config loader turns
it into its ``ConfigError``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import urlsplit

ENGINE_KEYS: Final = frozenset({"url", "name", "api_key", "models", "max_concurrency", "weight", "continue",
                                "metrics"})
MAX_ENGINES: Final = 256
MAX_NAME_LENGTH: Final = 64


@dataclass(frozen=True)
class EngineSpec:
    """One engine as configured. ``models`` None: discovered from its ``/v1/models``."""

    url: str
    name: str
    api_key: str | None = None
    models: tuple[str, ...] | None = None
    max_concurrency: int | None = None  # None: the server's max_concurrency
    weight: float = 1.0
    can_continue: bool = True
    metrics: bool | None = None  # None: read /metrics until the engine shows it has none


def default_name(url: str) -> str:
    """``host:port`` of a base URL, the name of an engine given only by its URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or "engine"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_url(url: Any, where: str) -> str:
    """A base URL as given, if it is a plain http(s) URL with a host; else ValueError."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{where} must be a non-empty string (an http:// or https:// base URL)")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"{where} is not a valid URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where} must be an http:// or https:// base URL, got {url!r}")
    return url.strip().rstrip("/")


def parse_engine_tables(tables: Any, where: str) -> tuple[EngineSpec, ...]:
    """The ``[[engines]]`` array of tables of a TOML file, checked entry by entry."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{where} must be an array of tables ([[engines]])")
    if len(tables) > MAX_ENGINES:
        raise ValueError(f"{where}: at most {MAX_ENGINES} engines")
    return tuple(_parse_table(table, f"{where}[{i}]") for i, table in enumerate(tables))


def _parse_table(table: dict[str, Any], where: str) -> EngineSpec:
    unknown = sorted(set(table) - ENGINE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(ENGINE_KEYS))})")
    if "url" not in table:
        raise ValueError(f"{where}: 'url' is required")
    url = check_url(table["url"], f"{where}.url")
    name = table.get("name", default_name(url))
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH or not name.isprintable():
        raise ValueError(f"{where}.name must be 1 to {MAX_NAME_LENGTH} printable characters")
    api_key = table.get("api_key")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError(f"{where}.api_key must be a non-empty string")
    models = table.get("models")
    if models is not None:
        if (not isinstance(models, list) or not models
                or not all(isinstance(m, str) and m and len(m) <= 256 for m in models)):
            raise ValueError(f"{where}.models must be a non-empty array of model names")
        if len(set(models)) != len(models):
            raise ValueError(f"{where}.models lists a model twice")
        models = tuple(models)
    concurrency = table.get("max_concurrency")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"{where}.max_concurrency must be a positive integer")
    weight = table.get("weight", 1.0)
    if (isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight)
            or weight <= 0):
        raise ValueError(f"{where}.weight must be a positive number")
    flags = {}
    for key in ("continue", "metrics"):
        value = table.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{where}.{key} must be true or false")
        flags[key] = value
    return EngineSpec(url, name, api_key, models, concurrency, float(weight),
                      can_continue=flags["continue"] is not False, metrics=flags["metrics"])


def combine(urls: Sequence[str], tables: Sequence[EngineSpec], default_concurrency: int) -> tuple[EngineSpec, ...]:
    """``--upstream`` URLs (in order) then ``[[engines]]`` tables, with defaults filled in.

    ValueError when two engines share a name or a URL: a typo would otherwise double one engine's
    share of the traffic, or make logs and failover events ambiguous."""
    specs = [EngineSpec(check_url(url, f"upstream {url!r}"), default_name(url)) for url in urls]
    specs.extend(tables)
    names: dict[str, str] = {}
    seen_urls: set[str] = set()
    for spec in specs:
        if spec.url in seen_urls:
            raise ValueError(f"engine {spec.url} is configured twice")
        seen_urls.add(spec.url)
        if spec.name in names:
            raise ValueError(f"two engines are named {spec.name!r} ({names[spec.name]} and {spec.url}): "
                             "give them distinct names in [[engines]]")
        names[spec.name] = spec.url
    return tuple(spec if spec.max_concurrency is not None else replace(spec, max_concurrency=default_concurrency)
                 for spec in specs)
