"""Resume kept in Redis against resume kept in the process (issue 18): ``python -m bench.redisresume``.

Four kinds of processes: the fake engine (``python -m trioai.fake_upstream --numbered``), a
``redis-server`` the bench starts (a free port of 127.0.0.1, a temporary directory, nothing saved;
killed at the end), ``trioai serve`` and this load generator. The same loads go through the gateway
in three configurations, each measurement on a fresh gateway process, the three in turn for each
load (who goes first rotates from round to round):

* **resume off**: ``trioai serve``;
* **resume on, local**: ``trioai serve --resumable-default`` (every ``/ws/chat`` generation keeps
  its events in its log, in the process);
* **resume on, Redis**: ``trioai serve --redis URL --resumable-default``: the logs are Redis
  Streams and every frame is in Redis before a client gets it ("log, then send": one Redis call per
  batch of frames a connection's writer has waiting).

The loads (``bench.surfaces``'s paced shape): the engine paced at 20 ms/token, ``--loads`` (each
``STREAMSxTOKENS``), all streams at once, one generation each; and a throughput run (unpaced engine,
``--connections`` connections running ``--throughput-tokens`` generations back to back for
``--duration`` s). Every stream must end ``done`` with its exact text (``w0 w1 …``); those that do
not are counted.

The figures, each the median of ``--rounds`` rounds: the gateway's and redis-server's CPU time
(``/proc/PID/task/*/schedstat``) per 1,000 token events (``token`` frames a client got); Redis round
trips on the token path per generation (``trioai_shared_log_appends_total`` from the gateway's
``/metrics``); Redis's own count of commands per generation (``INFO commandstats``: a script call
counts once as ``EVALSHA`` and once per command the script runs; the bench's own ``INFO`` calls
are left out) and of script calls; relayed tokens per second; TTFT and inter-token latency. The
target of issue 18: gateway CPU per 1,000 token events with Redis at most 1.25× that of local
resume.

``--profile S``: py-spy samples the gateway for S seconds under the Redis configuration and under
local resume (``--profile-load`` streams back to back on the paced engine), and the top functions by
own time, the inclusive share of each file and package, and the functions that grew most are printed.

Before each round (and the profiles) the run waits until every core has been under
``--quiet-below`` % busy for ``--quiet-for`` s (at most ``--quiet-cap`` s, then it goes on and says
so); how busy the machine was is printed. ``--gateway-code DIR`` runs the gateway from ``DIR/trioai``.

    python -m bench.redisresume                      # ~4 minutes on a quiet machine
    python -m bench.redisresume --rounds 1 --loads 2x5 --connections 2 --throughput-tokens 8 \\
        --duration 0.3 --profile 0 --quiet-below 0   # a smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date

import trio

from bench.compare import Figures, add_quiet_arguments, busy_percent, fmt, free_port, machine_cpu, schedstat_seconds
from bench.loadgen import LoadResult, percentile
from bench.queue import CURRENT
from bench.run import Process, fake_engine, row
from bench.surfaces import (
    CHAT_PATH,
    Gateway,
    Profile,
    Share,
    Side,
    chat_load,
    difference,
    raw_profile,
    trioai,
    wait_quiet,
    warm_up,
)

OFF, LOCAL, REDIS = "resume off", "resume on, local", "resume on, Redis"
CONFIGS = (OFF, LOCAL, REDIS)
APPENDS = "trioai_shared_log_appends_total"
TARGET = 1.25  # issue 18: gateway CPU per 1,000 token events, Redis-backed resume against local resume
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")

# Figure names (one table row each).
GATEWAY_CPU = "gateway CPU ms / 1,000 token events"
GATEWAY_CPU_TOKENS = "gateway CPU ms / 1,000 tokens"
REDIS_CPU = "redis-server CPU ms / 1,000 token events"
BOTH_CPU = "gateway + redis-server CPU ms / 1,000 token events"
ROUND_TRIPS = "Redis round trips (log appends) / generation"
COMMANDS = "Redis commands / generation (commandstats)"
SCRIPTS = "Redis script calls (EVALSHA) / generation"
TOKS = "relayed tok/s"
EVENTS = "token events / generation"
TTFT = "TTFT p50 ms"
ITL50, ITL99 = "ITL p50 ms", "ITL p99 ms"
BUSY = "machine busy %"
NOT_EXACT = "streams not exact"
ROWS = (GATEWAY_CPU, GATEWAY_CPU_TOKENS, REDIS_CPU, BOTH_CPU, ROUND_TRIPS, COMMANDS, SCRIPTS, TOKS, EVENTS, TTFT,
        ITL50, ITL99, BUSY, NOT_EXACT)


# --- redis-server ----------------------------------------------------------------------------------


def redis_binary(given: str | None) -> str:
    """The redis-server executable: ``given``, else the one on PATH (Debian's)."""
    path = given or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(path):
        raise SystemExit(f"no redis-server ({path}): apt-get install redis-server")
    return path


@dataclass
class Redis:
    """A redis-server started by the bench, and ``redis-cli`` to read its counters."""

    process: trio.Process
    port: int
    cli: str
    unix_socket: str | None = None  # its Unix socket's path, if it listens on one

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """Its ``unix://`` URL (only if it listens on a Unix socket)."""
        assert self.unix_socket is not None
        return f"unix://{self.unix_socket}"

    def cpu_seconds(self) -> float:
        """Its time on a CPU so far, every thread (``schedstat``)."""
        return schedstat_seconds(self.process.pid)

    async def command(self, *words: str) -> str:
        """One command through ``redis-cli``; its reply as text."""
        done = await trio.run_process([self.cli, "-p", str(self.port), *words], capture_stdout=True,
                                      stderr=subprocess.DEVNULL)
        return done.stdout.decode()

    async def commandstats(self) -> Counter[str]:
        """Calls so far by command (``INFO commandstats``)."""
        return parse_commandstats(await self.command("INFO", "commandstats"))


def parse_commandstats(text: str) -> Counter[str]:
    """``cmdstat_NAME:calls=N,…`` lines as a Counter by name."""
    return Counter({found.group(1): int(found.group(2))
                    for found in re.finditer(r"^cmdstat_([^:]+):calls=([0-9]+)", text, re.MULTILINE)})


def redis_cli(binary: str) -> str:
    """redis-cli: next to ``binary``, else on PATH."""
    beside = os.path.join(os.path.dirname(binary), "redis-cli")
    return beside if os.path.exists(beside) else (shutil.which("redis-cli") or "redis-cli")


@asynccontextmanager
async def redis_server(binary: str, cli: str, *, unix_socket: bool = False) -> AsyncIterator[Redis]:
    """redis-server on a free port of 127.0.0.1 (and a Unix socket, with ``unix_socket``) in a temporary
    directory, persisting nothing; killed at the end."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        port = free_port()
        socket_path = os.path.join(directory, "redis.sock") if unix_socket else None
        process = await trio.lowlevel.open_process(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", directory, "--logfile", os.path.join(directory, "redis.log"),
             *(("--unixsocket", socket_path) if socket_path else ())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            with trio.fail_after(10):
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"redis-server exited with {process.returncode}")
                    try:
                        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                        if socket_path is not None:
                            await (await trio.open_unix_socket(socket_path)).aclose()
                        break
                    except OSError:
                        await trio.sleep(0.02)
            yield Redis(process, port, cli, socket_path)
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


# --- one measurement -------------------------------------------------------------------------------


def sides(redis_url: str, code: str) -> dict[str, Side]:
    """The three configurations as ``bench.surfaces`` sides (``/ws/chat``)."""
    return {OFF: Side(OFF, (), CHAT_PATH, chat_load, code),
            LOCAL: Side(LOCAL, ("--resumable-default",), CHAT_PATH, chat_load, code),
            REDIS: Side(REDIS, ("--redis", redis_url, "--resumable-default"), CHAT_PATH, chat_load, code)}


async def appends(gw: Gateway) -> float:
    """The gateway's shared-log appends so far (NaN if its code has no such metric)."""
    try:
        return await gw.metric(APPENDS)
    except RuntimeError:
        return math.nan


@dataclass(frozen=True)
class Reading:
    """Counters read around a load: CPU of the gateway and of redis-server, the machine, Redis calls."""

    gateway: float
    redis: float
    machine: tuple[int, int]
    appends: float
    commands: Counter[str]

    @classmethod
    async def take(cls, gw: Gateway, redis: Redis, first: bool) -> Reading:
        """The CPU counters are read closest to the load: after the HTTP and Redis reads before it
        (``first``), before them after it, so those reads' own CPU stays outside."""
        if not first:
            cpu = (schedstat_seconds(gw.pid), redis.cpu_seconds(), machine_cpu())
        count, commands = await appends(gw), await redis.commandstats()
        if first:
            cpu = (schedstat_seconds(gw.pid), redis.cpu_seconds(), machine_cpu())
        return cls(*cpu, count, commands)


def record(figures: Figures, label: str, result: LoadResult, before: Reading, after: Reading) -> None:
    """Add one load's figures (``label: FIGURE``)."""
    events = sum(stream.frames for stream in result.streams)
    per_1000 = 1e6 / max(events, 1)  # CPU seconds → ms per 1,000 token events
    generations = max(len(result.streams), 1)
    gateway, redis = after.gateway - before.gateway, after.redis - before.redis
    commands = after.commands - before.commands
    commands.pop("info", None)  # the bench's own
    figures.add(f"{label}: {GATEWAY_CPU}", gateway * per_1000)
    figures.add(f"{label}: {GATEWAY_CPU_TOKENS}", gateway * 1e6 / max(result.tokens, 1))
    figures.add(f"{label}: {REDIS_CPU}", redis * per_1000)
    figures.add(f"{label}: {BOTH_CPU}", (gateway + redis) * per_1000)
    figures.add(f"{label}: {ROUND_TRIPS}", (after.appends - before.appends) / generations)
    figures.add(f"{label}: {COMMANDS}", commands.total() / generations)
    figures.add(f"{label}: {SCRIPTS}", sum(commands[name] for name in SCRIPT_COMMANDS) / generations)
    figures.add(f"{label}: {TOKS}", result.tokens_per_s)
    figures.add(f"{label}: {EVENTS}", events / generations)
    figures.add(f"{label}: {TTFT}", percentile(result.ttfts(), 50) * 1000)
    figures.add(f"{label}: {ITL50}", percentile(result.gaps(), 50) * 1000)
    figures.add(f"{label}: {ITL99}", percentile(result.gaps(), 99) * 1000)
    figures.add(f"{label}: {BUSY}", busy_percent(before.machine, after.machine))
    figures.add(f"{label}: {NOT_EXACT}", sum(1 for stream in result.streams if not stream.exact))


async def measure(side: Side, engine: Process, redis: Redis, streams: int, tokens: int, duration: float,
                  label: str, figures: Figures) -> None:
    """``streams`` connections (generations back to back for ``duration`` s; 0: one each) through a
    fresh gateway."""
    if side.name == REDIS:
        await redis.command("FLUSHALL")  # every Redis measurement starts from an empty keyspace
    async with trioai(side, engine.address) as gw:
        await warm_up(side, gw.server.url)
        before = await Reading.take(gw, redis, first=True)
        result = await side.load(gw.server.url, streams, tokens, duration)
        after = await Reading.take(gw, redis, first=False)
    record(figures, label, result, before, after)


# --- the profiles ----------------------------------------------------------------------------------


def file_of(frame: str) -> str:
    """``function (path)`` → path."""
    return frame.rpartition("(")[2].rstrip(")")


def package_of(path: str) -> str:
    """A frame's file as py-spy names it → its top package (``coredis/pool/basic.py`` → ``coredis``)."""
    parts = [part for part in path.split("/") if part]
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            parts = parts[parts.index(marker) + 1:]
    if not parts:
        return path
    if len(parts) > 1 and parts[0] == "trioai":
        return path  # this project's files one by one
    name = parts[0]
    return name.removesuffix(".py") if len(parts) == 1 else name


def package_shares(raw: str) -> tuple[Counter[str], Counter[str]]:
    """Own and inclusive samples by trioai file and by other package, from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        own[package_of(file_of(frames[-1]))] += int(count_text)
        for name in {package_of(file_of(frame)) for frame in frames}:
            inclusive[name] += int(count_text)
    return own, inclusive


def profile_lines(title: str, raw: str, top: int) -> list[str]:
    """Top functions by own time, then own and inclusive shares by trioai file and by package."""
    prof = Profile.parse(raw)
    out = [f"### Profile: {title}, {prof.samples} samples (py-spy, non-idle)", "",
           row("function (own time)", "share"), row("---", "---")]
    out += [row(name.replace("|", "\\|"), prof.share(count)) for name, count in prof.own.most_common(top)]
    own, inclusive = package_shares(raw)
    out += ["", row("trioai file or package", "own time", "inclusive (on the stack)"), row("---", "---", "---")]
    for name, count in own.most_common(top):
        out.append(row(name, prof.share(count), prof.share(inclusive[name])))
    return out


async def profile(side: Side, engine: Process, streams: int, tokens: int, seconds: float) -> str:
    """py-spy's raw samples of the gateway for ``seconds`` while ``streams`` connections run paced generations
    back to back (``bench.surfaces.raw_profile``)."""
    return await raw_profile(side, engine, streams, tokens, seconds)


# --- the run ---------------------------------------------------------------------------------------


def parse_loads(text: str) -> list[tuple[int, int]]:
    """``4x50,64x50`` → ``[(4, 50), (64, 50)]``."""
    loads = []
    for part in text.split(","):
        streams, _, tokens = part.strip().partition("x")
        loads.append((int(streams), int(tokens)))
    return loads


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b and not math.isnan(a) and not math.isnan(b) else "–"


def table(label: str, title: str, figures: dict[str, Figures]) -> list[str]:
    """One load's figures: the three configurations' medians, Redis / local, and each round's ratio."""
    lines = [f"#### {title}", "",
             row("figure (median of rounds)", *CONFIGS, "Redis / local", "Redis / local, per round"), row(*["---"] * 6)]
    for figure in ROWS:
        name = f"{label}: {figure}"
        local, redis = figures[LOCAL].values.get(name, []), figures[REDIS].values.get(name, [])
        per_round = ", ".join(ratio(b, a).rstrip("×") for a, b in zip(local, redis, strict=True))
        if figure == NOT_EXACT:
            cells = [f"{sum(figures[config].values.get(name, [])):.0f}" for config in CONFIGS]
            lines.append(row(f"{figure} (all rounds)", *cells, "–", "–"))
            continue
        lines.append(row(figure, *(fmt(figures[config].median(name)) for config in CONFIGS),
                         ratio(figures[REDIS].median(name), figures[LOCAL].median(name)), per_round))
    return lines


def target_lines(labels: Sequence[str], figures: dict[str, Figures]) -> list[str]:
    """The issue's target, load by load: gateway CPU per 1,000 token events, Redis / local ≤ 1.25×."""
    lines = [f"#### Target (issue 18): gateway CPU per 1,000 token events with Redis ≤ {TARGET:g}× local resume", "",
             row("load", f"{LOCAL} ms", f"{REDIS} ms", "Redis / local", "per round", "gateway + Redis / local",
                 f"≤ {TARGET:g}×"), row(*["---"] * 7)]
    for label in labels:
        name, both = f"{label}: {GATEWAY_CPU}", f"{label}: {BOTH_CPU}"
        local, redis = figures[LOCAL].median(name), figures[REDIS].median(name)
        rounds = zip(figures[LOCAL].values.get(name, []), figures[REDIS].values.get(name, []), strict=True)
        cut = 100 * (1 - TARGET * local / redis)  # what Redis's figure must lose to meet the target
        holds = ("yes" if redis <= TARGET * local
                 else f"no: {redis / local / TARGET:.2f}× the target (−{cut:.0f}% to meet it)")
        lines.append(row(label, fmt(local), fmt(redis), ratio(redis, local),
                         ", ".join(ratio(b, a).rstrip("×") for a, b in rounds),
                         ratio(figures[REDIS].median(both), local), holds))
    return lines


async def main_async(args: argparse.Namespace) -> None:
    figures = {config: Figures() for config in CONFIGS}
    loads = parse_loads(args.loads)
    paced_labels = [f"paced {streams}×{tokens}" for streams, tokens in loads]
    through = f"throughput @{args.connections}"
    notes: list[str] = []
    run_start = Share.now()
    rounds = 0
    profiles: list[tuple[str, str]] = []
    binary = redis_binary(args.redis_server)
    async with (redis_server(binary, redis_cli(binary)) as redis, fake_engine() as unpaced,
                fake_engine("--delay", "0.02", *(("--step",) if args.engine_step else ())) as slow):
        table_sides = sides(redis.url, args.gateway_code or CURRENT)
        for round_number in range(args.rounds):
            calm = await wait_quiet(args.quiet_below, args.quiet_for, args.quiet_cap)
            notes.append(f"before round {round_number + 1}: {calm}")  # not quiet: it goes on and says so
            round_start = Share.now(unpaced, slow)
            shift = round_number % len(CONFIGS)
            order = CONFIGS[shift:] + CONFIGS[:shift]  # who goes first rotates
            for (streams, tokens), label in zip(loads, paced_labels, strict=True):
                for config in order:
                    await measure(table_sides[config], slow, redis, streams, tokens, 0.0, label, figures[config])
            for config in order:
                await measure(table_sides[config], unpaced, redis, args.connections, args.throughput_tokens,
                              args.duration, through, figures[config])
            rounds += 1
            notes.append(f"during round {round_number + 1}: {Share.now(unpaced, slow).since(round_start)}")
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        if args.profile > 0:
            streams, tokens = parse_loads(args.profile_load)[0]
            calm = await wait_quiet(args.quiet_below, args.quiet_for, args.quiet_cap)
            notes.append(f"before the profiles: {calm}")
            for config in (REDIS, LOCAL):
                await redis.command("FLUSHALL")
                profile_start = Share.now(unpaced, slow)
                profiles.append((config, await profile(table_sides[config], slow, streams, tokens, args.profile)))
                notes.append(f"during the {config} profile: {Share.now(unpaced, slow).since(profile_start)}")

    print(f"### Redis-backed resume: {rounds} round(s), {date.today().isoformat()}, python {sys.version.split()[0]}, "
          f"trio {trio.__version__}, {os.cpu_count()} CPUs, gateway code: {args.code_label}\n")
    for label, (streams, tokens) in zip(paced_labels, loads, strict=True):
        pacing = "20 ms/token, every stream on one clock (--engine-step)" if args.engine_step else "20 ms/token"
        print("\n".join(table(label, f"{label}: {streams} streams × {tokens} tokens at once, engine at {pacing}",
                              figures)), end="\n\n")
    print("\n".join(table(through, f"{through}: unpaced engine, {args.connections} connections × "
                                   f"{args.throughput_tokens}-token generations back to back for {args.duration:g} s",
                          figures)), end="\n\n")
    print("\n".join(target_lines([*paced_labels, through], figures)), end="\n\n")
    not_exact = sum(sum(values) for config in CONFIGS for name, values in figures[config].values.items()
                    if name.endswith(f": {NOT_EXACT}"))
    print(f"streams not exact, all configurations and rounds: {not_exact:.0f}\n")
    if profiles:
        streams, tokens = parse_loads(args.profile_load)[0]
        for config, raw in profiles:
            print("\n".join(profile_lines(f"the gateway, {config}, {streams} × {tokens}-token paced streams back to "
                                          f"back, {args.profile:g} s", raw, args.top)), end="\n\n")
        if len(profiles) == 2:
            (a, raw_a), (b, raw_b) = profiles
            print("\n".join(difference((a, Profile.parse(raw_a)), (b, Profile.parse(raw_b)), args.top)), end="\n\n")
    print("### The machine (busy: user + nice + system + irq + softirq; steal is not counted)\n")
    for line in notes:
        print(f"- {line}")
    print(f"- the whole run, waits included: {Share.now().since(run_start)}", flush=True)


def main() -> None:
    """``python -m bench.redisresume``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median")
    parser.add_argument("--loads", default="4x50,16x50,64x50,16x200",
                        help="paced loads, STREAMSxTOKENS comma-separated (default: 4x50,16x50,64x50,16x200)")
    parser.add_argument("--engine-step", action="store_true",
                        help="the paced engine steps every stream on one 20 ms clock, as vLLM's continuous batching "
                             "does (default: each stream 20 ms after its previous token)")
    parser.add_argument("--connections", type=int, default=16, help="connections of the throughput run")
    parser.add_argument("--throughput-tokens", type=int, default=256, help="tokens per generation, throughput run")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of the throughput run")
    parser.add_argument("--profile", type=float, default=0.0,
                        help="seconds of py-spy on the gateway, Redis and local resume (0: none)")
    parser.add_argument("--profile-load", default="64x50", help="STREAMSxTOKENS back to back while profiling")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile")
    parser.add_argument("--redis-server", metavar="PATH", help="the redis-server executable (default: on PATH)")
    add_quiet_arguments(parser, below=15.0, window=20.0, cap=300.0)
    parser.add_argument("--gateway-code", metavar="DIR",
                        help="run the gateway from DIR/trioai (e.g. a copy of a commit's) instead of this tree")
    args = parser.parse_args()
    args.code_label = (os.path.join(os.path.abspath(args.gateway_code), "trioai") if args.gateway_code
                       else "this tree's trioai")
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
