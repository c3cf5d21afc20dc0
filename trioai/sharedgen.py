"""Resumable generations that outlive their instance: their events in shared state (``--redis``).

With shared state, every resumable ``/ws/chat`` generation is *shared*:

- Its record (the engine request, model, id, API key id) and its owner's lease are in the state,
  under keys derived from a hash of its resume token (the token itself is never stored).
- **Log, then send**: a frame of it reaches a client only once it is in the shared log. The
  connection's writer appends the frames of shared generations it is about to send (one call per
  batch: deltas that arrive meanwhile join the next frame), and a detached generation's frames are
  appended by a relay task. So no instance ever continues from a shorter text than a client saw.
- A ``resume`` this instance does not know is looked up in the state. While the owner lives, the
  connection *follows* the shared log (entries after ``after``, then blocking reads) up to the
  terminal event; a ``cancel`` is passed to the owner through the state (it checks every lease
  renewal). When the owner's lease has run out (killed, host lost), the follower takes the lease
  and continues the generation from the log's text on an engine (``continue_final_message``, as a
  failover does), numbering on from the log's last ``seq``: exactly one instance continues it.
- Shared state unavailable: generations run with local state only (resume within this instance),
  logged once; shared again for generations started after it is back.

Task tree (the service's nursery is opened by ``serve``)::

    SharedGenerations.run        the service's nursery
    ├── _heartbeat               renews the leases of this instance's generations (256 per round trip),
    │                            refreshes their records, and cancels those a client cancelled elsewhere
    └── _relay × D               one per detached shared generation: appends its frames
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from .outbox import CloseFrame, Outbox
from .protocol import ChatRequest, RequestId, Sampling
from .state import RENEW_BATCH, Renewal, State, StateUnavailable

if TYPE_CHECKING:
    from .config import Settings
    from .generation import Generation

log = logging.getLogger("trioai.shared")

#: Frames a writer or relay appends at once at most (the rest go in the next flush).
BATCH: Final = 64
#: How long one blocking read of a followed log waits before the owner's lease is checked.
FOLLOW_WAIT: Final = 1.0
TERMINAL_TYPES: Final = ('{"type":"done"', '{"type":"error"', '{"type":"cancelled"')


# --- pure parts -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # asked at every append of a running generation
def generation_key(token: str) -> str:
    """The state key of the generation ``token`` names: a hash, so the state never holds tokens."""
    return hashlib.sha256(token.encode()).hexdigest()[:40]


def frame_seq(frame: str) -> int | None:
    """The ``seq`` of a generation frame (``{"type":…,"id":…,"seq":N,…}``), None for other frames."""
    at = frame.find(',"seq":')
    if at < 0:
        return None
    end = at + 7
    while end < len(frame) and frame[end].isdigit():
        end += 1
    return int(frame[at + 7:end]) if end > at + 7 else None


def frame_id(frame: str) -> str | None:
    """The id of a generation frame as JSON text (``"r1"``, ``7``), None for other frames."""
    start = frame.find(',"id":')
    end = frame.find(',"seq":', start)
    if start < 0 or end < 0:
        return None
    return frame[start + 6:end]


def is_terminal(frame: str) -> bool:
    """Whether a frame is a generation's terminal event."""
    return frame.startswith(TERMINAL_TYPES)


