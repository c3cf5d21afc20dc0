"""The ``trioai`` command: argument parsing, logging setup, signals, ``trio.run``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from . import __version__
from .config import ConfigError, Settings, load_settings, setting_fields
from .server import serve

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
    serve_cmd.add_argument("--config", metavar="FILE", help="TOML file of settings (keys as the options below)")
    defaults = Settings()
    for f in setting_fields():
        serve_cmd.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{f.metadata['help']} (default: {getattr(defaults, f.name)}; env TRIOAI_{f.name.upper()})",
        )
    return parser


def setup_logging(level: str) -> None:
    """Log lines to stderr; journald adds its own timestamps, so none are printed under it."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    # httpx logs every request at INFO; one line per generation is ours to write.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def run_server(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then stop every task and child process."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
        if settings.upstream is None:
            from .engine import serve_with_local_engine

            await serve_with_local_engine(settings)
        else:
            await serve(settings)


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trioai`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        cli: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        try:
            settings = load_settings(cli, os.environ, args.config or os.environ.get("TRIOAI_CONFIG"))
        except ConfigError as exc:
            print(f"trioai: {exc}", file=sys.stderr)
            return 2
        setup_logging(settings.log_level)
        return _run(settings)
    return 2


def _run(settings: Settings) -> int:
    from .engine import EngineFailed, EngineMissing

    failure: BaseException | None = None
    try:
        trio.run(run_server, settings)
    except* (EngineMissing, EngineFailed, OSError) as group:
        failure = group.exceptions[0]
    if failure is not None:
        log.error("cannot start: %s", failure)
        return 1
    return 0
