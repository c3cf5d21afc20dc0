"""A TCP proxy the tests can cut: a network that fails between a client and the server.

Each client connection is relayed to the target by two pump tasks. ``cut_after`` makes the proxy
let exactly that many bytes of the server's answer through on the next connection, then cut it;
:meth:`CutProxy.cut` cuts every open connection now. A cut resets (RST, with ``SO_LINGER`` 0) or
closes (FIN) the client side and, unless ``half_open``, the server side too; a half-open cut
leaves the server's side up, so the server does not yet know its client is gone.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field

import trio


@dataclass
class Relay:
    """One relayed connection."""

    client: trio.SocketStream
    server: trio.SocketStream
    cut_after: int | None
    to_client: int = 0  # bytes of the server's answer passed on
    cut_done: trio.Event = field(default_factory=trio.Event)


def _reset(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN."""
    with contextlib.suppress(OSError):  # already closed
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class CutProxy:
    """Relays 127.0.0.1:``port`` to ``target``; cuts connections when told."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.relays: list[Relay] = []
        self.cut_after: int | None = None  # applies to the next connection accepted
        self.rst = True
        self.half_open = False

    @property
    def url(self) -> str:
        """The chat endpoint through the proxy."""
        return f"ws://127.0.0.1:{self.port}/ws/chat"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and relay until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._relay, listeners, handler_nursery=nursery)

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        relay = Relay(client, server, self.cut_after)
        self.cut_after = None
        self.relays.append(relay)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, relay, server, client, True)
            nursery.start_soon(self._pump, relay, client, server, False)
            await relay.cut_done.wait()
            nursery.cancel_scope.cancel()
        await self._close(relay)

    async def _pump(self, relay: Relay, source: trio.SocketStream, sink: trio.SocketStream, to_client: bool) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    break
                if to_client and relay.cut_after is not None:
                    room = relay.cut_after - relay.to_client
                    if len(data) >= room:
                        if room:
                            await sink.send_all(data[:room])
                        relay.to_client += room
                        break
                if to_client:
                    relay.to_client += len(data)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        relay.cut_done.set()

    async def _close(self, relay: Relay) -> None:
        if self.rst:
            _reset(relay.client)
        await trio.aclose_forcefully(relay.client)
        if not self.half_open:
            if self.rst:
                _reset(relay.server)
            await trio.aclose_forcefully(relay.server)

    def cut(self) -> None:
        """Cut every connection relayed now."""
        for relay in self.relays:
            relay.cut_done.set()
