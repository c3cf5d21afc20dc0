"""What one connection has yet to send: ordered, bounded, and coalescing.

Only the session's writer task writes to the WebSocket. Generation tasks and the receive task hand it
events through an :class:`Outbox`, because a task cancelled in the middle of ``send_all`` would
leave half a frame on the wire and corrupt the connection for every other stream on it.

Ordering: one FIFO of items. A stream's unsent deltas live in slots: a slot sits in the FIFO where
its first delta arrived, and later deltas of the same kind join it while it is unsent and still the
stream's last item; the writer sends a slot as one event (``token``, ``reasoning``, or ``tool_call``
for one ``index``, content concatenated in order: a client reading slower than the engine writes
gets fewer, larger events and loses nothing). A delta of another kind starts a new slot after it,
so kinds never reorder. A stream's terminal event is appended after its slots, so no delta can
follow it. ``queued`` positions keep only the latest unsent value.

Bounds: a stream's slot holds at most ``stream_buffer_bytes`` characters before the generation waits
(which in turn stops reading from the engine); all of a connection's unsent frames together hold at
most ``connection_buffer_bytes`` (``queued_bytes``, counted in characters of JSON text, token slots
by their text) before every generation of the connection waits the same way and new requests wait
to start (:meth:`Outbox.wait_for_room`) — a finished stream's unsent text and terminal event count
until they are sent; connection-level events (errors for bad frames, pongs) wait when
``max_control`` are unsent, which stops the receive task from reading. So a client that does not
read, or reads slowly while it keeps starting generations, cannot make the server buffer without
limit: each bound may be overshot by at most one engine delta per stream.

Idle cost: an idle connection has no writer task and no FIFO. The first item queued calls
``start_writer`` (the session starts its writer task); the writer leaves when it has nothing to send
and no generation is running (:meth:`Outbox.writer_stopped`), and the next item starts a new one.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from .protocol import (
    TERMINAL_EVENTS,
    Queued,
    RequestId,
    ServerEvent,
    encode,
    encode_id,
    encode_reasoning,
    encode_token,
    encode_tool_call,
)

DEFAULT_MAX_CONTROL: Final = 64
DEFAULT_CONNECTION_BUFFER_BYTES: Final = 262144


class _TextSlot:
    """A stream's unsent ``token`` (or, with ``reasoning``, ``reasoning``) text; reused once sent."""

    __slots__ = ("id_json", "reasoning", "parts", "size", "queued", "drained", "logprobs")

    def __init__(self, id_json: str, reasoning: bool = False) -> None:
        self.id_json = id_json
        self.reasoning = reasoning
        self.parts: list[str] = []
        self.size = 0
        self.queued = False
        self.drained: trio.Event | None = None
        self.logprobs: list[Any] | None = None

    def take(self) -> str:
        parts = self.parts
        text = parts[0] if len(parts) == 1 else "".join(parts)
        if self.reasoning:
            frame = encode_reasoning(self.id_json, text)
        else:
            frame = encode_token(self.id_json, text, self.logprobs)
            self.logprobs = None
        self.parts = []
        self.size = 0
        self.queued = False
        if self.drained is not None:
            self.drained.set()
            self.drained = None
        return frame


class _ToolCallSlot:
    """Unsent fragments of one tool call (one ``index``); a new slot after each send."""

    __slots__ = ("id_json", "index", "call_id", "name", "parts", "size", "queued", "drained")

    def __init__(self, id_json: str, index: int, call_id: str | None, name: str | None) -> None:
        self.id_json = id_json
        self.index = index
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []
        self.size = 0
        self.queued = False
        self.drained: trio.Event | None = None

    def take(self) -> str:
        frame = encode_tool_call(self.id_json, self.index, self.call_id, self.name, "".join(self.parts))
        self.parts = []
        self.size = 0
        self.queued = False
        if self.drained is not None:
            self.drained.set()
            self.drained = None
        return frame


class _QueuedSlot:
    __slots__ = ("request_id", "position", "queued")

    def __init__(self, request_id: RequestId) -> None:
        self.request_id = request_id
        self.position = 0
        self.queued = False

    def take(self) -> str:
        self.queued = False
        return encode(Queued(self.request_id, self.position))


@dataclass(frozen=True)
class CloseFrame:
    """Returned by :meth:`Outbox.pop` after everything queued before it: close the socket."""

    code: int
    reason: str