@dataclass(frozen=True)
class Record:
    """What another instance needs to follow or continue a shared generation."""

    request_id: RequestId
    key_id: str | None
    client: str
    request: ChatRequest

    def to_json(self) -> str:
        """The record as stored."""
        request = self.request
        return json.dumps({
            "id": self.request_id, "key": self.key_id, "client": self.client, "model": request.model,
            "messages": [dict(m) for m in request.messages], "max_tokens": request.max_tokens,
            "sampling": request.sampling.to_payload(), "fields": dict(request.chat_fields),
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Record:
        """A stored record (ValueError if it is not one)."""
        try:
            obj = json.loads(text)
            sampling = dict(obj["sampling"])
            if "stop" in sampling:
                sampling["stop"] = tuple(sampling["stop"])
            request = ChatRequest(obj["id"], tuple(obj["messages"]), obj["max_tokens"], Sampling(**sampling),
                                  obj["fields"], resumable=True, model=obj["model"])
            return cls(obj["id"], obj["key"], obj["client"], request)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a generation record: {exc}") from None


@dataclass(frozen=True)
class LogSummary:
    """What a shared log says about its generation: its text, how far it got, whether it ended."""

    parts: tuple[str, ...]  # the text of its token events, in order
    last_seq: int
    terminal: bool
    continuable: bool  # only text so far: no tool call, no reasoning


def summarize(frames: Iterable[tuple[int, str]]) -> LogSummary:
    """Read a shared log's frames (in ``seq`` order)."""
    parts: list[str] = []
    last_seq = 0
    terminal = False
    continuable = True
    for seq, frame in frames:
        last_seq = seq
        if frame.startswith('{"type":"token"'):
            token = json.loads(frame)
            # A frame joining n deltas counts as n produced (the continuation's max_tokens): n - 1
            # empty parts before its text leave the text and its trailing whitespace as they are.
            parts.extend([""] * (int(token.get("deltas", 1)) - 1))
            parts.append(str(token.get("content", "")))
        elif frame.startswith(('{"type":"tool_call"', '{"type":"reasoning"')):
            continuable = False
        elif is_terminal(frame):
            terminal = True
    return LogSummary(tuple(parts), last_seq, terminal, continuable)


# --- the service ------------------------------------------------------------------------------


class _Batch:
    """Appends gathered for one round trip, and their answers once it is done."""

    __slots__ = ("appends", "results", "done", "failed")

    def __init__(self) -> None:
        self.appends: dict[str, list[tuple[int, str]]] = {}  # by generation key, in order
        self.results: dict[str, bool] = {}
        self.done = trio.Event()
        self.failed = False


class SharedGenerations:
    """This instance's side of shared generations: records, leases, appends, follows, takeovers."""

    def __init__(self, state: State, settings: Settings, instance: str | None = None,
                 on_append: Callable[[], None] | None = None) -> None:
        self.state = state
        self.settings = settings
        self.instance = instance or secrets.token_hex(8)
        self.lease = settings.lease_seconds
        self.log_ttl = max(settings.resume_window, settings.token_timeout, settings.first_token_timeout) + self.lease
        self.maxlen = settings.max_tokens_limit + 1024  # every event of a generation: never trimmed in practice
        self.owned: dict[str, Generation] = {}  # by generation key: running here, ours to renew
        self._records: dict[str, str] = {}
        self._nursery: trio.Nursery | None = None
        self.appended: dict[str, int] = {}  # by generation key: the last seq appended (running ones)
        self._batch = _Batch()  # the appends the next round trip carries
        self._wake = trio.Event()  # set when that batch has something
        self._covered = trio.Event()  # set when it has frames of every generation this instance runs
        self.on_append = on_append  # told of each (a metric)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew leases and run relays until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._flush)
            task_status.started()
            await trio.sleep_forever()

    # --- owner side ---------------------------------------------------------------------------

    async def register(self, generation: Generation, record: Record) -> bool:
        """Store the record and take the lease of a new resumable generation; False: not shared
        (the state is unavailable: it stays a local generation)."""
        assert generation.token is not None
        key = generation_key(generation.token)
        text = record.to_json()
        try:  # one round trip: record and lease (issue 18's round trips per generation)
            if not await self.state.claim(f"gen:{key}", self.instance, text, lease_ttl=self.lease,
                                          record_ttl=self.log_ttl):
                return False  # a token collision (2^-192) or a replayed registration: not ours
        except StateUnavailable:
            return False  # the state logs that it is away: this generation stays local
        self.owned[key] = generation
        self._records[key] = text
        return True

    def forget(self, generation: Generation) -> None:
        """Its window passed (or it was never shared): drop what this instance keeps of it."""
        if generation.token is not None:
            key = generation_key(generation.token)
            self.owned.pop(key, None)
            self._records.pop(key, None)
            self.appended.pop(key, None)

    async def append(self, generation: Generation, frames: Sequence[str]) -> bool:
        """Append frames of ``generation`` (log, then send). False when the log holds them already
        from another writer: this instance lost the generation (its lease ran out meanwhile)."""
        assert generation.token is not None
        key = generation_key(generation.token)
        entries = []
        for frame in frames:
            seq = frame_seq(frame)
            if seq is not None:
                entries.append((seq, frame))
        if not entries:
            return True
        batch = self._batch
        batch.appends.setdefault(key, []).extend(entries)
        self._wake.set()
        if len(batch.appends) >= len(self.owned):
            self._covered.set()  # every generation has frames in it: a gathering flush need not wait
        await batch.done.wait()  # the flusher's round trip carries it with every other pending frame
        if batch.failed:
            return True  # sent anyway: the client must not wait for Redis
        added = batch.results.get(key, True)
        if added and is_terminal(entries[-1][1]) and self.owned.pop(key, None) is not None:
            # Its whole story is in the log: nobody needs to continue it. Its lease is no longer
            # renewed and runs out by itself; releasing it would cost a round trip per generation,
            # and the terminal frame would wait for it.
            self._records.pop(key, None)
        return added

    async def _flush(self) -> None:
        """Send every pending append of every connection and relay in one round trip, again and again:
        while one is in flight the next batch gathers, and before it goes it may wait a moment for
        the other generations' frames (:meth:`_gather`); one task, so appends keep their order."""
        while True:
            await self._wake.wait()
            await self._gather()
            self._wake = trio.Event()
            batch, self._batch = self._batch, _Batch()
            # What an earlier flush logged is not sent again: a relay replays the frames a lost
            # connection's flush carried, a resume here replays logged frames, and the log would
            # refuse them as another writer's.
            appends: dict[str, list[tuple[int, str]]] = {}
            for key, entries in batch.appends.items():
                logged = self.appended.get(key, 0)
                fresh = [entry for entry in entries if entry[0] > logged]
                if fresh:
                    appends[key] = fresh
            try:
                if appends:
                    logs = [(f"gen:{key}", entries) for key, entries in appends.items()]
                    answers = await self.state.append_many(logs, ttl=self.log_ttl, maxlen=self.maxlen)
                    batch.results = dict(zip(appends, answers, strict=True))
                    for key, added in batch.results.items():
                        if added:  # here, not in the appending task, which may have been cancelled meanwhile
                            self.appended[key] = appends[key][-1][0]
                    if self.on_append is not None:
                        self.on_append()
            except StateUnavailable:
                batch.failed = True  # the state logs that it is away
            except Exception:
                # A bug of ours must not stop every shared generation: these frames go unlogged.
                log.exception("appending to the shared log failed")
                batch.failed = True
            finally:
                batch.done.set()

    async def _gather(self) -> None:
        """Wait, ``--shared-log-gather`` at most, until every generation this instance runs has frames
        in the batch. An engine steps its running sequences together (vLLM's continuous batching),
        so their deltas arrive within a moment of each other; without the wait the first one's
        round trip would go alone and the rest take a second one. A round trip costs the gateway
        hundreds of µs of CPU (docs/benchmarks.md); the wait costs each frame at most the window."""
        window = self.settings.shared_log_gather
        if window <= 0 or len(self.owned) < 2 or len(self._batch.appends) >= len(self.owned):
            return
        self._covered = trio.Event()
        with trio.move_on_after(window):
            await self._covered.wait()

    async def _heartbeat(self) -> None:
        """Every third of a lease, renew this instance's generations: :data:`RENEW_BATCH` of them per
        round trip (lease, record expiry and cancel flag in one :meth:`State.renew_claims` call)."""
        interval = self.lease / 3
        while True:
            await trio.sleep(interval)
            keys = list(self.owned)
            for start in range(0, len(keys), RENEW_BATCH):
                batch = keys[start:start + RENEW_BATCH]
                try:
                    renewals = await self.state.renew_claims([(f"gen:{key}", f"cancel:{key}") for key in batch],
                                                             self.instance, lease_ttl=self.lease,
                                                             record_ttl=self.log_ttl)
                    for key, renewal in zip(batch, renewals, strict=True):
                        await self._renewed(key, renewal)
                except StateUnavailable:
                    break  # the state logs that it is away; the next round tries again

    async def _renewed(self, key: str, renewal: Renewal) -> None:
        generation = self.owned.get(key)
        if generation is None:
            return  # ended meanwhile
        if not renewal.held:  # we were cut off longer than a lease, and another instance continues it
            log.warning("request id=%s: another instance took this generation over", generation.request_id)
            self.owned.pop(key, None)
            generation.cancel("disconnect")
            return
        if renewal.record_gone and key in self._records:  # the state forgot it (a Redis restarted empty)
            await self.state.put_record(f"gen:{key}", self._records[key], self.log_ttl)
        if renewal.flagged:
            generation.cancel("cancel")

    def relay(self, generation: Generation) -> None:
        """Append a detached generation's frames from now on (no connection sends them)."""
        if self._nursery is None:
            return
        outbox = Outbox(generation.sender.stream_buffer_bytes)  # no start_writer: the relay task is its writer
        key = generation_key(generation.token or "")
        generation.sender.attach(outbox, self.appended.get(key, 0))  # what no connection was sent
        self._nursery.start_soon(self._relay, generation, outbox)

    async def _relay(self, generation: Generation, outbox: Outbox) -> None:
        sender = generation.sender
        while sender.outbox is outbox:
            frames: list[str] = []
            while len(frames) < BATCH:
                frame = outbox.pop()
                if frame is None or isinstance(frame, CloseFrame):
                    break
                frames.extend([frame] if isinstance(frame, str) else frame)
            if frames:
                if not await self.append(generation, frames):
                    generation.cancel("disconnect")
                    return
                continue
            if sender.finished:
                return
            await outbox.wait()
        # Attached to a connection again (resumed here): its writer appends from now on.

    # --- the other side: resume of a generation this instance does not run ----------------------

    async def lookup(self, token: str, request_id: RequestId, key_id: str | None) -> Record | None:
        """The record of the generation ``token`` names, if the id and API key match it."""
        key = generation_key(token)
        text = await self.state.get_record(f"gen:{key}")
        if text is None:
            return None
        record = Record.from_json(text)
        if record.request_id != request_id or record.key_id != key_id:
            return None
        return record

    async def read_log(self, token: str, after: int) -> list[tuple[int, str]]:
        """Every logged frame after ``after``, in order."""
        key = f"gen:{generation_key(token)}"
        frames: list[tuple[int, str]] = []
        while True:
            batch = await self.state.read(key, after, 1000)
            frames.extend(batch)
            if len(batch) < 1000:
                return frames
            after = batch[-1][0]

    async def follow(self, token: str, after: int) -> list[tuple[int, str]]:
        """The next frames after ``after``, waiting up to :data:`FOLLOW_WAIT` for them."""
        return await self.state.follow(f"gen:{generation_key(token)}", after, FOLLOW_WAIT)

    async def owner_alive(self, token: str) -> bool:
        """Whether some instance holds the generation's lease."""
        return await self.state.lease_owner(f"gen:{generation_key(token)}") is not None

    async def take_over(self, token: str) -> bool:
        """Become the owner of a generation whose owner died (True: this instance continues it)."""
        return await self.state.acquire_lease(f"gen:{generation_key(token)}", self.instance, self.lease)

    async def request_cancel(self, token: str) -> None:
        """Ask the owner to cancel (it checks at its next lease renewal)."""
        await self.state.put_record(f"cancel:{generation_key(token)}", "1", self.log_ttl)

    def adopt(self, generation: Generation, record: Record, last_seq: int) -> None:
        """A generation taken over here (its log goes to ``last_seq``): renew its lease from now on."""
        assert generation.token is not None
        key = generation_key(generation.token)
        self.owned[key] = generation
        self._records[key] = record.to_json()
        self.appended[key] = last_seq
