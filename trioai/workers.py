"""``trioai serve --workers N``: N server processes on one port, supervised by the first.

Each worker is ``python -m trioai.workers``: its own process and Trio loop running the normal server
(:func:`trioai.cli.run_server`) with its own listener on the port (``SO_REUSEPORT``: the kernel
spreads new connections among the workers), or, under socket activation, the sockets systemd passed
(all workers accept from them). The parent serves nothing itself: it holds the port, starts the
workers, restarts one that dies, runs the embedded engine when no engine is configured (one for all
workers: they get its URL as their upstream), and talks to systemd.

Task tree::

    supervise                          the parent process
    └── nursery
        ├── _handle_signals            1st SIGTERM/SIGINT → every worker drains; 2nd → Supervisor.stop
        ├── _relay_sighup              SIGHUP → every worker (API keys reloaded)
        ├── Notifier.run_watchdog      (only under systemd's watchdog)
        └── Supervisor.run             holds the port; its nursery is what Supervisor.stop cancels
            ├── LocalEngine.supervise  (only without an engine configured; stopped after the workers)
            └── workers nursery
                ├── _announce_ready    READY=1 once every worker listens
                └── WorkerSlot.run × N start → listening → wait for exit → back off → start …
                    ├── trio.run_process   the worker; stdin: its job, then commands; stdout: reports
                    └── WorkerSlot._watch  (under systemd's watchdog) kills a worker silent too long

The pipe to a worker's stdin carries its job (pickled :class:`WorkerJob`: settings, number, port
or inherited descriptors), then one command a line: ``drain`` or ``stop``. End of file means the
supervisor is gone (even killed with SIGKILL): the worker drains and exits, so no worker outlives
it for longer than a drain. Workers run in their own process group, so a Ctrl-C in a terminal
reaches the supervisor only, which tells them. A worker's stdout carries its reports: when it
listens, and, under systemd's watchdog, ``alive`` as often as the supervisor pings systemd; one
that sends nothing for ``WATCHDOG_USEC`` (its loop is stuck) is killed and restarted.

Without Redis (``redis`` unset) every worker gets its share of the capacity: ``max_concurrency``
and each engine's ``max_concurrency`` divided by N, rounded up (at least 1). Everything else a
process keeps (queues, rate limits, resumable generations) is per worker.

Resource handling: a worker lives only inside its slot's nursery; leaving it (cancelled: a second
signal, or a failure) tells the worker to stop at once and kills it after :data:`STOP_GRACE`.

Error handling: a worker that exits before it listened for the first time is a failure to start
(:class:`WorkerFailed`, ``trioai serve`` exits 1); later exits are logged and the worker restarted
after a backoff (0.5 s doubling to 30 s; reset once a worker stayed up for a minute).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

import trio

from .config import ConfigError, Settings
from .server import RunningServer
from .systemd import Notifier, inherited_sockets, listeners_from

log = logging.getLogger("trioai.workers")

RESTART_BACKOFF_START: Final = 0.5
RESTART_BACKOFF_MAX: Final = 30.0
STABLE_AFTER: Final = 60.0  # a worker up this long resets the backoff
STOP_GRACE: Final = 5.0  # seconds a worker told to stop at once has before SIGKILL
JOB_HEADER: Final = struct.Struct("!I")
MAX_JOB_BYTES: Final = 16 << 20
# Not for workers: sd_notify and socket activation are the supervisor's.
SUPERVISOR_ONLY_ENV: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                              "LISTEN_FDNAMES")


class WorkerFailed(RuntimeError):
    """A worker exited before it listened for the first time."""


@dataclass(frozen=True)
class WorkerJob:
    """What a worker is told on its stdin: its number, its settings and where to listen."""

    index: int
    settings: Settings
    listen_fds: tuple[int, ...] = ()  # socket activation: the supervisor's inherited sockets
    heartbeat: float | None = None  # seconds between "alive" reports (under systemd's watchdog)


# -- pure parts ------------------------------------------------------------------------------------

def share(total: int, workers: int) -> int:
    """One worker's share of ``total``: divided by ``workers``, rounded up, at least 1."""
    return max(1, math.ceil(total / workers))