class _Control:
    __slots__ = ("frame",)

    def __init__(self, frame: str) -> None:
        self.frame = frame


_Item = str | _TextSlot | _ToolCallSlot | _QueuedSlot | _Control | CloseFrame


class Outbox:
    """The FIFO of frames one connection's writer task sends, in order."""

    __slots__ = ("stream_buffer_bytes", "connection_buffer_bytes", "max_control", "closing", "writer_running",
                 "queued_bytes", "_start_writer", "_items", "_control_pending", "_writer_lot", "_control_lot",
                 "_room_lot")

    def __init__(self, stream_buffer_bytes: int = 65536, max_control: int = DEFAULT_MAX_CONTROL,
                 start_writer: Callable[[], bool] | None = None,
                 connection_buffer_bytes: int = DEFAULT_CONNECTION_BUFFER_BYTES) -> None:
        self.stream_buffer_bytes = stream_buffer_bytes
        self.connection_buffer_bytes = connection_buffer_bytes
        self.max_control = max_control
        self.closing = False
        self.writer_running = False
        self.queued_bytes = 0  # characters of every unsent frame and token slot
        self._start_writer = start_writer
        self._items: collections.deque[_Item] | None = None  # created with the first item
        self._control_pending = 0
        # Created when first needed: most connections are idle most of the time.
        self._writer_lot: trio.lowlevel.ParkingLot | None = None
        self._control_lot: trio.lowlevel.ParkingLot | None = None
        self._room_lot: trio.lowlevel.ParkingLot | None = None

    @property
    def full(self) -> bool:
        """Whether unsent frames hold ``connection_buffer_bytes`` or more."""
        return self.queued_bytes >= self.connection_buffer_bytes

    async def wait_for_room(self) -> None:
        """Wait while the connection's unsent frames are over their bound (a checkpoint either way)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.queued_bytes >= self.connection_buffer_bytes:
            if self._room_lot is None:
                self._room_lot = trio.lowlevel.ParkingLot()
            await self._room_lot.park()

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0

    def stream(self, request_id: RequestId) -> StreamSender:
        """A sender for one request's events."""
        return StreamSender(self, request_id)

    async def send_control(self, event: ServerEvent) -> None:
        """Queue a connection-level event; waits while ``max_control`` are unsent."""
        while self._control_pending >= self.max_control:
            if self._control_lot is None:
                self._control_lot = trio.lowlevel.ParkingLot()
            await self._control_lot.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closing:
            return
        self._control_pending += 1
        frame = encode(event)
        self.queued_bytes += len(frame)
        self._push(_Control(frame))

    def close(self, code: int, reason: str) -> None:
        """Close the connection once every frame queued so far is sent; later frames are dropped."""
        if not self.closing:
            self._push(CloseFrame(code, reason))
            self.closing = True

    def _push(self, item: _Item) -> None:
        if self.closing:
            return  # the socket is closing: nothing queued now could be delivered
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        items.append(item)
        lot = self._writer_lot
        if lot:
            lot.unpark()
        else:
            self.ensure_writer()

    def ensure_writer(self) -> None:
        """Have ``start_writer`` start a writer task if frames wait and none runs.

        ``start_writer`` returns whether it could (not while the connection is starting or ending);
        frames queued meanwhile wait for the next call.
        """
        if self._items and not self.writer_running and self._start_writer is not None:
            self.writer_running = self._start_writer()

    def wake_writer(self) -> None:
        """Let a waiting writer look again (e.g. whether it may leave, now that nothing runs)."""
        if self._writer_lot is not None:
            self._writer_lot.unpark_all()

    async def wait(self) -> None:
        """Wait until something is queued or :meth:`wake_writer` is called (for the writer task)."""
        if self._writer_lot is None:
            self._writer_lot = trio.lowlevel.ParkingLot()
        await self._writer_lot.park()

    def writer_stopped(self) -> None:
        """The writer task left; an idle connection keeps no FIFO."""
        self.writer_running = False
        if not self._items:
            self._items = None

    def pop(self) -> str | CloseFrame | None:
        """The next frame to send, or None when nothing is queued."""
        items = self._items
        if not items:
            return None
        item = items.popleft()
        frame: str | CloseFrame
        if type(item) is _TextSlot or type(item) is _ToolCallSlot:
            self.queued_bytes -= item.size
            frame = item.take()
        elif type(item) is str:
            self.queued_bytes -= len(item)
            frame = item
        elif type(item) is _Control:
            self.queued_bytes -= len(item.frame)
            self._control_pending -= 1
            if self._control_lot is not None:
                self._control_lot.unpark()
            frame = item.frame
        elif type(item) is CloseFrame:
            return item
        else:
            assert isinstance(item, _QueuedSlot)
            return item.take()
        room_lot = self._room_lot
        if room_lot and self.queued_bytes < self.connection_buffer_bytes:
            room_lot.unpark_all()
        return frame


