"""The server: TCP listeners, the WebSocket handshake, and one :class:`Session` per connection.

Task tree::

    serve                         owns the upstream client (closed on exit) and the engine, if embedded
    └── server nursery
        └── WebSocketServer.run   trio-websocket: serve_listeners, one accept loop per listener
            └── handler nursery   per connection: trio-websocket's reader task and _handle_connection
                └── Server.handle → Session.run (see session.py for the tasks below it)

Error handling: trio-websocket does not catch a handler's exception; it would propagate into
``serve_listeners`` and stop the server. :meth:`Server.handle` therefore catches ``Exception``
(never ``Cancelled``), logs it with its traceback, and closes that one connection with 1011.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer

from .config import Settings
from .gateway import EngineWatch, Gateway
from .session import Session
from .upstream import Upstream

log = logging.getLogger("trioai.server")

CHAT_PATH: Final = "/ws/chat"
# Messages trio-websocket buffers between its reader and our receive loop; ours never blocks long.
MESSAGE_QUEUE_SIZE: Final = 4
CLOSE_INTERNAL_ERROR: Final = 1011


@dataclass(frozen=True)
class RunningServer:
    """What ``nursery.start(serve, settings)`` returns: where the server listens."""

    host: str
    port: int
    gateway: Gateway
    server: Server

    @property
    def url(self) -> str:
        """The chat endpoint, e.g. ``ws://127.0.0.1:8080/ws/chat``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{CHAT_PATH}"


class Server:
    """Accepts WebSocket handshakes on ``/ws/chat`` and runs a session for each."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.open_connections = 0
        self._conn_ids = itertools.count(1)

    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket's handler: check the path, accept, run the session, log."""
        path = request.path.partition("?")[0]
        if path != CHAT_PATH:
            with contextlib.suppress(ConnectionClosed):
                await request.reject(404, body=f"not found; the chat endpoint is {CHAT_PATH}\n".encode())
            return
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        conn_id = next(self._conn_ids)
        remote = ws.remote
        peer = str(remote) if isinstance(remote, str) else f"{remote.address}:{remote.port}"
        started = trio.current_time()
        session = Session(ws, self.gateway, conn_id)
        self.open_connections += 1
        log.info("connection conn=%d open peer=%s", conn_id, peer)
        try:
            await session.run()
        except Exception:
            log.exception("connection conn=%d failed", conn_id)
            with trio.move_on_after(self.gateway.settings.close_timeout) as scope:
                scope.shield = True
                await ws.aclose(CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            self.open_connections -= 1
            reason = ws.closed
            log.info(
                "connection conn=%d closed code=%s requests=%d duration_s=%.1f",
                conn_id,
                reason.code if reason is not None else "-",
                session.requests,
                trio.current_time() - started,
            )


def make_upstream(settings: Settings, base_url: str) -> Upstream:
    """The shared upstream client configured from ``settings``."""
    return Upstream(
        base_url,
        api_key=settings.upstream_api_key,
        connect_timeout=settings.connect_timeout,
        first_token_timeout=settings.first_token_timeout,
        token_timeout=settings.token_timeout,
        # Enough pooled connections that admitted requests never wait for one, plus model/health checks.
        max_connections=settings.max_concurrency + 4,
    )


async def serve(
    settings: Settings,
    *,
    upstream_url: str | None = None,
    engine: EngineWatch | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/ws/chat`` until cancelled, relaying to ``upstream_url`` (default: ``settings.upstream``).

    ``engine`` is the embedded engine's supervisor, when there is one (it explains broken streams).

    Supports ``await nursery.start(serve, settings)``, which returns a :class:`RunningServer` once
    the listeners accept connections.
    """
    base_url = upstream_url or settings.upstream
    if base_url is None:
        raise ValueError("serve() needs an upstream URL; the embedded engine is started by run_server()")
    async with make_upstream(settings, base_url) as upstream:
        gateway = Gateway(settings, upstream, engine=engine)
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
        server = Server(gateway)
        ws_server = WebSocketServer(
            server.handle,
            listeners,
            message_queue_size=MESSAGE_QUEUE_SIZE,
            max_message_size=settings.max_message_size,
            connect_timeout=settings.handshake_timeout,
            disconnect_timeout=settings.close_timeout,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(ws_server.run)
            sockname = listeners[0].socket.getsockname()
            running = RunningServer(str(sockname[0]), int(sockname[1]), gateway, server)
            log.info("listening on %s (upstream %s)", running.url, base_url)
            task_status.started(running)
            await trio.sleep_forever()