def divide_capacity(settings: Settings, workers: int) -> Settings:
    """``settings`` with ``max_concurrency`` and each ``[[engines]]`` entry's divided among ``workers``.

    Unchanged with Redis (``redis`` set: admission is shared by every process) or one worker.
    """
    if settings.redis is not None or workers <= 1:
        return settings
    engines = tuple(
        spec if spec.max_concurrency is None else dataclasses.replace(
            spec, max_concurrency=share(spec.max_concurrency, workers))
        for spec in settings.engines
    )
    return dataclasses.replace(settings, max_concurrency=share(settings.max_concurrency, workers), engines=engines)


def worker_http_port(settings: Settings, index: int) -> int | None:
    """Worker ``index``'s (1-based) health and metrics port: ``http_port + index - 1`` (0 stays 0: any)."""
    if settings.http_port is None or settings.http_port == 0:
        return settings.http_port
    return settings.http_port + index - 1


def check_ports(settings: Settings, port: int) -> None:
    """ConfigError when the workers' HTTP ports would collide with ``port`` or leave the port range."""
    if settings.http_port is None or settings.http_port == 0:
        return
    last = settings.http_port + settings.workers - 1
    if last > 65535:
        raise ConfigError(f"--http-port {settings.http_port} with {settings.workers} workers needs ports up to "
                          f"{last}, past 65535")
    if settings.http_port <= port <= last:
        raise ConfigError(f"the workers' HTTP ports {settings.http_port}..{last} include the WebSocket port {port}")


def worker_job(settings: Settings, index: int, port: int, listen_fds: tuple[int, ...] = (),
               heartbeat: float | None = None) -> WorkerJob:
    """Worker ``index``'s job: ``settings`` (capacity already divided) on ``port`` and its HTTP port."""
    return WorkerJob(
        index,
        dataclasses.replace(settings, port=port, workers=1, http_port=worker_http_port(settings, index)),
        listen_fds,
        heartbeat,
    )


def encode_job(job: WorkerJob) -> bytes:
    """The job as written to a worker's stdin: a length, then the pickle."""
    data = pickle.dumps(job)
    return JOB_HEADER.pack(len(data)) + data


