"""The HTTP port: the chat page at ``/``, ``/healthz``, ``/readyz`` and ``/metrics`` (loopback by default).

A deliberately small HTTP/1.1 server on h11: one request per connection (``Connection: close``),
GET and HEAD only, request head bounded in size and time. It runs beside the WebSocket server in
the same process and answers during a drain (``/readyz`` then says 503, so a load balancer stops
sending new clients while running generations finish).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

import h11
import trio

log = logging.getLogger("trioai.http")

MAX_REQUEST_HEAD: Final = 16 * 1024
REQUEST_TIMEOUT: Final = 10.0
RECEIVE_SIZE: Final = 4096


@dataclass(frozen=True)
class Response:
    """What a route answers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Awaitable[Response]]


async def serve_http(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (path → handler) until cancelled; ``nursery.start`` returns the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, partial(_handle, routes), listeners)
        log.info("chat page, health and metrics on http://%s:%d (/, /healthz, /readyz, /metrics)", host, bound)
        task_status.started(bound)


async def _handle(routes: dict[str, Route], stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT):
                request = await _read_request(stream, conn)
                if request is None:
                    return
                response = await _route(routes, request)
                body = b"" if request.method == b"HEAD" else response.body
                headers = [
                    ("content-type", response.content_type),
                    ("content-length", str(len(response.body))),
                    ("connection", "close"),
                    ("cache-control", "no-store"),
                ]
                data = conn.send(h11.Response(status_code=response.status, headers=headers))
                data += conn.send(h11.Data(data=body)) if body else b""
                data += conn.send(h11.EndOfMessage())
                await stream.send_all(data)
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    except Exception:
        log.exception("health/metrics request failed")


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            return event
        else:
            return None


async def _route(routes: dict[str, Route], request: h11.Request) -> Response:
    if request.method not in (b"GET", b"HEAD"):
        return Response(405, b"method not allowed\n")
    path = request.target.decode("ascii", "replace").partition("?")[0]
    handler = routes.get(path)
    if handler is None:
        return Response(404, b"not found\n")
    return await handler()
