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

Deltas without a writer wake-up (issue 19): the writer task costs a pass of Trio's run loop per
frame (woken, then parked again). A connection that can write at once (:attr:`Outbox.direct`, the
WebSocket's :meth:`~trioai.wsframing.ServerConnection.write_now`) takes a stream's deltas into its
FIFO without waking the writer; the generation task itself writes every frame the FIFO holds, in
order and in one system call, before it waits for the engine again (:func:`flush_deferred`, called
by ``upstream.ChatStream``), or before it waits for room (:meth:`StreamSender.drained`). The write
never awaits, so no cancellation can cut a frame in half: what the kernel does not take whole is
sent by a task of the connection (``wsframing``). When the socket is busy (the writer is sending,
or a remainder waits) or the connection is closing, the writer is woken as before. Deltas of one
engine read still join one frame: the flush comes after the read's last chunk.

Idle cost: an idle connection has no writer task and no FIFO. The first item queued calls
``start_writer`` (the session starts its writer task); the writer leaves when it has nothing to send
and no generation is running (:meth:`Outbox.writer_stopped`), and the next item starts a new one.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from .protocol import (
    TERMINAL_EVENTS,
    Queued,
    Reasoning,
    RequestId,
    ServerEvent,
    Token,
    ToolCall,
    encode,
    encode_id,
    encode_reasoning,
    encode_token,
    encode_tool_call,
)

DEFAULT_MAX_CONTROL: Final = 64


class DirectWriter(Protocol):
    """A connection that can write frames without awaiting (``wsframing.ServerConnection``)."""

    def can_write_now(self) -> bool:
        """Whether :meth:`write_now` may be called now."""
        ...

    def write_now(self, messages: list[str]) -> None:
        """Write these text frames, in order, before any later frame."""
        ...


class RelaySample:
    """One sampled engine read: when its bytes were read (``time.perf_counter``) and what to tell the
    time it took to hand the frame carrying them to the kernel (the relay-latency histogram)."""

    __slots__ = ("read_at", "observe")

    def __init__(self, read_at: float, observe: Callable[[float], None]) -> None:
        self.read_at = read_at
        self.observe = observe

    def written(self) -> None:
        """The frame is in the kernel's hands now."""
        self.observe(time.perf_counter() - self.read_at)


# The relay sample on its way: armed by upstream.ChatStream when it returns the first chunk of a
# sampled read, taken by the next put_* (called before any await), kept on the entry, and handed by
# pop() to the write that follows it (also before any await: wsframing takes it).
_armed: RelaySample | None = None
_popped: RelaySample | None = None


def arm_relay_sample(sample: RelaySample | None) -> None:
    """The next delta queued carries ``sample`` (None: forget an armed sample no delta took)."""
    global _armed
    _armed = sample


def disarm_relay_sample(sample: RelaySample) -> bool:
    """Forget ``sample`` if no delta took it; whether it was still armed."""
    global _armed
    if _armed is sample:
        _armed = None
        return True
    return False


def take_relay_sample() -> RelaySample | None:
    """The sample of the frame just popped, if it carries one (the writer calls this before writing)."""
    global _popped
    sample, _popped = _popped, None
    return sample


#: Outboxes holding deltas no writer was woken for; the task that queued them flushes them before
#: it waits (one Trio run per thread: this list is only touched between two awaits of one task).
_DEFERRED: list[Outbox] = []


def flush_deferred() -> None:
    """Send what :meth:`Outbox.defer` queued (a generation task calls this before it waits)."""
    if _DEFERRED:
        for outbox in _DEFERRED:
            outbox._deferred = False
            outbox.flush()
        _DEFERRED.clear()


class EventEncoder(Protocol):
    """A wire protocol other than ``/ws/chat``: turns one generation's neutral events into frames."""

    def encode(self, event: ServerEvent) -> list[str]:
        """The frames for ``event`` (several, or none)."""
        ...

DEFAULT_CONNECTION_BUFFER_BYTES: Final = 262144


class _Entry:
    """One event of a generation's log, with its ``seq``; deltas of one kind join it until it is sent.

    ``queued``: in an outbox's FIFO now. ``sealed``: taken by a writer once, so its text is final
    and it takes no more deltas (a replay sends the same text with the same ``seq`` again).
    """

    __slots__ = ("sender", "seq", "head", "size", "queued", "sealed", "drained", "sample")

    def __init__(self, sender: StreamSender, seq: int) -> None:
        self.sender = sender
        self.seq = seq
        self.sample: RelaySample | None = None  # a sampled engine read whose delta this entry carries
        # The frame's id and seq fields, written once: the encoders put them after "id":.
        self.head = sender.id_json + ',"seq":' + str(seq)
        self.size = 0
        self.queued = False
        self.sealed = False
        self.drained: trio.Event | None = None

    def take(self) -> str | list[str]:
        """The frame(s) to send now; the entry is sealed from here on.

        ``/ws/chat`` frames are built here; a stream with an ``encoder`` (another wire protocol)
        gets the entry as a neutral event and the frames its encoder makes of it.
        """
        sender = self.sender
        encoder = sender.encoder
        frames = self.frame() if encoder is None else encoder.encode(self.event())
        self.sealed = True
        self.queued = False
        if self.drained is not None:
            self.drained.set()
            self.drained = None
        if sender.log is not None and type(frames) is str:
            sender.sent(self, frames)
        return frames

    def frame(self) -> str:
        """The ``/ws/chat`` frame of this entry."""
        raise NotImplementedError

    def event(self) -> ServerEvent:
        """This entry as a neutral event (for another wire protocol's encoder)."""
        raise NotImplementedError


class _Frame(_Entry):
    """A non-delta event (``start``, a terminal one), encoded once."""

    __slots__ = ("text", "_event")

    def __init__(self, sender: StreamSender, seq: int, event: ServerEvent) -> None:
        super().__init__(sender, seq)
        self._event = event
        self.text = encode(event, seq)
        self.size = len(self.text)
        self.sealed = True

    def frame(self) -> str:
        return self.text

    def event(self) -> ServerEvent:
        return self._event


class _TextSlot(_Entry):
    """``token`` (or, with ``reasoning``, ``reasoning``) text of one or more deltas."""

    __slots__ = ("reasoning", "parts", "logprobs", "deltas")

    def __init__(self, sender: StreamSender, seq: int, reasoning: bool = False) -> None:
        super().__init__(sender, seq)
        self.reasoning = reasoning
        self.parts: list[str] = []
        self.logprobs: list[Any] | None = None
        self.deltas = 1  # how many deltas the text joins, once joined

    def renew(self, seq: int) -> None:
        """Become the next entry (``seq``) of the same stream, once this one is sent and kept nowhere."""
        self.seq = seq
        self.head = self.sender.id_json + ',"seq":' + str(seq)
        self.size = 0
        self.sealed = False
        self.parts = []
        self.logprobs = None
        self.sample = None
        self.deltas = 1

    def frame(self) -> str:
        parts = self.parts
        if len(parts) > 1:
            self.deltas = len(parts)
            parts[:] = ["".join(parts)]  # joined once: a replay sends the same text
        text = parts[0]
        if self.reasoning:
            return encode_reasoning(self.head, text)
        return encode_token(self.head, text, self.logprobs, self.deltas)

    def event(self) -> ServerEvent:
        text = "".join(self.parts)
        request_id = self.sender.request_id
        if self.reasoning:
            return Reasoning(request_id, text)
        return Token(request_id, text, None if self.logprobs is None else tuple(self.logprobs))


class _ToolCallSlot(_Entry):
    """Fragments of one tool call (one ``index``)."""

    __slots__ = ("index", "call_id", "name", "parts")

    def __init__(self, sender: StreamSender, seq: int, index: int, call_id: str | None, name: str | None) -> None:
        super().__init__(sender, seq)
        self.index = index
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []

    def frame(self) -> str:
        parts = self.parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return encode_tool_call(self.head, self.index, self.call_id, self.name, parts[0] if parts else "")

    def event(self) -> ServerEvent:
        return ToolCall(self.sender.request_id, self.index, self.call_id, self.name, "".join(self.parts))


class _Replayed(_Entry):
    """A sent event sent again by a replay: its frame as it was (the log keeps it compact)."""

    __slots__ = ("text",)

    def __init__(self, sender: StreamSender, seq: int, size: int, text: str) -> None:
        super().__init__(sender, seq)
        self.text = text
        self.size = size
        self.sealed = True

    def take(self) -> str:
        self.queued = False
        return self.text

    def frame(self) -> str:
        return self.text


class _QueuedSlot(_Entry):
    """A queue position; a newer position replaces an unsent one (same ``seq``)."""

    __slots__ = ("position",)

    def __init__(self, sender: StreamSender, seq: int, position: int) -> None:
        super().__init__(sender, seq)
        self.position = position
        self.size = 40

    def frame(self) -> str:
        return encode(Queued(self.sender.request_id, self.position), self.seq)

    def event(self) -> ServerEvent:
        return Queued(self.sender.request_id, self.position)


@dataclass(frozen=True)
class CloseFrame:
    """Returned by :meth:`Outbox.pop` after everything queued before it: close the socket."""

    code: int
    reason: str


class _Control:
    __slots__ = ("frame",)

    def __init__(self, frame: str) -> None:
        self.frame = frame


_Item = _Entry | _Control | CloseFrame


class Outbox:
    """The FIFO of frames one connection's writer task sends, in order."""

    __slots__ = ("stream_buffer_bytes", "connection_buffer_bytes", "max_control", "closing", "writer_running",
                 "queued_bytes", "_start_writer", "_items", "_control_pending", "_writer_lot", "_control_lot",
                 "_room_lot", "direct", "_deferred", "_deltas")

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
        # The connection, when it can write frames without awaiting (see the module doc); the session sets it.
        self.direct: DirectWriter | None = None
        self._deferred = False  # in _DEFERRED
        self._deltas = 0  # deltas queued since the last flush

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
        """A sender for one request's events, attached to this outbox, not resumable."""
        return StreamSender(self, request_id)

    async def send_control(self, event: ServerEvent) -> None:
        """Queue a connection-level event; waits while ``max_control`` are unsent."""
        await self.send_frame(encode(event))

    async def send_frame(self, frame: str) -> None:
        """Queue a connection-level frame already encoded (another wire protocol's); as :meth:`send_control`."""
        while self._control_pending >= self.max_control:
            if self._control_lot is None:
                self._control_lot = trio.lowlevel.ParkingLot()
            await self._control_lot.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.closing:
            return
        self._control_pending += 1
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
        self._wake()

    def _wake(self) -> None:
        lot = self._writer_lot
        if lot:
            lot.unpark()
        else:
            self.ensure_writer()

    def use_connection(self, connection: object) -> None:
        """Write deltas straight to ``connection`` when it can (see the module doc): a connection with
        ``can_write_now`` and ``write_now`` (``wsframing.ServerConnection``); others keep the writer."""
        if callable(getattr(connection, "can_write_now", None)) and callable(getattr(connection, "write_now", None)):
            self.direct = connection  # type: ignore[assignment]

    def defer(self, item: _Entry) -> None:
        """Queue a delta's entry; with a :attr:`direct` connection, without waking the writer: the
        calling task sends it (:func:`flush_deferred`) before it waits."""
        if self.direct is None or self.closing:
            self._push(item)
            return
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        items.append(item)
        if not self._deferred:
            self._deferred = True
            _DEFERRED.append(self)

    def flush(self) -> None:
        """Write every queued frame now if the connection can (in one system call), else wake the writer.

        Only one delta since the last flush is written at once: several mean the engine is writing
        faster than it is read (deltas arrive together), and then the writer, which runs later,
        joins more of them into each frame — the client reads fewer, larger frames, which is what
        keeps a fast engine's throughput up (``bench.compare``'s tok/s).
        """
        items = self._items
        deltas, self._deltas = self._deltas, 0
        if not items:
            return
        direct = self.direct
        if direct is None or self.closing or deltas > 1 or not direct.can_write_now():
            self._wake()
            return
        frames: list[str] = []
        while items:
            frame = self.pop()
            if type(frame) is str:
                frames.append(frame)
            else:
                frames.extend(frame)  # type: ignore[arg-type]  # not a CloseFrame: none is queued unless closing
        direct.write_now(frames)  # takes the relay sample of the last entry popped, if any

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

    def pop(self) -> str | list[str] | CloseFrame | None:
        """The next frame (or frames, for a stream with an encoder) to send, or None when nothing is queued."""
        items = self._items
        if not items:
            return None
        item = items.popleft()
        frame: str | list[str] | CloseFrame
        if isinstance(item, _Entry):  # the common case first
            self.queued_bytes -= item.size
            frame = item.take()
            if item.sample is not None:
                global _popped
                _popped, item.sample = item.sample, None
        elif isinstance(item, _Control):
            self.queued_bytes -= len(item.frame)
            self._control_pending -= 1
            if self._control_lot is not None:
                self._control_lot.unpark()
            frame = item.frame
        else:
            return item  # CloseFrame
        room_lot = self._room_lot
        if room_lot and self.queued_bytes < self.connection_buffer_bytes:
            room_lot.unpark_all()
        return frame

    def remove_stream(self, sender: StreamSender) -> int:
        """Take every unsent entry of ``sender`` out of the FIFO (it moves to another connection, or
        none; they stay in its log); how many there were."""
        items = self._items
        if not items:
            return 0
        kept: collections.deque[_Item] = collections.deque()
        removed = 0
        for item in items:
            if isinstance(item, _Entry) and item.sender is sender:
                self.queued_bytes -= item.size
                item.queued = False
                removed += 1
            else:
                kept.append(item)
        self._items = kept
        if self._room_lot and self.queued_bytes < self.connection_buffer_bytes:
            self._room_lot.unpark_all()
        return removed

    def push_notice(self, event: ServerEvent) -> None:
        """Queue a connection-level event now, without waiting for ``max_control`` (for events the
        server itself causes, rarely: never in answer to a client's frame)."""
        if self.closing:
            return
        frame = encode(event)
        self.queued_bytes += len(frame)
        self._control_pending += 1
        self._push(_Control(frame))


class StreamSender:
    """One generation's events: numbered (``seq``), coalesced, logged, and queued to the outbox of
    the connection it is attached to, if any; after its terminal event, nothing more.

    Not resumable (``log_bytes_limit`` None): an entry lives only until the writer has sent it.
    Resumable: entries stay in :attr:`log` for a replay (:meth:`attach` with ``after``): the oldest
    sent ones are dropped beyond ``log_bytes_limit``; while detached (no outbox), a full log makes
    the generation wait (``put_*`` returns True and :meth:`drained` waits until it is attached
    again), as a slow client does.
    """

    __slots__ = ("request_id", "id_json", "outbox", "stream_buffer_bytes", "log", "log_bytes", "log_bytes_limit",
                 "finished", "_seq", "_last", "_tokens", "_reasoning", "_queued", "_attached", "on_log_change",
                 "encoder", "_sent")

    def __init__(self, outbox: Outbox | None, request_id: RequestId, *, stream_buffer_bytes: int | None = None,
                 log_bytes_limit: int | None = None, first_seq: int = 0) -> None:
        self.request_id = request_id
        self.id_json = encode_id(request_id)
        self.outbox = outbox
        if stream_buffer_bytes is None:
            stream_buffer_bytes = outbox.stream_buffer_bytes if outbox is not None else 65536
        self.stream_buffer_bytes = stream_buffer_bytes
        # Sent events as (seq, size, frame) tuples, which the garbage collector does not track (a
        # resumable log may hold many thousands for the window), then the unsent entries.
        self.log: collections.deque[_Entry | tuple[int, int, str]] | None = (
            None if log_bytes_limit is None else collections.deque())
        self._sent = 0  # how many of the log's first items are sent (tuples)
        self.log_bytes = 0
        self.log_bytes_limit = log_bytes_limit
        self.finished = False
        self._seq = first_seq  # the seq before its first event (another instance's log went that far)
        # The stream's latest entry: only it may take more deltas (kinds never reorder).
        self._last: _Entry | None = None
        self._tokens: _TextSlot | None = None
        self._reasoning: _TextSlot | None = None
        self._queued: _QueuedSlot | None = None
        self._attached: trio.Event | None = None  # set when a detached, full generation may go on
        self.on_log_change: Callable[[int], None] | None = None  # told each change of log_bytes
        self.encoder: EventEncoder | None = None  # another wire protocol's (None: /ws/chat frames)

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the latest event so far (0: none yet)."""
        return self._seq

    def event(self, event: ServerEvent) -> None:
        """Queue a non-delta event (``start``, or a terminal one, which finishes the stream)."""
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        if isinstance(event, TERMINAL_EVENTS):
            self.finished = True
        self._seq += 1
        self._add(_Frame(self, self._seq, event))

    def queued(self, position: int) -> None:
        """Report a queue position; an unsent earlier position is replaced, not repeated."""
        if self.finished:
            return
        slot = self._queued
        if slot is not None and slot is self._last and not slot.sealed:
            slot.position = position
            return
        self._seq += 1
        slot = self._queued = _QueuedSlot(self, self._seq, position)
        self._add(slot)

    def put_token(self, content: str, logprobs: tuple[Any, ...] | None = None) -> bool:
        """Queue generated text (and its logprobs entries, when asked); True when the generation
        should wait (:meth:`drained`) before reading more from the engine: this stream's or the
        connection's unsent text is over its bound, or a detached generation's log is full."""
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        slot = self._tokens
        if slot is None or slot is not self._last or slot.sealed or slot.size >= self.stream_buffer_bytes:
            self._seq += 1
            if slot is not None and slot.sealed and not slot.queued and self.log is None:
                slot.renew(self._seq)  # sent and kept nowhere: the per-token path reuses it
            else:
                slot = self._tokens = _TextSlot(self, self._seq)
            self._add(slot, True)
        if logprobs:
            if slot.logprobs is None:
                slot.logprobs = []
            slot.logprobs.extend(logprobs)
        return self._grow(slot, content)

    def put_reasoning(self, content: str) -> bool:
        """Queue reasoning text; the same bounds and return value as :meth:`put_token`."""
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        slot = self._reasoning
        if slot is None or slot is not self._last or slot.sealed or slot.size >= self.stream_buffer_bytes:
            self._seq += 1
            slot = self._reasoning = _TextSlot(self, self._seq, reasoning=True)
            self._add(slot, True)
        return self._grow(slot, content)

    def put_tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str) -> bool:
        """Queue a fragment of the tool call at ``index``; the same bounds and return value as
        :meth:`put_token`. Joins the previous fragment only if it is of the same call, unsent and
        the stream's last entry, and this one names no new id or function."""
        if self.finished:
            raise RuntimeError(f"stream {self.request_id!r} already ended")
        slot = self._last
        if not (type(slot) is _ToolCallSlot and not slot.sealed and slot.index == index and call_id is None
                and name is None and slot.size < self.stream_buffer_bytes):
            self._seq += 1
            slot = _ToolCallSlot(self, self._seq, index, call_id, name)
            self._add(slot, True)
        return self._grow(slot, arguments)

    def _add(self, entry: _Entry, delta: bool = False) -> None:
        """Append a new entry: to the log (if resumable) and to the attached connection's FIFO (a
        ``delta``'s without waking the writer, see :meth:`Outbox.defer`)."""
        self._last = entry
        log = self.log
        if log is not None:
            log.append(entry)
            self._log_grew(entry.size)
        outbox = self.outbox
        if outbox is not None and not outbox.closing:
            entry.queued = True
            outbox.queued_bytes += entry.size
            if delta:
                outbox.defer(entry)
            else:
                outbox._push(entry)

    def _grow(self, slot: _TextSlot | _ToolCallSlot, text: str) -> bool:
        global _armed
        if self.outbox is not None:
            self.outbox._deltas += 1
        if _armed is not None:
            if slot.sample is None:  # a joined slot keeps its oldest read
                slot.sample = _armed
            _armed = None
        slot.parts.append(text)
        size = len(text)
        slot.size += size
        if self.log is not None:
            self._log_grew(size)
        outbox = self.outbox
        if outbox is None:
            return self.log is not None and self.log_bytes >= self.log_bytes_limit  # type: ignore[operator]
        if slot.queued:
            outbox.queued_bytes += size
        return slot.size >= self.stream_buffer_bytes or outbox.queued_bytes >= outbox.connection_buffer_bytes

    def _log_grew(self, size: int) -> None:
        self.log_bytes += size
        log = self.log
        assert log is not None
        assert self.log_bytes_limit is not None
        # Attached, sent entries are what a replay may no longer need most: the oldest go first.
        # Detached, nothing goes (what was sent last may never have arrived): a full log waits.
        while self.log_bytes > self.log_bytes_limit and self.outbox is not None and self._sent and len(log) > 1:
            oldest = log.popleft()
            assert type(oldest) is tuple
            self.log_bytes -= oldest[1]
            self._sent -= 1
        if self.on_log_change is not None:
            self.on_log_change(self.log_bytes)

    def sent(self, entry: _Entry, frame: str) -> None:
        """``entry`` went out as ``frame``: keep it in the log as a compact tuple from now on."""
        log = self.log
        assert log is not None
        index = self._sent
        if index < len(log) and log[index] is entry:
            log[index] = (entry.seq, entry.size, frame)
            self._sent += 1

    @property
    def first_kept_seq(self) -> int:
        """The oldest ``seq`` a replay can still send (``last_seq + 1`` when the log is empty)."""
        if self.log:
            first = self.log[0]
            return first[0] if type(first) is tuple else first.seq  # type: ignore[union-attr]
        return self._seq + 1

    def attach(self, outbox: Outbox, after: int = 0) -> None:
        """Stream to ``outbox`` from now on, first replaying every logged event with ``seq > after``."""
        self.detach()
        self.outbox = outbox
        self._last = None  # entries sent elsewhere are not joined again
        for item in self.log or ():
            if outbox.closing:
                break
            if type(item) is tuple:
                seq, size, frame = item
                if seq <= after:
                    continue
                entry: _Entry = _Replayed(self, seq, size, frame)
            else:
                entry = item  # type: ignore[assignment]
                if entry.seq <= after:
                    continue
            entry.queued = True
            outbox.queued_bytes += entry.size
            outbox._push(entry)
        if self._attached is not None:
            self._attached.set()
            self._attached = None

    def detach(self) -> int:
        """Stop streaming to the current outbox; unsent entries stay in the log for a later attach.
        Returns how many entries were still unsent there."""
        outbox = self.outbox
        if outbox is None:
            return 0
        self.outbox = None
        return outbox.remove_stream(self)

    @property
    def has_room(self) -> bool:
        """Whether :meth:`wait_for_room` would return at once (attached, the connection not over its bound)."""
        return self.outbox is not None and not self.outbox.full

    async def wait_for_room(self) -> None:
        """Wait while the connection's unsent frames are over their bound (before a new request starts)."""
        if self.outbox is None:
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        await self.outbox.wait_for_room()

    async def drained(self) -> None:
        """Wait until the bounds a ``put_*`` reported are kept again: this stream's and the
        connection's unsent text, or, detached, a full log (until a client attaches)."""
        outbox = self.outbox
        if outbox is None:
            if self.log_bytes_limit is not None and self.log_bytes >= self.log_bytes_limit:
                if self._attached is None:
                    self._attached = trio.Event()
                await self._attached.wait()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
            return
        outbox.flush()  # what this task queued goes out (or the writer is woken) before it waits
        slot = self._last
        if slot is not None and slot.queued and slot.size >= self.stream_buffer_bytes:
            if slot.drained is None:
                slot.drained = trio.Event()
            await slot.drained.wait()
        if self.outbox is not None:
            await self.outbox.wait_for_room()