def worker_command() -> list[str]:
    """The command line of a worker."""
    return [sys.executable, "-m", "trioai.workers"]


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: ``env`` without what is meant for the supervisor only, and with this
    ``trioai`` package first on ``PYTHONPATH``, so that workers run the same code as their supervisor."""
    worker = {k: v for k, v in env.items() if k not in SUPERVISOR_ONLY_ENV}
    root = str(Path(__file__).resolve().parent.parent)
    worker["PYTHONPATH"] = os.pathsep.join([root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return worker


class RestartBackoff:
    """How long to wait before restarting a worker: doubling from 0.5 s to 30 s, reset by a minute up."""

    def __init__(self) -> None:
        self.delay = RESTART_BACKOFF_START

    def next(self, uptime: float) -> float:
        """The wait before the next start, after a worker that ran ``uptime`` seconds exited."""
        if uptime >= STABLE_AFTER:
            self.delay = RESTART_BACKOFF_START
        delay = self.delay
        self.delay = min(self.delay * 2, RESTART_BACKOFF_MAX)
        return delay


# -- the supervisor --------------------------------------------------------------------------------

class WorkerSlot:
    """One worker's place: its process while it runs, started again when it exits."""

    def __init__(self, index: int, job: bytes, pass_fds: Sequence[int], stopping: trio.Event,
                 silence_limit: float | None = None) -> None:
        self.index = index
        self.job = job
        self.silence_limit = silence_limit  # a worker that reports nothing this long is killed
        self._last_report: float | None = None
        self._reported = trio.Event()
        self.pass_fds = tuple(pass_fds)
        self.stopping = stopping
        self.process: trio.Process | None = None
        self.listening = trio.Event()  # set the first time the worker listens
        self.url: str | None = None
        self.starts = 0
        self._send_lock = trio.Lock()

    async def command(self, word: str) -> None:
        """Send ``drain`` or ``stop`` to the running worker (nothing if there is none)."""
        process = self.process
        if process is not None and process.returncode is None:
            await self._send(process, word.encode() + b"\n")

    async def _send(self, process: trio.Process, data: bytes) -> bool:
        """Write to the worker's stdin, one writer at a time; False if it is gone."""
        if process.stdin is None:
            return False
        async with self._send_lock:
            try:
                await process.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False  # it is exiting; the slot sees that
        return True

    async def run(self) -> None:
        """Keep a worker running until the drain; :class:`WorkerFailed` if the first one never listened."""
        backoff = RestartBackoff()
        while True:
            began = trio.current_time()
            returncode, pid = await self._run_once()
            if self.stopping.is_set():
                log.info("worker %d (pid %d) exited with %s", self.index, pid, returncode)
                return
            if not self.listening.is_set():
                raise WorkerFailed(f"worker {self.index} exited with {returncode} before it listened")
            delay = backoff.next(trio.current_time() - began)
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1f s", self.index, pid, returncode,
                        delay)
            with trio.move_on_after(delay):
                await self.stopping.wait()
            if self.stopping.is_set():
                return

    async def _run_once(self) -> tuple[int | None, int]:
        """Start the worker, pass on its reports until it exits; its exit code and pid."""
        self.starts += 1
        process: trio.Process | None = None
        try:
            async with trio.open_nursery() as nursery:
                process = await nursery.start(partial(
                    trio.run_process, worker_command(), check=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    env=worker_env(os.environ), pass_fds=self.pass_fds, process_group=0,
                    deliver_cancel=self._stop_now,
                ))
                assert process is not None
                assert process.stdout is not None
                self.process = process
                log.info("worker %d started (pid %d)", self.index, process.pid)
                self._last_report, self._reported = None, trio.Event()
                watch = trio.CancelScope()
                if self.silence_limit is not None:
                    nursery.start_soon(self._watch, watch, process, self.silence_limit)
                await self._send(process, self.job)
                if self.stopping.is_set():  # the drain began while it was starting
                    await self._send(process, b"drain\n")
                await self._read_reports(process.stdout, process.pid)
                watch.cancel()
            # run_process returns once the worker has exited
        finally:
            self.process = None
            if process is not None:
                with trio.CancelScope(shield=True):
                    for pipe in (process.stdin, process.stdout):
                        if pipe is not None:
                            await pipe.aclose()
        return process.returncode, process.pid

    async def _watch(self, scope: trio.CancelScope, process: trio.Process, limit: float) -> None:
        """Kill the worker once it has reported nothing for ``limit`` seconds (its loop is stuck)."""
        with scope:
            await self._reported.wait()  # from its first report on: starting up takes what it takes
            while True:
                assert self._last_report is not None
                await trio.sleep_until(self._last_report + limit)
                if trio.current_time() >= self._last_report + limit:
                    log.error("worker %d (pid %d) sent nothing for %.1f s: killing it", self.index, process.pid,
                              limit)
                    process.kill()
                    return

    async def _stop_now(self, process: trio.Process) -> None:
        """The worker's end when this slot is cancelled: ``stop`` (no drain), SIGKILL after :data:`STOP_GRACE`."""
        if not await self._send(process, b"stop\n"):
            process.send_signal(signal.SIGTERM)  # no pipe: two signals, and a second one stops at once
            process.send_signal(signal.SIGINT)
        with trio.move_on_after(STOP_GRACE):
            await process.wait()
        if process.returncode is None:
            log.warning("worker %d (pid %d) did not stop within %.0f s: killing it", self.index, process.pid,
                        STOP_GRACE)
            process.kill()

    async def _read_reports(self, stdout: trio.abc.ReceiveStream, pid: int) -> None:
        """Read the worker's reports until it exits: one a line, ``alive`` or a JSON object once it listens."""
        buffer = b""
        async for data in stdout:
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            self._last_report = trio.current_time()
            self._reported.set()
            for line in lines:
                if line == b"alive":
                    continue
                try:
                    report = json.loads(line)
                    url = str(report["listening"])
                    http = report.get("http")
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("worker %d (pid %d) wrote %r", self.index, pid, line[:200])
                    continue
                self.url = url
                log.info("worker %d (pid %d) listening on %s%s", self.index, pid, url,
                         f", health and metrics on {http}" if http else "")
                self.listening.set()


