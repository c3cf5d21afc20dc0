"""Resume on vs off (issue 14), /v1/responses vs /ws/chat (issue 16), side by side: ``python -m bench.surfaces``.

Three processes as in ``bench.compare``: the fake engine (``python -m trioai.fake_upstream --numbered``),
``trioai serve`` and this load generator. Every measurement runs on a fresh gateway process; the two
sides of each comparison alternate which goes first in each round, and every figure is the median of
``--rounds`` rounds. ``--gateway-code DIR`` runs the gateway from ``DIR/trioai`` (as in ``bench.queue``),
e.g. a copy of one commit's package, so that edits to the tree during the run change nothing.

* **Resume on vs off** (issue 14): the same loads against ``trioai serve --resumable-default`` (every
  ``/ws/chat`` generation resumable: its events are kept in its log) and against ``trioai serve``.
* **``/v1/responses`` vs ``/ws/chat``** (issue 16): the same loads over OpenAI's Responses WebSocket
  mode (``response.create`` at ``ws://HOST:PORT/v1/responses``, read until ``response.completed`` or
  ``response.incomplete``; a token event is a ``response.output_text.delta``) and over ``/ws/chat``.

The loads: paced (engine at 20 ms/token), ``--streams`` × ``--tokens`` and ``--long-streams`` ×
``--long-tokens``, all streams at once, one generation each (``bench.loadgen.ws_load``'s shape);
and a throughput run (unpaced engine, ``--connections`` connections running ``--throughput-tokens``
generations back to back for ``--duration`` s). Every stream must end normally with the exact text
(``w0 w1 …``): ``done`` on ``/ws/chat``; on ``/v1/responses`` ``response.completed``, or
``response.incomplete`` for ``max_output_tokens`` (the fake engine stops with ``length``).

"gateway CPU" is the trioai process's time on a CPU from ``/proc/PID/task/*/schedstat``
(nanoseconds; ``bench.compare`` reads ``/proc/PID/stat``, 10 ms ticks, too coarse for the small
runs here), per 1,000 token events (frames carrying text) or, in the throughput run, per 1,000
tokens.

Memory (issue 14): ``--memory-n`` connections each ask for a ``--memory-tokens`` answer (unpaced
engine), read it to its end and close; the gateway runs with ``--resume-window 300``, so with
resume on the ended generations (and their logs) are kept. The gateway's VmRSS before and after,
divided by N, with resume on and off (off: what the connections leave behind; on − off: what a
kept generation costs); ``trioai_resume_log_bytes`` from ``/metrics`` is the logs' own count. The
same with the connections closed after ``--detach-after`` tokens of a slow engine (detached
generations still running; with resume off they are cancelled).

Where the time goes (issue 16): py-spy samples the gateway for ``--profile`` s under a paced
``/v1/responses`` load (and the same over ``/ws/chat``), and the top functions by own time are
printed with the inclusive share of ``trioai/responses.py`` (the Responses codec).

Before each round (and the profile) the run waits until every core has been under
``--quiet-below`` % busy for ``--quiet-for`` s (at most ``--quiet-cap`` s, then it stops), so that
another benchmark on the machine does not spoil this one's numbers, nor this one its; the figures
are printed, and so is the share of the machine other processes used during the whole run.

    python -m bench.surfaces                    # ~5 minutes on a quiet machine
    python -m bench.surfaces --rounds 1 --streams 2 --tokens 5 --long-streams 2 --long-tokens 5 \\
        --duration 0.3 --memory-n 2 --memory-tokens 5 --profile 0 --quiet-below 0   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from bench.compare import (
    Figures,
    Server,
    add_quiet_arguments,
    busy_percent,
    fmt,
    free_port,
    machine_cpu,
    process_cpu_seconds,
    schedstat_seconds,
)
from bench.loadgen import PROMPT, LoadResult, StreamResult, expected_text, percentile, ws_load
from bench.queue import CURRENT, gateway_from
from bench.run import Process, fake_engine, row

CHAT_PATH = "/ws/chat"
RESPONSES_PATH = "/v1/responses"
RESUME_OFF, RESUME_ON = "resume off", "resume on"
CHAT, RESPONSES = "/ws/chat", "/v1/responses"
RESPONSES_CODEC = "trioai/responses.py"
#: Functions whose inclusive share the profile prints: the outbox's encoding step (a ``/ws/chat`` frame,
#: or the neutral event handed to the Responses encoder), the encoder itself, the request parser.
INCLUSIVE = ("_Entry.take (trioai/outbox.py)", "ResponseEncoder.encode (trioai/responses.py)",
             "parse_client_event (trioai/responses.py)", "encode_token (trioai/protocol.py)",
             "Session._write_loop (trioai/session.py)")

Load = Callable[[str, int, int, float], Awaitable[LoadResult]]


# --- the machine ---------------------------------------------------------------------------------


def core_ticks() -> list[tuple[int, int]]:
    """Busy and total ticks of each core so far (``/proc/stat``'s ``cpuN`` lines).

    Busy is user + nice + system + irq + softirq (guest time is inside user and nice); total adds
    idle, iowait and steal (the hypervisor's: not a process of this machine)."""
    cores = []
    with open("/proc/stat") as stat:
        for line in stat:
            name, *values = line.split()
            if re.fullmatch(r"cpu[0-9]+", name):
                user, nice, system, idle, iowait, irq, softirq, steal = (int(value) for value in values[:8])
                busy = user + nice + system + irq + softirq
                cores.append((busy, busy + idle + iowait + steal))
    return cores


def cores_busy(before: Sequence[tuple[int, int]], after: Sequence[tuple[int, int]]) -> list[float]:
    """Each core's busy % between two :func:`core_ticks` readings."""
    return [100.0 * (a[0] - b[0]) / (a[1] - b[1]) if a[1] > b[1] else 0.0 for b, a in zip(before, after, strict=True)]


@dataclass
class Quiet:
    """How busy the cores were in the window the run waited for (or the last one, if it gave up)."""

    busy: list[float]
    waited: float
    ok: bool = True

    def __str__(self) -> str:
        if not self.busy:
            return "not checked"
        shares = " / ".join(f"{share:.0f}%" for share in self.busy)
        return (f"cores {shares} busy over the last window (waited {self.waited:.0f} s)"
                + ("" if self.ok else ": NOT QUIET, gave up waiting"))


async def wait_quiet(below: float, window: float, cap: float) -> Quiet:
    """Return once every core was under ``below`` % busy for ``window`` s, or after ``cap`` s with ``ok``
    False (``below`` 0: at once)."""
    start = time.monotonic()
    if below <= 0:
        return Quiet([], 0.0)
    while True:
        before = core_ticks()
        await trio.sleep(window)
        busy = cores_busy(before, core_ticks())
        waited = time.monotonic() - start
        if all(share < below for share in busy):
            return Quiet(busy, waited)
        print(f"machine busy ({' / '.join(f'{s:.0f}%' for s in busy)}): waiting for every core under {below:g}%",
              file=sys.stderr, flush=True)
        if waited >= cap:
            return Quiet(busy, waited, ok=False)


def own_cpu_seconds(*running: Process) -> float:
    """CPU time of this process, of its children that have ended (gateways, py-spy) and of ``running`` ones."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
            + sum(process_cpu_seconds(process.process.pid) for process in running))


@dataclass(frozen=True)
class Share:
    """A reading of the cores and of this run's CPU, to tell how much of the machine others used meanwhile."""

    cores: list[tuple[int, int]]
    ours: float

    @classmethod
    def now(cls, *running: Process) -> Share:
        return cls(core_ticks(), own_cpu_seconds(*running))

    def since(self, before: Share) -> str:
        """This run's and all other processes' share of the machine's CPU time between the two readings."""
        ticks = os.sysconf("SC_CLK_TCK")
        pairs = list(zip(before.cores, self.cores, strict=True))
        busy = sum(end[0] - start[0] for start, end in pairs) / ticks
        total = sum(end[1] - start[1] for start, end in pairs) / ticks
        ours = self.ours - before.ours
        if not total:
            return "–"
        return (f"this run {100 * ours / total:.1f}%, other processes {max(0.0, 100 * (busy - ours) / total):.1f}% "
                f"of the machine over {total / max(len(pairs), 1):.0f} s")


def gateway_cpu_seconds(pid: int) -> float:
    """Time process ``pid`` has been on a CPU, all its threads (``schedstat``, ns); ``/proc/PID/stat`` if absent."""
    return schedstat_seconds(pid)


# --- the Responses client ------------------------------------------------------------------------


async def responses_generate(ws: WebSocketConnection, request_id: str, max_tokens: int) -> StreamResult:
    """One ``response.create`` read to its terminal event; ``outcome`` is ``done`` for a normal end.

    A normal end: ``response.completed``, or ``response.incomplete`` because of ``max_output_tokens``
    (the numbered fake engine stops with ``length``). Anything else keeps its type (and status).
    ``request_id`` is unused (the server names the response); it is there to match ``ws_generate``.
    """
    result = StreamResult(sent_at=trio.current_time())
    await ws.send_message(json.dumps({"type": "response.create", "model": "fake-model", "input": PROMPT[0]["content"],
                                      "max_output_tokens": max_tokens}))
    while True:
        event: dict[str, Any] = json.loads(await ws.get_message())
        kind = event["type"]
        if kind == "response.output_text.delta":
            result.on_token(event["delta"], trio.current_time())
        elif kind in ("response.completed", "response.incomplete", "response.failed", "error"):
            response = event.get("response") or {}
            reason = (response.get("incomplete_details") or {}).get("reason")
            normal = kind == "response.completed" or (kind == "response.incomplete" and reason == "max_output_tokens")
            result.outcome = "done" if normal else f"{kind}:{response.get('status') or event.get('error')}"
            result.exact = normal and result.text == expected_text(max_tokens)
            return result


async def responses_load(url: str, connections: int, max_tokens: int, duration: float) -> LoadResult:
    """The load of ``bench.loadgen.ws_load`` over ``/v1/responses``."""
    return await ws_load(url, connections, max_tokens, duration, responses_generate)


async def chat_load(url: str, connections: int, max_tokens: int, duration: float) -> LoadResult:
    """``bench.loadgen.ws_load`` itself."""
    return await ws_load(url, connections, max_tokens, duration)


# --- the gateway ---------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of a comparison: the gateway's options, the path and the client."""

    name: str
    options: tuple[str, ...]
    path: str
    load: Load
    code: str = CURRENT  # the trioai package the gateway runs: this tree's, or DIR/trioai (bench.queue)


SIDES: dict[str, Side] = {
    RESUME_OFF: Side(RESUME_OFF, (), CHAT_PATH, chat_load),
    RESUME_ON: Side(RESUME_ON, ("--resumable-default",), CHAT_PATH, chat_load),
    CHAT: Side(CHAT, (), CHAT_PATH, chat_load),
    RESPONSES: Side(RESPONSES, (), RESPONSES_PATH, responses_load),
}
PAIRS = ((RESUME_OFF, RESUME_ON), (CHAT, RESPONSES))


@dataclass
class Gateway:
    """A running ``trioai serve``: as ``bench.compare.Server`` (its URL is the side's path) and its ``/metrics``."""

    server: Server
    metrics_url: str

    @property
    def pid(self) -> int:
        return self.server.process.pid

    async def metric(self, name: str) -> float:
        """One unlabelled gauge or counter from ``/metrics``."""
        async with httpx.AsyncClient(timeout=10.0) as client:
            text = (await client.get(self.metrics_url)).text
        found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
        if not found:
            raise RuntimeError(f"{name} not in /metrics")
        return float(found.group(1))


@asynccontextmanager
async def trioai(side: Side, upstream: str, *options: str) -> AsyncIterator[Gateway]:
    """``trioai serve`` with the side's options, as ``bench.compare`` runs it, plus a metrics port."""
    http_port = free_port()
    args = ("--send-timeout", "60", "--max-connections", "20000", "--http-port", str(http_port),
            *side.options, *options)
    process: Process
    async with gateway_from(side.code, upstream, args) as process:
        url = process.address.removesuffix(CHAT_PATH) + side.path
        yield Gateway(Server(side.name, process.process, url), f"http://127.0.0.1:{http_port}/metrics")


def failures(result: LoadResult) -> int:
    """Streams that did not end normally with the exact text."""
    return sum(1 for stream in result.streams if not stream.exact)


async def warm_up(side: Side, url: str) -> None:
    if failures(result := await side.load(url, 1, 4, 0.0)):
        raise RuntimeError(f"{side.name}: the warm-up request failed: {result.streams}")


# --- the measurements ----------------------------------------------------------------------------


async def paced(side: Side, engine: Process, streams: int, tokens: int, label: str, figures: Figures) -> None:
    """All ``streams`` at once against the paced engine: gateway CPU per 1,000 token events, TTFT, ITL."""
    async with trioai(side, engine.address) as gw:
        await warm_up(side, gw.server.url)
        machine_before, cpu_before, ticks_before = machine_cpu(), gateway_cpu_seconds(gw.pid), gw.server.cpu_seconds()
        result = await side.load(gw.server.url, streams, tokens, 0.0)
        machine_after, cpu_after, ticks_after = machine_cpu(), gateway_cpu_seconds(gw.pid), gw.server.cpu_seconds()
    events = sum(stream.frames for stream in result.streams)
    figures.add(f"{label}: gateway CPU ms / 1000 token events", (cpu_after - cpu_before) * 1e6 / max(events, 1))
    figures.add(f"{label}: the same from /proc/PID/stat (ticks)", (ticks_after - ticks_before) * 1e6 / max(events, 1))
    figures.add(f"{label}: token events", events)
    figures.add(f"{label}: TTFT p50 ms", percentile(result.ttfts(), 50) * 1000)
    figures.add(f"{label}: ITL p99 ms", percentile(result.gaps(), 99) * 1000)
    figures.add(f"{label}: machine busy %", busy_percent(machine_before, machine_after))
    figures.add("requests not ended normally", failures(result))


async def throughput(side: Side, engine: Process, connections: int, tokens: int, duration: float, label: str,
                     figures: Figures) -> None:
    """Unpaced engine, generations back to back: relayed tokens/s and gateway CPU per 1,000 tokens."""
    async with trioai(side, engine.address) as gw:
        await warm_up(side, gw.server.url)
        cpu_before = gateway_cpu_seconds(gw.pid)
        result = await side.load(gw.server.url, connections, tokens, duration)
        cpu_after = gateway_cpu_seconds(gw.pid)
    figures.add(f"{label}: tok/s", result.tokens_per_s)
    figures.add(f"{label}: gateway CPU ms / 1000 tokens", (cpu_after - cpu_before) * 1e6 / max(result.tokens, 1))
    figures.add(f"{label}: token events / 1000 tokens",
                1000 * sum(stream.frames for stream in result.streams) / max(result.tokens, 1))
    figures.add("requests not ended normally", failures(result))


async def hold(url: str, count: int, tokens: int, detach_after: int | None, resumable: bool | None = None) -> int:
    """``count`` connections, each one ``/ws/chat`` request for ``tokens`` tokens, read to its end (or to
    ``detach_after`` tokens); once every connection got there, all close. ``resumable`` goes in the
    message unless None (the server's default). Returns the requests that did not get there (ended
    early, or not ``done`` with the exact text)."""
    arrived = 0
    bad = 0
    everyone = trio.Event()

    async def connection(index: int) -> None:
        nonlocal arrived, bad
        async with open_websocket_url(url) as ws:
            message: dict[str, Any] = {"type": "message", "id": f"m{index}", "messages": PROMPT, "max_tokens": tokens}
            if resumable is not None:
                message["resumable"] = resumable
            await ws.send_message(json.dumps(message))
            seen, text = 0, ""
            while detach_after is None or seen < detach_after:
                event = json.loads(await ws.get_message())
                if event["type"] == "token":
                    seen += 1
                    text += event["content"]
                elif event["type"] in ("done", "cancelled", "error"):
                    bad += detach_after is not None or event["type"] != "done" or text != expected_text(tokens)
                    break
            arrived += 1
            if arrived == count:
                everyone.set()
            await everyone.wait()

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(connection, index)
    return bad


async def memory(side: Side, engine: Process, count: int, tokens: int, detach_after: int | None, label: str,
                 figures: Figures) -> None:
    """VmRSS growth per generation after ``count`` connections ran one each and closed (resume window 300 s).

    Run to their end (``detach_after`` None), the generations are measured after a first, identical
    batch of ``"resumable": false`` ones: the heap has grown to what N connections and generations
    need, so what is left is what the kept generations hold. Detached (closed mid-answer), no such
    first batch: it would also hide what the still running generations hold."""
    async with trioai(side, engine.address, "--resume-window", "300") as gw:
        await warm_up(side, gw.server.url)
        bad = 0 if detach_after is not None else await hold(gw.server.url, count, tokens, None, resumable=False)
        await trio.sleep(0.5)
        before = gw.server.rss_kib()
        bad += await hold(gw.server.url, count, tokens, detach_after)
        await trio.sleep(1.0)  # the sessions end, the detached generations settle
        after = gw.server.rss_kib()
        log_bytes = await gw.metric("trioai_resume_log_bytes")
        detached = await gw.metric("trioai_generations_detached")
    figures.add(f"{label}: KiB RSS / generation", (after - before) / count)
    figures.add(f"{label}: log KiB / generation", log_bytes / 1024 / count)
    figures.add(f"{label}: detached generations", detached)
    figures.add("requests not ended normally", bad)


# --- the profile ---------------------------------------------------------------------------------


@dataclass
class Profile:
    """py-spy's samples (non-idle) of one process: own time by function, inclusive share by file."""

    samples: int
    own: Counter[str]
    functions: Counter[str]  # inclusive: samples with the function anywhere on the stack
    files: Counter[str]

    @classmethod
    def parse(cls, raw: str) -> Profile:
        """py-spy's ``--format raw --nolineno`` output: ``frame;frame;…;leaf COUNT`` per line."""
        own: Counter[str] = Counter()
        functions: Counter[str] = Counter()
        files: Counter[str] = Counter()
        samples = 0
        for line in raw.splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            samples += count
            own[frames[-1]] += count
            for frame in set(frames):
                functions[frame] += count
            for name in {frame.rpartition("(")[2].rstrip(")") for frame in frames}:
                files[name] += count
        return cls(samples, own, functions, files)

    def share(self, count: int) -> str:
        return f"{100.0 * count / self.samples:.1f}%" if self.samples else "–"

    def lines(self, title: str, top: int) -> list[str]:
        """A Markdown table of the top functions by own time and the codec's inclusive share."""
        out = [f"### Profile: {title}, {self.samples} samples (py-spy, non-idle)", "",
               row("function (own time)", "share"), row("---", "---")]
        out += [row(name.replace("|", "\\|"), self.share(count)) for name, count in self.own.most_common(top)]
        codec_own = sum(count for name, count in self.own.items() if f"({RESPONSES_CODEC})" in name)
        out += ["", f"- {RESPONSES_CODEC}: own time {self.share(codec_own)}, inclusive (a frame of it anywhere on the "
                f"stack) {self.share(self.files.get(RESPONSES_CODEC, 0))}"]
        out += [f"- inclusive {name}: {self.share(self.functions.get(name, 0))}" for name in INCLUSIVE]
        trioai_files = [(name, count) for name, count in self.files.most_common()
                        if name.startswith("trioai/") and count < self.samples]  # not the entry point's
        out.append("- inclusive by trioai file: " + ", ".join(f"{name} {self.share(count)}"
                                                             for name, count in trioai_files[:8]))
        return out


async def profile(side: Side, engine: Process, streams: int, tokens: int, seconds: float) -> Profile:
    """py-spy on the gateway for ``seconds`` while ``streams`` connections run paced generations back to back."""
    return Profile.parse(await raw_profile(side, engine, streams, tokens, seconds))


async def raw_profile(side: Side, engine: Process, streams: int, tokens: int, seconds: float) -> str:
    """py-spy's raw samples for :func:`profile`."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    async with trioai(side, engine.address) as gw:
        await warm_up(side, gw.server.url)
        with tempfile.TemporaryDirectory() as tmp:
            output = os.path.join(tmp, "profile.txt")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(side.load, gw.server.url, streams, tokens, seconds + 3.0)
                await trio.sleep(1.0)  # past the first burst of requests
                await trio.run_process([spy, "record", "-o", output, "--format", "raw", "--nolineno",
                                        "-d", str(max(1, round(seconds))), "-p", str(gw.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return await trio.Path(output).read_text()


# --- the run -------------------------------------------------------------------------------------


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}×" if theirs and not math.isnan(theirs) and not math.isnan(ours) else "–"


def table(title: str, pair: tuple[str, str], figures: dict[str, Figures], names: Sequence[str]) -> list[str]:
    """Medians of the rounds, the ratio of the medians, and each round's ratio (the two sides of a round
    ran back to back)."""
    a, b = pair
    lines = [title, "", row("figure (median of rounds)", a, b, f"{b} / {a}", "per round"), row(*["---"] * 5)]
    for name in names:
        x, y = figures[a].median(name), figures[b].median(name)
        rounds = zip(figures[a].values.get(name, []), figures[b].values.get(name, []), strict=True)
        lines.append(row(name, fmt(x), fmt(y), ratio(y, x), ", ".join(ratio(v, u).rstrip("×") for u, v in rounds)))
    return lines


def difference(a: tuple[str, Profile], b: tuple[str, Profile], top: int) -> list[str]:
    """The functions whose own time grew most from profile ``b`` to profile ``a`` (samples: ~10 ms each)."""
    (name_a, prof_a), (name_b, prof_b) = a, b
    grown = sorted(set(prof_a.own) | set(prof_b.own), key=lambda f: prof_b.own[f] - prof_a.own[f])
    lines = [f"### Own time, {name_a} − {name_b} (samples of ~10 ms; totals {prof_a.samples} and {prof_b.samples})",
             "", row("function", name_a, name_b, "difference"), row(*["---"] * 4)]
    for function in grown[:top]:
        lines.append(row(function.replace("|", "\\|"), prof_a.own[function], prof_b.own[function],
                         f"{prof_a.own[function] - prof_b.own[function]:+d}"))
    return lines


def print_tables(args: argparse.Namespace, figures: dict[str, Figures], rounds: int) -> None:
    """The two comparisons' tables, as measured so far."""
    labels = dict.fromkeys(f"paced {s}×{t}" for s, t in ((args.streams, args.tokens),
                                                          (args.long_streams, args.long_tokens)))
    through = f"throughput @{args.connections}"
    cpu_names = [f"{label}: {figure}" for label in labels
                 for figure in ("gateway CPU ms / 1000 token events", "the same from /proc/PID/stat (ticks)",
                                "TTFT p50 ms", "ITL p99 ms", "machine busy %")]
    through_names = [f"{through}: tok/s", f"{through}: gateway CPU ms / 1000 tokens",
                     f"{through}: token events / 1000 tokens"]
    memory_names = [f"{kind}: {figure}" for kind in ("ended", "detached")
                    for figure in ("KiB RSS / generation", "log KiB / generation", "detached generations")]
    print(f"### Resume and /v1/responses: {rounds} round(s), {date.today().isoformat()}, "
          f"python {sys.version.split()[0]}, trio {trio.__version__}, {os.cpu_count()} CPUs\n")
    print("\n".join(table(f"#### Resume on vs off (issue 14): paced at 20 ms/token; throughput unpaced, "
                          f"{args.throughput_tokens}-token generations for {args.duration:g} s; memory: "
                          f"{args.memory_n} connections × {args.memory_tokens} tokens, --resume-window 300 "
                          f"(ended: after a first batch of as many non-resumable ones), detached after "
                          f"{args.detach_after} tokens of the paced engine",
                          (RESUME_OFF, RESUME_ON), figures, [*cpu_names, *through_names, *memory_names])))
    on, off = figures[RESUME_ON], figures[RESUME_OFF]
    kept = on.median("ended: KiB RSS / generation") - off.median("ended: KiB RSS / generation")
    detached = on.median("detached: KiB RSS / generation") - off.median("detached: KiB RSS / generation")
    print(f"\nKiB RSS per kept (ended) generation, on − off: {kept:.1f}; per detached running generation, "
          f"on − off: {detached:.1f}")
    for kind in ("ended", "detached"):
        name = f"{kind}: KiB RSS / generation"
        print(f"- {kind}, per round (off → on): " + ", ".join(
            f"{u:.1f} → {v:.1f}" for u, v in zip(off.values.get(name, []), on.values.get(name, []), strict=True)))
    print()
    print("\n".join(table("#### /v1/responses vs /ws/chat (issue 16): the same loads", (CHAT, RESPONSES), figures,
                          [*cpu_names, *through_names])))
    not_normal = sum(sum(f.values.get("requests not ended normally", [])) for f in figures.values())
    print(f"\nrequests not ended normally: {not_normal:.0f}\n", flush=True)


async def main_async(args: argparse.Namespace) -> None:
    if args.gateway_code:
        for name, side in SIDES.items():
            SIDES[name] = replace(side, code=args.gateway_code)
    figures = {name: Figures() for name in SIDES}
    quiet: list[str] = []
    paced_loads = ((args.streams, args.tokens), (args.long_streams, args.long_tokens))
    through = f"throughput @{args.connections}"
    run_start = Share.now()
    rounds = 0
    async with (fake_engine() as unpaced, fake_engine("--delay", "0.02") as slow):
        for round_number in range(args.rounds):
            calm = await wait_quiet(args.quiet_below, args.quiet_for, args.quiet_cap)
            quiet.append(f"before round {round_number + 1}: {calm}")
            if not calm.ok:
                break
            round_start = Share.now(unpaced, slow)
            for pair in PAIRS:
                order = pair if round_number % 2 == 0 else pair[::-1]
                for streams, tokens in paced_loads:
                    for name in order:
                        await paced(SIDES[name], slow, streams, tokens, f"paced {streams}×{tokens}", figures[name])
                for name in order:
                    await throughput(SIDES[name], unpaced, args.connections, args.throughput_tokens, args.duration,
                                     through, figures[name])
            for name in (RESUME_OFF, RESUME_ON) if round_number % 2 == 0 else (RESUME_ON, RESUME_OFF):
                await memory(SIDES[name], unpaced, args.memory_n, args.memory_tokens, None, "ended", figures[name])
                await memory(SIDES[name], slow, args.memory_n, args.memory_tokens, args.detach_after, "detached",
                             figures[name])
            rounds += 1
            quiet.append(f"during round {round_number + 1}: {Share.now(unpaced, slow).since(round_start)}")
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        print_tables(args, figures, rounds)
        profiles: list[tuple[str, Profile]] = []
        if args.profile > 0:
            calm = await wait_quiet(args.quiet_below, args.quiet_for, args.quiet_cap)
            quiet.append(f"before the profiles: {calm}")
            for name in (RESPONSES, CHAT) if calm.ok else ():
                profile_start = Share.now(unpaced, slow)
                profiles.append((name, await profile(SIDES[name], slow, args.streams, args.tokens, args.profile)))
                quiet.append(f"during the {name} profile: {Share.now(unpaced, slow).since(profile_start)}")
    for name, prof in profiles:
        print("\n".join(prof.lines(f"the gateway under {args.streams} × {args.tokens}-token paced streams back to "
                                   f"back over {name}, {args.profile:g} s", args.top)), end="\n\n")
    if len(profiles) == 2:
        print("\n".join(difference(profiles[0], profiles[1], args.top)), end="\n\n")

    print("### The machine (busy: user + nice + system + irq + softirq; steal is not counted)\n")
    for line in quiet:
        print(f"- {line}")
    print(f"- the whole run, waits included: {Share.now().since(run_start)}")  # every child has ended by now


def main() -> None:
    """``python -m bench.surfaces``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median")
    parser.add_argument("--streams", type=int, default=64, help="streams of the first paced load")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per stream of the first paced load")
    parser.add_argument("--long-streams", type=int, default=4, help="streams of the second paced load")
    parser.add_argument("--long-tokens", type=int, default=200, help="tokens per stream of the second paced load")
    parser.add_argument("--connections", type=int, default=16, help="connections of the throughput run")
    parser.add_argument("--throughput-tokens", type=int, default=256, help="tokens per generation, throughput run")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of the throughput run")
    parser.add_argument("--memory-n", type=int, default=200, help="generations of the memory runs")
    parser.add_argument("--memory-tokens", type=int, default=1000, help="tokens per generation, memory runs")
    parser.add_argument("--detach-after", type=int, default=5, help="tokens read before closing, detached run")
    parser.add_argument("--profile", type=float, default=10.0, help="seconds of py-spy per surface (0: none)")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile")
    add_quiet_arguments(parser, below=15.0, window=20.0, cap=900.0, at_cap="stop")
    parser.add_argument("--gateway-code", metavar="DIR",
                        help="run the gateway from DIR/trioai (e.g. a copy of a commit's) instead of this tree")
    args = parser.parse_args()
    if args.gateway_code:
        print(f"gateway code: {os.path.join(os.path.abspath(args.gateway_code), 'trioai')}\n")
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
