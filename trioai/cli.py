"""The ``trioai`` command: argument parsing, logging setup, signals, ``trio.run``."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio

from . import __version__
from .auth import KeyFileError
from .config import EMBEDDED_DEFAULT_MAX_TOKENS, ConfigError, Settings, field_type, load_settings, setting_fields
from .server import RunningServer, Server, serve, server_tls_context
from .systemd import Notifier, inherited_sockets, listeners_from

log = logging.getLogger("trioai")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``trioai``; ``serve``'s options come from :class:`~trioai.config.Settings`."""
    parser = argparse.ArgumentParser(prog="trioai", description="Real-time WebSocket API for LLM engines.")
    parser.add_argument("--version", action="version", version=f"trioai {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_cmd = commands.add_parser(
        "serve",
        help="run the WebSocket server",
        description="Serve ws://HOST:PORT/ws/chat. Settings: command line > TRIOAI_* environment > --config file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    chat_cmd = commands.add_parser(
        "chat",
        help="chat with a trioai server in the terminal",
        description="Interactive chat: tokens print as they arrive; Ctrl-C stops an answer, Ctrl-D leaves.",
    )
    chat_cmd.add_argument("url", nargs="?", default="ws://127.0.0.1:8080/ws/chat",
                          help="the server's chat endpoint (default: %(default)s)")
    chat_cmd.add_argument("--once", metavar="PROMPT", help="answer one prompt on stdout and exit (1 on error)")
    chat_cmd.add_argument("--api-key", default=os.environ.get("TRIOAI_API_KEY"),
                          help="API key (default: $TRIOAI_API_KEY)")
    chat_cmd.add_argument("--max-tokens", type=int, default=None, help="longest answer, in tokens")
    chat_cmd.add_argument("--system", help="a system message to start the conversation with")
    serve_cmd.add_argument("--config", metavar="FILE", help="TOML file of settings (keys as the options below)")
    defaults = Settings()
    for f in setting_fields():
        help_text = f"{f.metadata['help']} (default: {getattr(defaults, f.name)}; env TRIOAI_{f.name.upper()})"
        if field_type(f) is bool:  # a flag: present means true (env and file take true/false)
            serve_cmd.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                                   action="store_const", const="true", help=help_text)
            continue
        serve_cmd.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.split("_")[-1].upper(),
            help=help_text,
            action="append" if f.name == "upstream" else "store",  # one engine per --upstream
        )
    return parser


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the traceback, if any).

    A worker of ``--workers`` also writes its number and pid.
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
            entry["pid"] = record.process
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """Log to stderr, as text lines or JSON objects; under journald, without our own timestamps.

    ``worker``: the number of a ``--workers`` process, written with its pid on every line.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JSONFormatter(worker)
        formatter.converter = time.gmtime
    else:
        fmt = "%(levelname)s %(name)s: %(message)s"
        if worker is not None:
            fmt = f"%(levelname)s %(name)s [worker {worker} pid %(process)d]: %(message)s"
        if "JOURNAL_STREAM" not in os.environ:
            fmt = "%(asctime)s " + fmt
        formatter = logging.Formatter(fmt)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # coredis logs a traceback for every connection attempt a timeout cancels; the shared state logs
    # Redis going away and coming back once each.
    logging.getLogger("coredis").setLevel(logging.CRITICAL)
    # httpx logs every request at INFO; one line per generation is ours to write.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def settings_for_embedded(settings: Settings) -> Settings:
    """``settings`` for the embedded engine: unless set, ``default_max_tokens`` is
    :data:`~trioai.config.EMBEDDED_DEFAULT_MAX_TOKENS` (within ``max_tokens_limit``)."""
    if settings.default_max_tokens is not None:
        return settings
    return dataclasses.replace(
        settings, default_max_tokens=min(EMBEDDED_DEFAULT_MAX_TOKENS, settings.max_tokens_limit)
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_unauthenticated(settings: Settings) -> None:
    """Log a warning when the server will accept anyone on an interface other hosts can reach."""
    if settings.api_keys_file is None and not is_loopback(settings.host):
        log.warning("no API keys (--api-keys-file): anyone who can reach %s may use the engine", settings.host)


def check_tls_files(settings: Settings) -> None:
    """Raise :class:`ConfigError` naming the file unless ``certfile`` and ``keyfile`` load as TLS cert and key.

    The server loads them again when it binds; this check only makes the failure name the file.
    """
    if settings.certfile is None:
        return
    for name, path in (("certfile", settings.certfile), ("keyfile", settings.keyfile)):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"cannot read {name} {path}: {exc.strerror or exc}") from None
    try:
        server_tls_context(settings.certfile, settings.keyfile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        key = f"the key {settings.keyfile}" if settings.keyfile else "the key in it"
        raise ConfigError(f"cannot load the TLS certificate {settings.certfile} with {key}: {exc}") from None


#: A task run beside the server that may drain it (set the event) or stop it (cancel the scope).
Control = Callable[[trio.Event, trio.CancelScope], Awaitable[None]]


async def run_server(
    settings: Settings,
    notifier: Notifier | None = None,
    *,
    listeners: list[trio.SocketListener] | None = None,
    control: Control | None = None,
    on_ready: Callable[[RunningServer], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, drain, then stop every task and child process.

    The first signal starts a graceful drain (see :func:`~trioai.server.serve`); a second one
    stops at once. Under systemd, readiness, stopping and watchdog pings are reported with
    ``sd_notify``, and sockets passed by socket activation are served instead of binding.

    A worker of ``--workers`` (``workers.py``) passes its ``listeners``, a ``control`` task (its
    supervisor's commands) and ``on_ready``, called once the server listens.
    """
    notifier = notifier or Notifier()
    if settings.redis is not None:  # a Redis that does not answer at start is a configuration error
        from .redisstate import check_redis

        await check_redis(settings.redis)
    if listeners is None:
        listeners = listeners_from(inherited_sockets())
    drain = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, drain, nursery.cancel_scope, notifier)
        nursery.start_soon(notifier.run_watchdog)
        if control is not None:
            nursery.start_soon(control, drain, nursery.cancel_scope)
        if not settings.engine_specs():
            from .engine import serve_with_local_engine

            settings = embedded_settings_logged(settings)
            target: Any = partial(serve_with_local_engine, settings, listeners=listeners, drain=drain)
        else:
            target = partial(serve, settings, listeners=listeners, drain=drain)
        running = await nursery.start(_run_then_stop, target, nursery.cancel_scope)
        nursery.start_soon(_reload_on_sighup, running.server)
        notifier.notify("READY=1", f"STATUS=serving {running.url}")
        if on_ready is not None:
            on_ready(running)