class Supervisor:
    """Runs ``settings.workers`` workers; :meth:`drain` and :meth:`stop` end them."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.stopping = trio.Event()
        self.slots: list[WorkerSlot] = []
        self.port: int | None = None
        self._cancel = trio.CancelScope()  # the engine and every worker: stop() cancels it
        self._announce_scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the port, start the engine if needed and the workers; return once every worker exited.

        ``nursery.start`` returns once every worker listens.
        """
        settings = self.settings
        inherited = inherited_sockets()
        held: list[socket.socket] = []
        try:
            if inherited:
                port = int(inherited[0].getsockname()[1])
            else:
                from .sockets import reserve_port

                port, held = reserve_port(settings.host, settings.port)
            check_ports(settings, port)
            self.port = port
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    if not settings.engine_specs():
                        settings = await start_local_engine(nursery, settings)
                    if not self.stopping.is_set():  # else a signal came while the engine started
                        await self._run_workers(divide_capacity(settings, settings.workers), port, inherited,
                                                task_status)
                    nursery.cancel_scope.cancel()  # the engine, once every worker is gone
        finally:
            for sock in (*held, *inherited):
                sock.close()

    async def _run_workers(self, settings: Settings, port: int, inherited: list[socket.socket],
                           task_status: trio.TaskStatus[Supervisor]) -> None:
        fds = tuple(sock.fileno() for sock in inherited)
        # Under systemd's watchdog each worker says it is alive as often as the supervisor pings, and
        # one silent for WATCHDOG_USEC (two pings) is killed and restarted: the watchdog's rule, per worker.
        heartbeat = self.notifier.watchdog_interval
        self.slots = [
            WorkerSlot(i, encode_job(worker_job(settings, i, port, fds, heartbeat)), fds, self.stopping,
                       None if heartbeat is None else 2 * heartbeat)
            for i in range(1, settings.workers + 1)
        ]
        async with trio.open_nursery() as workers:
            for slot in self.slots:
                workers.start_soon(slot.run)
            workers.start_soon(self._announce_ready, task_status)

    async def _announce_ready(self, task_status: trio.TaskStatus[Supervisor]) -> None:
        with self._announce_scope:
            for slot in self.slots:
                await slot.listening.wait()
            url = self.slots[0].url
            log.info("%d workers listening on %s", len(self.slots), url)
            self.notifier.notify("READY=1", f"STATUS=serving {url} with {len(self.slots)} workers")
            task_status.started(self)

    async def drain(self) -> None:
        """Every worker drains (see :func:`~trioai.server.serve`) and is not restarted."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._announce_scope.cancel()
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        if not self.slots:  # still starting the engine: nothing to drain
            self._cancel.cancel()
        for slot in self.slots:
            await slot.command("drain")

    def stop(self) -> None:
        """Every worker stops at once (and is killed if it has not after :data:`STOP_GRACE` s)."""
        self.stopping.set()
        self._announce_scope.cancel()
        self._cancel.cancel()

    async def relay(self, signum: int) -> None:
        """Send ``signum`` to every running worker."""
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signum)


async def start_local_engine(nursery: trio.Nursery, settings: Settings) -> Settings:
    """Start the embedded engine in ``nursery`` (once, for every worker); the workers' settings.

    As :func:`~trioai.engine.serve_with_local_engine` does for one process: the workers get the
    engine's URL as their upstream, its model name and its concurrency (1).
    """
    from .cli import embedded_settings_logged
    from .engine import LOCAL_CONCURRENCY, LocalEngine, check_engine_installed, free_port, resolve_model

    settings = embedded_settings_logged(settings)
    check_engine_installed()
    model_path, alias = await trio.to_thread.run_sync(resolve_model, settings)
    engine = LocalEngine(
        model_path, alias=alias, port=settings.local_port or free_port(), threads=settings.local_threads,
        ctx=settings.local_ctx, start_timeout=settings.local_start_timeout,
    )
    base_url = await nursery.start(engine.supervise)
    return dataclasses.replace(settings, upstream=base_url, model=alias,
                               max_concurrency=min(settings.max_concurrency, LOCAL_CONCURRENCY))


async def supervise(settings: Settings, notifier: Notifier | None = None) -> None:
    """``trioai serve --workers N``: run the workers until SIGTERM or SIGINT, drain them, exit.

    The first signal drains every worker; a second one stops them at once. SIGHUP is passed on.
    """
    supervisor = Supervisor(settings, notifier)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, supervisor)
        nursery.start_soon(_relay_sighup, supervisor)
        nursery.start_soon(supervisor.notifier.run_watchdog)
        await supervisor.run()
        nursery.cancel_scope.cancel()


async def _handle_signals(supervisor: Supervisor) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not supervisor.stopping.is_set():
                log.info("received %s: draining %d workers (again to stop at once)", name, len(supervisor.slots))
                await supervisor.drain()
            else:
                log.info("received %s again: stopping the workers now", name)
                supervisor.stop()
                return


async def _relay_sighup(supervisor: Supervisor) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            await supervisor.relay(signal.SIGHUP)


# -- a worker --------------------------------------------------------------------------------------

def read_job(fd: int) -> WorkerJob:
    """The job the supervisor wrote to ``fd`` (blocking: before the worker's event loop starts)."""
    header = _read_exactly(fd, JOB_HEADER.size)
    (size,) = JOB_HEADER.unpack(header)
    if size > MAX_JOB_BYTES:
        raise ValueError(f"a worker job of {size} bytes")
    job = pickle.loads(_read_exactly(fd, size))  # written by our own parent, on a pipe
    if not isinstance(job, WorkerJob):
        raise TypeError(f"not a worker job: {type(job).__name__}")
    return job


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the supervisor closed the pipe before sending the whole job")
        data += chunk
    return data


async def follow_supervisor(fd: int, drain: trio.Event, scope: trio.CancelScope) -> None:
    """A worker's ``control`` task: the supervisor's commands on ``fd``; end of file drains too."""
    async with trio.lowlevel.FdStream(os.dup(fd)) as stream:
        buffer = b""
        async for data in stream:
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line == b"drain" and not drain.is_set():
                    log.info("told to drain")
                    drain.set()
                elif line == b"stop":
                    log.info("told to stop now")
                    scope.cancel()
                    return
    if not drain.is_set():
        log.warning("the supervisor is gone: draining")
        drain.set()


async def _control(job: WorkerJob, control_fd: int, report_fd: int, drain: trio.Event,
                   scope: trio.CancelScope) -> None:
    """The worker's link to its supervisor: its commands, and "alive" reports if it wants them."""
    async with trio.open_nursery() as nursery:
        if job.heartbeat is not None:
            nursery.start_soon(_heartbeat, report_fd, job.heartbeat)
        await follow_supervisor(control_fd, drain, scope)
        nursery.cancel_scope.cancel()


async def _heartbeat(report_fd: int, interval: float) -> None:
    while True:
        try:
            os.write(report_fd, b"alive\n")
        except OSError:
            return  # the supervisor is gone: follow_supervisor drains
        await trio.sleep(interval)


async def run_worker(job: WorkerJob, control_fd: int, report_fd: int) -> None:
    """A worker's server: :func:`~trioai.cli.run_server` on its listeners, following its supervisor."""
    from .cli import run_server
    from .sockets import reuseport_sockets

    settings = job.settings
    if job.listen_fds:
        sockets = [socket.socket(fileno=fd) for fd in job.listen_fds]
    else:
        sockets = reuseport_sockets(settings.host, settings.port)

    def report(running: RunningServer) -> None:
        try:
            os.write(report_fd, json.dumps({"listening": running.url, "http": running.http_url}).encode() + b"\n")
        except OSError as exc:  # the supervisor is gone: follow_supervisor drains
            log.warning("cannot report to the supervisor: %s", exc)

    await run_server(settings, Notifier({}), listeners=listeners_from(sockets),
                     control=partial(_control, job, control_fd, report_fd), on_ready=report)


def worker_main() -> int:
    """A worker process: read the job from stdin, serve; stdout carries reports to the supervisor."""
    from .cli import run_reporting_failures, setup_logging

    report_fd = os.dup(1)
    os.dup2(2, 1)  # a stray print must not corrupt the reports
    try:
        job = read_job(0)
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        print(f"trioai worker: no job from the supervisor: {exc}", file=sys.stderr)
        return 2
    setup_logging(job.settings.log_level, job.settings.log_format, worker=job.index)
    return run_reporting_failures(run_worker, job, 0, report_fd)


if __name__ == "__main__":
    from trioai.workers import worker_main as _main  # the module itself, not this __main__ copy

    sys.exit(_main())
