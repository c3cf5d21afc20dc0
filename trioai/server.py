"""The server: TCP listeners, the WebSocket handshake, and one :class:`Session` per connection.

Task tree::

    serve                             owns the upstream client (closed on exit)
    └── services nursery
        ├── Server.sweep              every connection's timers: pings, idle and send timeouts
        ├── serve_http                health, readiness, metrics (when --http-port is set)
        └── connections nursery       serve_listeners' handler nursery: outlives accepting, for the drain
            ├── accepting nursery
            │   └── serve_listeners       one accept loop per listener
            └── Server.serve_stream × N   one per connection: the handshake, then Session.run
                └── connection nursery    trio-websocket's reader task and every task of the session
                                          (see session.py for those)

Graceful drain (when the ``drain`` event is set): the accepting nursery is cancelled, which closes
the listeners; every session is told to drain (no new requests, close 1001 when idle); after
``drain_timeout`` the remaining generations end with ``error`` ``shutting_down``; ``serve``
returns once every connection is closed. The drain waits on a condition (no session, no handshake
being accepted) re-checked whenever one ends, so a handshake accepted during the drain, itself told
to drain at once, cannot make it wait the full timeout.

The handshake: ``--max-connections`` counts open sessions plus handshakes being accepted (the slot
is taken before ``request.accept`` awaits and handed to the session or freed), so a burst never
exceeds it. The client a session's rate limits count against is its API key id, or its address:
the TCP peer's, or, when the peer is in ``--trusted-proxies``, the one the proxy's
``X-Forwarded-For`` / ``X-Real-IP`` names (``clientaddr.py``). ``/readyz`` asks the engine through
one :class:`SharedCall`: one check in flight, its answer shared by every probe for a second.

Each connection has exactly one nursery. trio-websocket's ``WebSocketServer`` would open one of its
own around the session's (~1.3 KB more per idle connection), so the server drives the handshake
with trio-websocket's ``wrap_server_stream`` and enforces the handshake timeout itself.

Error handling: an exception escaping a connection's task would propagate into ``serve_listeners``
and stop the server. :meth:`Server.serve_stream` therefore catches ``Exception`` (never
``Cancelled``), logs it with its traceback, and closes that one connection with 1011.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from .auth import KeyFileError, KeySet, Rejection, check_handshake
from .clientaddr import client_address
from .clusteradmission import Cluster
from .config import Settings
from .enginepool import Engine, EnginePool
from .enginespec import EngineSpec, default_name
from .gateway import EngineWatch, Gateway
from .http import Response, Route, serve_http
from .metrics import CONTENT_TYPE
from .responses_session import ResponsesSession
from .session import Session
from .sharedgen import SharedGenerations
from .singleflight import SharedCall
from .sockets import ClientStream
from .state import make_state
from .transport import H11Transport
from .upstream import Upstream
from .wsframing import wrap_server_stream  # trio-websocket's, plus a close frame for framing violations

log = logging.getLogger("trioai.server")

CHAT_PATH: Final = "/ws/chat"
RESPONSES_PATH: Final = "/v1/responses"  # OpenAI's Responses WebSocket mode (responses_session.py)
#: The wire protocol each path speaks: one core, a session class per protocol.
SESSION_TYPES: Final[dict[str, type[Session]]] = {CHAT_PATH: Session, RESPONSES_PATH: ResponsesSession}
# Messages trio-websocket buffers between its reader and our receive loop; ours never blocks long.
MESSAGE_QUEUE_SIZE: Final = 4
CLOSE_INTERNAL_ERROR: Final = 1011
READY_CHECK_TIMEOUT: Final = 2.0
READY_CHECK_TTL: Final = 1.0
SWEEP_MIN: Final = 0.005
SWEEP_MAX: Final = 1.0


@dataclass(frozen=True)
class RunningServer:
    """What ``nursery.start(serve, settings)`` returns: where the server listens."""

    host: str
    port: int
    gateway: Gateway
    server: Server
    http_port: int | None = None
    tls: bool = False

    @property
    def http_url(self) -> str | None:
        """The health and metrics base URL, e.g. ``http://127.0.0.1:8081``, if that port is on."""
        if self.http_port is None:
            return None
        host = self.gateway.settings.http_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.http_port}"

    @property
    def url(self) -> str:
        """The chat endpoint, e.g. ``ws://127.0.0.1:8080/ws/chat`` (``wss://`` with TLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}{CHAT_PATH}"

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for OpenAI's SDK, e.g. ``http://127.0.0.1:8080/v1`` (it derives
        ``ws://…/v1/responses`` from it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/v1"


class Server:
    """Accepts WebSocket handshakes on ``/ws/chat`` and runs a session for each."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        settings = gateway.settings
        self.keys = KeySet.load(settings.api_keys_file) if settings.api_keys_file else None
        self.origins = settings.origins()
        self.trusted_proxies = settings.trusted_networks()
        self.sessions: set[Session] = set()
        self.draining = False
        self._conn_ids = itertools.count(1)
        # Handshakes past the connection cap's check, being accepted: each holds a slot (see _accept).
        self._accepting = 0
        # Woken whenever a session ends or an accepted handshake settles: the drain re-checks then.
        self._changed = trio.lowlevel.ParkingLot()
        # /readyz asks the engine once at a time, whatever the number of probes, and keeps the answer.
        self._ready_check = SharedCall(self._engines_ready_now, ttl=READY_CHECK_TTL, error_ttl=READY_CHECK_TTL)
        gateway.metrics.watch(
            connections_open=lambda: len(self.sessions),
            streams_running=lambda: gateway.pool.running,
            streams_queued=lambda: gateway.pool.queued,
            draining=lambda: float(self.draining),
        )
        gateway.metrics.detached.set_function(lambda: gateway.registry.detached)
        gateway.metrics.log_bytes.set_function(lambda: gateway.registry.log_bytes)

    @property
    def open_connections(self) -> int:
        """Connections with a running session."""
        return len(self.sessions)

    def reload_keys(self) -> None:
        """Read the API keys file again (on SIGHUP); on failure keep the keys in use."""
        path = self.gateway.settings.api_keys_file
        if path is None:
            log.info("no API keys file configured: nothing to reload")
            return
        try:
            self.keys = KeySet.load(path)
        except KeyFileError as exc:
            log.error("keeping the current API keys: %s", exc)
        else:
            log.info("reloaded %d API key(s) from %s", len(self.keys.digests), path)

    def routes(self, ws_port: int, tls: bool) -> dict[str, Route]:
        """The HTTP port's endpoints: the chat page, health, readiness and metrics."""
        page = chat_page(ws_port, tls)

        async def index() -> Response:
            return Response(200, page, "text/html; charset=utf-8")

        return {"/": index, "/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics}

    async def _healthz(self) -> Response:
        return Response(200, b"ok\n")

    async def _readyz(self) -> Response:
        if self.draining:
            return Response(503, b"draining\n")
        ready, detail = await self._ready_check.get()  # one check of the engines in flight, shared by every probe
        state = self.gateway.state
        if state is not None and not state.available:  # only a Redis state is ever unavailable
            detail += "shared state: degraded (Redis unavailable; serving with local state)\n"
        return Response(200 if ready else 503, detail.encode())

    async def _metrics(self) -> Response:
        return Response(200, self.gateway.metrics.render(), CONTENT_TYPE)

    async def _engines_ready_now(self) -> tuple[bool, str]:
        with trio.move_on_after(READY_CHECK_TIMEOUT):
            return await self.gateway.pool.check_ready()
        return False, "upstream not answering\n"

    async def sweep(self) -> None:
        """Run every connection's timers from this one task (see :meth:`Session.tick`), and close
        engine connections that sat idle too long."""
        interval = sweep_interval(self.gateway.settings)
        transports = [e.upstream.transport for e in self.gateway.pool.engines]
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for session in list(self.sessions):
                session.tick(now)
            self.gateway.registry.sweep(now)
            for transport in transports:
                if isinstance(transport, H11Transport):
                    transport.close_expired()

    async def drain(self, grace: float) -> None:
        """Let active generations finish for up to ``grace`` seconds, then end the rest; close all."""
        self.draining = True
        for session in list(self.sessions):
            session.drain()
        with trio.move_on_after(grace):
            await self._wait_no_sessions()
        if self.sessions:
            log.info("drain timeout: ending %d connection(s) with shutting_down", len(self.sessions))
            for session in list(self.sessions):
                session.stop()
        with trio.move_on_after(self.gateway.settings.close_timeout + 1.0):
            await self._wait_no_sessions()

    async def _wait_no_sessions(self) -> None:
        """Return once no session is open and no handshake is being accepted (it would become one).

        The condition is re-checked after every change: a handshake accepted meanwhile adds a
        session that must end too, and no event captured earlier can miss that.
        """
        while self.sessions or self._accepting:
            await self._changed.park()
        await trio.lowlevel.checkpoint()

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """serve_listeners' handler for one connection: handshake, session, close.

        The connection's one nursery holds trio-websocket's reader task and every task of the
        session. A bug of ours in any of them costs this connection (closed with 1011), never the
        server; the socket is closed on the way out whatever happened.
        """
        session: Session | None = None
        peer = peer_address(stream)
        if isinstance(stream, trio.SocketStream):
            stream = ClientStream(stream)  # plain TCP: lean reads and writes (see sockets.py)
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(self.gateway.settings.handshake_timeout):
                    request = await wrap_server_stream(
                        nursery, stream, message_queue_size=MESSAGE_QUEUE_SIZE,
                        max_message_size=self.gateway.settings.max_message_size,
                    )
                    session = await self._accept(request, peer)
                if session is None:
                    nursery.cancel_scope.cancel()  # rejected or timed out: stop trio-websocket's reader
                else:
                    await session.run(nursery)  # cancels the nursery when the connection ends
        except Exception:
            log.exception("connection conn=%s failed", session.conn_id if session else "-")
            if session is not None:
                await session.close_now(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            await trio.aclose_forcefully(stream)
            if session is not None:
                self._session_ended(session)

    async def _accept(self, request: WebSocketRequest, peer: tuple[str, int] | None) -> Session | None:
        """Check the path, the limits and the credentials; accept (a new session) or reject (None)."""
        path = request.path.partition("?")[0]
        if self.draining:
            await reject(request, 503, "server shutting down")
            return None
        session_type = SESSION_TYPES.get(path)
        if session_type is None:
            await reject(request, 404, f"not found; the endpoints are {CHAT_PATH} and {RESPONSES_PATH}")
            return None
        if len(self.sessions) + self._accepting >= self.gateway.settings.max_connections:
            self.gateway.metrics.handshakes_rejected.labels("503").inc()
            await reject(request, 503, "too many connections; retry later")
            return None
        decision = check_handshake(
            keys=self.keys,
            allowed_origins=self.origins,
            headers=request.headers,
            subprotocols=request.proposed_subprotocols,
            target=request.path,
        )
        if isinstance(decision, Rejection):
            self.gateway.metrics.handshakes_rejected.labels(str(decision.status)).inc()
            await reject(request, decision.status, decision.reason)
            return None
        # Hold the slot across the await, or a burst of handshakes all pass the check above.
        self._accepting += 1
        try:
            ws = await request.accept(subprotocol=decision.subprotocol)
        except ConnectionClosed:
            return None
        finally:
            self._accepting -= 1  # the slot passes to the session added below (no await between), or is free
            self._changed.unpark_all()
        self.gateway.metrics.connections.inc()
        conn_id = next(self._conn_ids)
        address = client_address(peer[0] if peer else None, request.headers, self.trusted_proxies)
        session = session_type(ws, self.gateway, conn_id, decision.key_id or address or "-", decision.key_id)
        self.sessions.add(session)
        if self.draining:
            session.drain()
        where = f"{peer[0]}:{peer[1]}" if peer else "-"
        if peer is not None and address != peer[0]:
            where = f"{address} via={where}"  # named by a trusted proxy
        log.info("connection conn=%d open peer=%s key=%s", conn_id, where, decision.key_id or "-")
        return session

    def _session_ended(self, session: Session) -> None:
        self.sessions.discard(session)
        self._changed.unpark_all()
        reason = session.ws.closed
        log.info(
            "connection conn=%d closed code=%s requests=%d duration_s=%.1f",
            session.conn_id,
            reason.code if reason is not None else "-",
            session.requests,
            trio.current_time() - session.opened_at,
        )


def peer_address(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The client's address and port (None once it is gone, or for a stream that is not TCP)."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        address = stream.socket.getpeername()
    except OSError:
        return None
    return str(address[0]), int(address[1])


async def reject(request: WebSocketRequest, status: int, reason: str) -> None:
    """Refuse a handshake with an HTTP ``status`` and ``reason`` as a one-line text body."""
    with contextlib.suppress(ConnectionClosed):
        await request.reject(status, body=f"{reason}\n".encode())


def sweep_interval(settings: Settings) -> float:
    """How often the sweeper runs: a quarter of the shortest connection timer, within 5 ms .. 1 s.

    A timer therefore fires at most that much late (a 20 s ping interval: 1 s).
    """
    timers = [t for t in (settings.ping_interval, settings.idle_timeout, settings.send_timeout) if t > 0]
    return min(SWEEP_MAX, max(SWEEP_MIN, min(timers) / 4))


def chat_page(ws_port: int, tls: bool) -> bytes:
    """The browser chat page (``static/index.html``), told which port and scheme the WebSocket uses."""
    html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    html = html.replace("{{WS_PORT}}", str(ws_port)).replace("{{WS_SCHEME}}", "wss" if tls else "ws")
    return html.encode()


def server_tls_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    """A TLS server context with the default (secure) protocol and cipher choices."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def make_upstream(settings: Settings, spec: EngineSpec) -> Upstream:
    """The shared client of one engine, configured from ``settings`` and its entry."""
    concurrency = spec.max_concurrency or settings.max_concurrency
    return Upstream(
        spec.url,
        api_key=spec.api_key or settings.upstream_api_key,
        connect_timeout=settings.connect_timeout,
        first_token_timeout=settings.first_token_timeout,
        token_timeout=settings.token_timeout,
        # One per admitted request, so none waits for a connection (model and health checks have a
        # pool of their own); the slack covers connections still being closed after a cancel.
        max_connections=concurrency + 4,
    )


@asynccontextmanager
async def open_engines(settings: Settings, specs: Sequence[EngineSpec]) -> AsyncIterator[EnginePool]:
    """The engine pool of ``specs``, every engine's connections closed on exit."""
    engines: list[Engine] = []
    try:
        for spec in specs:
            engines.append(Engine(spec, make_upstream(settings, spec)))
        yield EnginePool(engines, settings)
    finally:
        for engine in engines:
            with trio.CancelScope(shield=True):
                await engine.upstream.aclose()


async def serve(
    settings: Settings,
    *,
    upstream_url: str | None = None,
    engine: EngineWatch | None = None,
    listeners: list[trio.SocketListener] | None = None,
    drain: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/ws/chat`` and ``/v1/responses`` relaying to ``upstream_url`` (default: the
    engines of ``settings``: ``--upstream`` and ``[[engines]]``).

    ``engine`` is the embedded engine's supervisor, when there is one (it explains broken streams).
    ``listeners`` are already-listening sockets (systemd socket activation); without them, binds
    ``settings.host:port``. Runs until cancelled, or until ``drain`` is set and the drain is over.

    Supports ``await nursery.start(serve, settings)``, which returns a :class:`RunningServer` once
    the listeners accept connections.
    """
    if upstream_url is not None:
        specs = settings.engine_specs() if settings.engines else ()
        specs = (EngineSpec(upstream_url.rstrip("/"), default_name(upstream_url),
                            max_concurrency=settings.max_concurrency), *specs)
    else:
        specs = settings.engine_specs()
    if not specs:
        raise ValueError("serve() needs an upstream URL; the embedded engine is started by run_server()")
    async with open_engines(settings, specs) as pool:
        gateway = Gateway(settings, pool, engine=engine)
        if not listeners:
            listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
        sockname = listeners[0].socket.getsockname()
        ws_listeners: list[trio.SSLListener[trio.SocketStream] | trio.SocketListener] = list(listeners)
        if settings.certfile:
            tls = server_tls_context(settings.certfile, settings.keyfile)
            ws_listeners = [trio.SSLListener(listener, tls, https_compatible=True) for listener in listeners]
        server = Server(gateway)
        async with trio.open_nursery() as services:
            state = make_state(settings)
            await services.start(state.run)
            if settings.redis is not None:
                gateway.rate_limiter.state = state  # per-key limits count across instances
                await services.start(gateway.rate_limiter.run)
                gateway.shared = SharedGenerations(state, settings, on_append=gateway.metrics.shared_appends.inc)
                await services.start(gateway.shared.run)
                cluster = Cluster(state, settings.lease_seconds)  # capacity and queues across instances
                pool.share_admission(cluster)
                await services.start(cluster.run)
            gateway.state = state
            gateway.metrics.state_degraded.set_function(lambda: 0.0 if state.available else 1.0)
            await services.start(gateway.registry.run)
            await services.start(pool.run)
            services.start_soon(server.sweep)
            http_port = None
            if settings.http_port is not None:
                routes = server.routes(int(sockname[1]), bool(settings.certfile))
                http_port = await services.start(serve_http, settings.http_host, settings.http_port, routes)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    await accepting.start(
                        functools.partial(trio.serve_listeners, server.serve_stream, ws_listeners,
                                          handler_nursery=connections)
                    )
                    running = RunningServer(
                        str(sockname[0]), int(sockname[1]), gateway, server, http_port, tls=bool(settings.certfile)
                    )
                    log.info("listening on %s (%s)", running.url, ", ".join(
                        f"engine {e.name} at {e.upstream.base_url}" for e in pool.engines))
                    task_status.started(running)
                    if drain is None:
                        await trio.sleep_forever()
                    await drain.wait()
                    accepting.cancel_scope.cancel()
                log.info("draining: %d connection(s), up to %.0f s", server.open_connections, settings.drain_timeout)
                await server.drain(settings.drain_timeout)
                connections.cancel_scope.cancel()
            services.cancel_scope.cancel()