def embedded_settings_logged(settings: Settings) -> Settings:
    """:func:`settings_for_embedded`, logging the default answer length it sets."""
    embedded = settings_for_embedded(settings)
    if embedded is not settings:
        log.info("embedded engine: answers without max_tokens stop at %d tokens (--default-max-tokens)",
                 embedded.default_max_tokens)
    return embedded


async def _run_then_stop(
    target: Any, scope: trio.CancelScope, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    await target(task_status=task_status)
    scope.cancel()  # the drain is over: stop the signal handler and the watchdog too


async def _reload_on_sighup(server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            server.reload_keys()


async def _handle_signals(drain: trio.Event, scope: trio.CancelScope, notifier: Notifier) -> None:
    """The first SIGTERM/SIGINT drains, the second stops at once.

    Signals are counted, not the drain: a worker told to drain by its supervisor still drains on the
    SIGTERM that systemd may send every process of the service at the same time.
    """
    first = True
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if first:
                first = False
                log.info("received %s: draining (again to stop at once)", name)
                notifier.notify("STOPPING=1", "STATUS=draining")
                drain.set()
            else:
                log.info("received %s again: stopping now", name)
                scope.cancel()
                return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trioai`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        cli: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        if "upstream" in cli:
            cli["upstream"] = " ".join(cli["upstream"])
        try:
            settings = load_settings(cli, os.environ, args.config or os.environ.get("TRIOAI_CONFIG"))
        except ConfigError as exc:
            print(f"trioai: {exc}", file=sys.stderr)
            return 2
        setup_logging(settings.log_level, settings.log_format)
        return _run(settings)
    if args.command == "chat":
        from .chat import main as chat_main

        return chat_main(args.url, once=args.once, api_key=args.api_key, max_tokens=args.max_tokens,
                         system=args.system)
    return 2


def _run(settings: Settings) -> int:
    try:
        check_tls_files(settings)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 1
    warn_if_unauthenticated(settings)
    if settings.workers > 1:
        from .workers import supervise

        return run_reporting_failures(supervise, settings)
    return run_reporting_failures(run_server, settings)


def run_reporting_failures(async_fn: Callable[..., Awaitable[object]], *args: Any) -> int:
    """``trio.run(async_fn, *args)``: 0, or 1 with a ``cannot start`` line for a failure to start."""
    from .engine import EngineFailed, EngineMissing
    from .workers import WorkerFailed

    failure: BaseException | None = None
    try:
        trio.run(async_fn, *args)
    except* (EngineMissing, EngineFailed, WorkerFailed, ConfigError, OSError, KeyFileError) as group:
        failure = group.exceptions[0]
        while isinstance(failure, BaseExceptionGroup):  # from nested nurseries
            failure = failure.exceptions[0]
    if failure is not None:
        log.error("cannot start: %s", failure)
        return 1
    return 0