class StreamSender:
    """Puts one request's events into the outbox; after its terminal event, nothing more."""

    __slots__ = ("request_id", "_outbox", "_tokens", "_reasoning", "_queued", "_last", "finished")

    def __init__(self, outbox: Outbox, request_id: RequestId) -> None:
        self.request_id = request_id
        self._outbox = outbox
        self._tokens = _TextSlot(encode_id(request_id))
        self._reasoning: _TextSlot | None = None
        self._queued: _QueuedSlot | None = None
        # The stream's latest item in the FIFO: only it may take more deltas (kinds never reorder).
        self._last: object = None
        self.finished = False

    def event(self, event: ServerEvent) -> None:
        """Queue a non-delta event (``start``, or a terminal one, which finishes the stream)."""
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        if isinstance(event, TERMINAL_EVENTS):
            self.finished = True
        frame = encode(event)
        outbox = self._outbox
        if not outbox.closing:
            outbox.queued_bytes += len(frame)
        outbox._push(frame)
        self._last = None

    def queued(self, position: int) -> None:
        """Report a queue position; an unsent earlier position is replaced, not repeated."""
        if self.finished:
            return
        slot = self._queued
        if slot is None:
            slot = self._queued = _QueuedSlot(self.request_id)
        slot.position = position
        if not slot.queued:
            slot.queued = True
            self._outbox._push(slot)
            self._last = slot

    def put_token(self, content: str, logprobs: tuple[Any, ...] | None = None) -> bool:
        """Queue generated text (and its logprobs entries, when asked); True when this stream's or
        the connection's unsent text is over its bound.

        The caller should then ``await drained()`` before reading more from the engine.
        """
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        slot = self._tokens
        if slot.queued and self._last is not slot:  # another kind of event came after it
            slot = self._tokens = _TextSlot(slot.id_json)
        if logprobs:
            if slot.logprobs is None:
                slot.logprobs = []
            slot.logprobs.extend(logprobs)
        return self._put(slot, content)

    def put_reasoning(self, content: str) -> bool:
        """Queue reasoning text; the same bounds and return value as :meth:`put_token`."""
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        slot = self._reasoning
        if slot is None or (slot.queued and self._last is not slot):
            slot = self._reasoning = _TextSlot(self._tokens.id_json, reasoning=True)
        return self._put(slot, content)

    def put_tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str) -> bool:
        """Queue a fragment of the tool call at ``index``; the same bounds and return value as
        :meth:`put_token`. Joins the previous fragment only if it is of the same call, unsent and
        the stream's last item, and this one names no new id or function."""
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        slot = self._last
        if not (type(slot) is _ToolCallSlot and slot.queued and slot.index == index
                and call_id is None and name is None):
            slot = _ToolCallSlot(self._tokens.id_json, index, call_id, name)
        return self._put(slot, arguments)

    def _put(self, slot: _TextSlot | _ToolCallSlot, text: str) -> bool:
        outbox = self._outbox
        slot.parts.append(text)
        size = len(text)
        slot.size += size
        if not slot.queued:
            slot.queued = True
            outbox._push(slot)
            self._last = slot
        outbox.queued_bytes += size
        return slot.size >= outbox.stream_buffer_bytes or outbox.queued_bytes >= outbox.connection_buffer_bytes

    async def wait_for_room(self) -> None:
        """Wait while the connection's unsent frames are over their bound (before a new request starts)."""
        await self._outbox.wait_for_room()

    async def drained(self) -> None:
        """Wait until this stream's and the connection's unsent text are under their bounds again
        (after a ``put_*`` said they were over)."""
        slot = self._last
        if ((type(slot) is _TextSlot or type(slot) is _ToolCallSlot)
                and slot.size >= self._outbox.stream_buffer_bytes):
            if slot.drained is None:
                slot.drained = trio.Event()
            await slot.drained.wait()
        await self._outbox.wait_for_room()
