"""Shared state in Redis (or Valkey): :class:`trioai.state.State` for several trioai instances.

The client is coredis, which runs on Trio through AnyIO. Every primitive that reads and writes is
one Lua script, so it is atomic, and uses Redis's clock (``TIME``), so instances need not agree on
the time. The scripts (``EVALSHA``) and the plain reads and writes (``GET``, ``SET``, ``ZREM``) go
as requests on one held connection (:class:`trioai.redisconn.RedisConnection`: the caller reads its
own answer, with coredis's RESP, where a coredis connection wakes its reader and writer tasks per
request); it goes where coredis's pool would connect, with the pool's credentials. coredis's
per-command path (a pool lease, a command object, telemetry and retry hooks) is left to the blocking
reads and ``PING``. Every log a flush appends to goes in one script call (``append_many``).

Every key starts with the prefix as a Cluster hash tag (``{trioai}:log:…``), so on a Redis Cluster
(``redis+cluster://``) all of one deployment's keys are in one hash slot, on one primary: a flush's
append names many logs, a rate-limit take several buckets and a slot acquire a queue too, and a
Cluster runs a script only over keys of one slot. The held connection (below) is then one to the
primary that owns the slot; a failed call (the slot moved, a failover, a broken connection) drops
it and tells coredis, whose map of the cluster is then refreshed. A Cluster thus gives this state
its failover but no sharding (docs/deploy.md says what one primary carries).

Event logs are Redis Streams: the entry of ``seq`` N has the id ``N-0`` and its frame in field
``f``; ``XADD … MAXLEN ~`` bounds them and each append sets the expiry; ``XREAD BLOCK`` follows.

Degraded mode: every call is bounded by ``timeout`` (the server's choice); a call that fails or
times out raises :class:`~trioai.state.StateUnavailable`, and for ``retry_interval`` after that
every call raises it at once, without waiting on the network, until one call (alone) finds Redis
back. The change each way is logged once, not per call. Nothing here hangs and nothing crashes
the server: :meth:`RedisState.run` keeps the client open and reopens it if it fails.

Resource handling: :meth:`RedisState.run` is a service task (``await nursery.start(state.run)``):
it owns the client and its connections, closed when it is cancelled. Calls before it started, or
between two openings, raise ``StateUnavailable``.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar, cast

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.connection import Location, TCPLocation
from coredis.pool import ClusterConnectionPool, SentinelConnectionPool
from coredis.response.types import StreamEntry

from .config import ConfigError
from .redisconn import RedisConnection
from .state import WINDOW, LogEntry, Renewal, StateUnavailable, Take, check_seqs

if TYPE_CHECKING:
    from coredis.cluster._node import ClusterNodeLocation  # the Cluster layout's node type (not exported)

log = logging.getLogger(__name__)

T = TypeVar("T")
#: A standalone (or Sentinel-named) server's client, or a Redis Cluster's.
Client = coredis.Redis[str] | coredis.RedisCluster[str]

SCHEMES: Final = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
#: The schemes whose URL lists several ``host:port`` (sentinels, or a Cluster's startup nodes).
_HOST_LISTS: Final = ("redis+sentinel", "redis+cluster")
#: Hash slots of a Redis Cluster (a key's slot: CRC16 of its hash tag, modulo this).
CLUSTER_SLOTS: Final = 16384
#: Seconds a call may take by default (a blocking follow adds its own wait).
DEFAULT_TIMEOUT: Final = 1.0
#: Seconds every call fails at once after a failure, before one call tries Redis again.
DEFAULT_RETRY_INTERVAL: Final = 1.0


class _Script:
    """A Lua script, sent as ``EVALSHA`` (as ``EVAL`` when Redis lacks it: restarted or flushed)."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, connection: RedisConnection, keys: Sequence[str], args: Sequence[str | int | float]) -> object:
        """Its answer on ``connection``: one request."""
        try:
            return await connection.request(b"EVALSHA", self.sha, len(keys), *keys, *args)
        except coredis.exceptions.NoScriptError:
            return await connection.request(b"EVAL", self.source, len(keys), *keys, *args)  # caches it


# -- Lua scripts: one round trip each, atomic; times in milliseconds from Redis's clock ------------

_NOW: Final = "local t = redis.call('TIME')\n"

# KEYS: buckets. ARGV: window, then per bucket: per_minute, amount, need, debit.
_TAKE: Final = _Script(_NOW + """
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local levels, wait = {}, 0
for i, key in ipairs(KEYS) do
  local b = 1 + (i - 1) * 4
  local cap = tonumber(ARGV[b + 1])
  local rate = cap / window
  local level = cap
  local saved = redis.call('HMGET', key, 'level', 'updated')
  if saved[1] then level = math.min(cap, tonumber(saved[1]) + (now - tonumber(saved[2])) * rate) end
  level = level - tonumber(ARGV[b + 4])
  local need = tonumber(ARGV[b + 3])
  if level < need then wait = math.max(wait, (need - level) / rate) end
  levels[i] = level
end
for i, key in ipairs(KEYS) do
  local b = 1 + (i - 1) * 4
  local cap, amount, debit = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 4])
  local level = levels[i]
  if wait == 0 then level = level - amount end
  if debit ~= 0 or (wait == 0 and amount ~= 0) then
    redis.call('HSET', key, 'level', tostring(level), 'updated', tostring(now))
    -- gone when full again: a missing bucket is a full one
    redis.call('PEXPIRE', key, math.ceil((cap - level) / (cap / window) * 1000) + 1000)
  end
end
return tostring(wait)
""")

# KEYS: lease, record. ARGV: owner, lease ttl_ms, value, record ttl_ms.
_CLAIM: Final = _Script("""
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 1
""")

# KEYS[1]: lease. ARGV: owner, ttl_ms.
_ACQUIRE_LEASE: Final = _Script("""
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
""")
# KEYS: per claim its lease, record and flag record. ARGV: owner, lease_ms, record_ms. Per claim:
# 0 another owner holds it; else 1, + 2 if its record had expired, + 4 if its flag record exists.
_RENEW_CLAIMS: Final = _Script("""
local out = {}
for i = 1, #KEYS, 3 do
  local cur = redis.call('GET', KEYS[i])
  if cur and cur ~= ARGV[1] then
    out[#out + 1] = 0
  else
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    local answer = 1
    if redis.call('PEXPIRE', KEYS[i + 1], ARGV[3]) == 0 then answer = answer + 2 end
    if redis.call('EXISTS', KEYS[i + 2]) == 1 then answer = answer + 4 end
    out[#out + 1] = answer
  end
end
return out
""")

# KEYS: streams (every log of a flush: one call, not one per log). ARGV: ttl_ms, maxlen, then per stream
# its entry count N and N seq, frame pairs. One flag per stream: 1 appended (and its expiry renewed),
# 0 nothing added (it holds a seq at or past the first one: another writer got there first).
# On a Cluster too: every key is in the prefix's one hash slot (see the module docstring).
_APPEND: Final = _Script("""
local ttl, maxlen, at, added = ARGV[1], ARGV[2], 3, {}
for i, key in ipairs(KEYS) do
  local first, last_arg = at + 1, at + 2 * tonumber(ARGV[at])
  added[i] = 1
  if last_arg > at then
    local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    if top[1] and tonumber(ARGV[first]) <= tonumber(string.match(top[1][1], '^(%d+)')) then added[i] = 0 end
  end
  if added[i] == 1 then
    for j = first, last_arg, 2 do
      redis.call('XADD', key, 'MAXLEN', '~', maxlen, ARGV[j] .. '-0', 'f', ARGV[j + 1])
    end
    redis.call('PEXPIRE', key, ttl)
  end
  at = last_arg + 1
end
return added
""")

# Shared by the slot and queue scripts: drop what expired, extend a key's expiry (never shorten it).
_HELPERS: Final = _NOW + """
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function prune_queue(q, due)
  for _, waiter in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now)) do redis.call('ZREM', q, waiter) end
  redis.call('ZREMRANGEBYSCORE', due, '-inf', now)
end
"""

# KEYS: slots, queue, queue deadlines. ARGV: capacity, holder, ttl_ms, use_queue (0/1).
_ACQUIRE_SLOT: Final = _Script(_HELPERS + """
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
  if free <= 0 then return 0 end
  if ARGV[4] == '1' then
    prune_queue(KEYS[2], KEYS[3])
    local rank = redis.call('ZRANK', KEYS[2], ARGV[2])
    if rank then
      if rank >= free then return 0 end
      redis.call('ZREM', KEYS[2], ARGV[2])
      redis.call('ZREM', KEYS[3], ARGV[2])
    elseif redis.call('ZCARD', KEYS[2]) >= free then
      return 0
    end
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
extend(KEYS[1], ttl)
return 1
""")
# KEYS: per slot its pool's slots. ARGV: ttl_ms, then per slot its holder. Per slot: 1 renewed, 0 lost.
_RENEW_SLOTS: Final = _Script(_HELPERS + """
local ttl = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', key, ARGV[i + 1]) then
    redis.call('ZADD', key, now + ttl, ARGV[i + 1])
    extend(key, ttl)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
""")
_SLOTS_HELD: Final = _Script(_HELPERS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
""")

# KEYS: queue (score: ticket), deadlines (score: ms), next ticket. ARGV: waiter, ttl_ms, join (0/1).
_QUEUE_POSITION: Final = _Script(_HELPERS + """
local ttl = tonumber(ARGV[2])
prune_queue(KEYS[1], KEYS[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if ARGV[3] ~= '1' then return -1 end
  redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[3]), ARGV[1])
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
for _, key in ipairs(KEYS) do extend(key, ttl) end
return redis.call('ZRANK', KEYS[1], ARGV[1]) + 1
""")
# KEYS: queue, deadlines. ARGV: waiter.
_LEAVE_QUEUE: Final = _Script("""
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
""")

# KEYS: queue, deadlines.
_QUEUE_LENGTH: Final = _Script(_HELPERS + """
prune_queue(KEYS[1], KEYS[2])
return redis.call('ZCARD', KEYS[1])
""")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def check_redis_url(url: str) -> None:
    """Raise :class:`ConfigError` unless ``url`` has the form of a Redis URL (no I/O)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _HOST_LISTS:  # their netloc lists several host:port
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"--redis {redact(url)!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"--redis {redact(url)!r}: the URL must start with redis://, rediss://, unix://, "
                          "redis+sentinel:// or redis+cluster://")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"--redis {redact(url)!r}: a unix:// URL needs the socket's path")
        return
    if parts.scheme == "redis+sentinel":
        _sentinel_parts(url)
        return
    if parts.scheme == "redis+cluster":
        _cluster_parts(url)
        return
    if not parts.hostname:
        raise ConfigError(f"--redis {redact(url)!r}: the URL needs a host")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigError(f"--redis {redact(url)!r}: the path must be a database number, not {database!r}")


async def check_redis(url: str, seconds: float = 5.0) -> None:
    """Raise :class:`ConfigError` with the reason unless a Redis answers ``PING`` at ``url``
    within ``seconds``: call it at start, so a wrong ``--redis`` stops the server at once."""
    check_redis_url(url)
    timeout = seconds
    reason = ""
    try:
        with trio.fail_after(timeout):
            async with _client(url, timeout) as client:
                await client.ping()
        return
    except* trio.TooSlowError:
        reason = f"no answer within {timeout:g} s"
    except* (coredis.exceptions.RedisError, OSError, ValueError, AssertionError) as group:
        reason = str(_first_leaf(group)) or type(_first_leaf(group)).__name__
    raise ConfigError(f"--redis {redact(url)}: cannot use this Redis: {reason}")


def _append_args(entries_by_log: Iterable[Sequence[LogEntry]], ttl: float, maxlen: int) -> list[str | int]:
    """The append script's arguments for these logs' entries; ValueError unless each log's seqs
    increase from 1 (checked before anything is sent)."""
    args: list[str | int] = [_ms(ttl), maxlen]
    for entries in entries_by_log:
        check_seqs(entries)
        args.append(len(entries))
        for seq, frame in entries:
            args += (seq, frame)
    return args


def _first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    leaf: Exception | BaseExceptionGroup[Exception] = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _host_list(url: str, what: str) -> tuple[list[tuple[str, int]], str, str | None]:
    """A ``scheme://[:password@]host:port[,host:port...][/path]`` URL's hosts (each a ``what``),
    path and password; :class:`ConfigError` unless every host has a port."""
    rest = url.partition("://")[2]
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = urllib.parse.unquote(credentials.split(":", 1)[-1]) or None
    hosts, _, path = rest.partition("/")
    found = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(f"--redis {redact(url)!r}: each {what} needs host:port, not {host!r}")
        found.append((name.strip("[]"), int(port)))
    return found, path, password


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """A ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` URL's sentinels,
    service name, database and password; :class:`ConfigError` if it has not that form."""
    sentinels, path, password = _host_list(url, "sentinel")
    service, _, database = path.strip("/").partition("/")
    if not service:
        raise ConfigError(f"--redis {redact(url)!r}: a redis+sentinel:// URL needs the service name as its path")
    if database and not database.isdigit():
        raise ConfigError(f"--redis {redact(url)!r}: the database must be a number, not {database!r}")
    return sentinels, service, int(database or 0), password


def _cluster_parts(url: str) -> tuple[list[tuple[str, int]], str | None]:
    """A ``redis+cluster://[:password@]host:port[,host:port...]`` URL's startup nodes (any of the
    Cluster's nodes; coredis asks them for the rest) and password; :class:`ConfigError` if it has
    not that form (a Cluster has no databases: no path)."""
    nodes, path, password = _host_list(url, "Cluster node")
    if path.strip("/"):
        raise ConfigError(f"--redis {redact(url)!r}: a Redis Cluster has only database 0: no path after the nodes")
    return nodes, password


@contextlib.asynccontextmanager
async def _client(url: str, connect_timeout: float, max_connections: int = 64) -> AsyncIterator[Client]:
    """An open coredis client for ``url``: a server's, or, with ``redis+sentinel://``, the primary
    the sentinels name (asked again on each new connection, so a failover is followed), or, with
    ``redis+cluster://``, a Redis Cluster's."""
    if url.startswith("redis+cluster://"):
        nodes, password = _cluster_parts(url)
        async with coredis.RedisCluster(startup_nodes=[TCPLocation(host, port) for host, port in nodes],
                                        password=password, decode_responses=True, connect_timeout=connect_timeout,
                                        max_connections=max_connections) as cluster:
            yield cluster
        return
    if not url.startswith("redis+sentinel://"):
        async with coredis.Redis.from_url(url, decode_responses=True, connect_timeout=connect_timeout,
                                          max_connections=max_connections) as client:
            yield client
        return
    sentinels, service, database, password = _sentinel_parts(url)
    sentinel = coredis.Sentinel([TCPLocation(host, port) for host, port in sentinels], decode_responses=True,
                                connect_timeout=connect_timeout,
                                sentinel_kwargs={"connect_timeout": connect_timeout, "decode_responses": True})
    async with sentinel, sentinel.primary_for(service, db=database, password=password,
                                              max_connections=max_connections) as client:
        yield client


class RedisState:
    """:class:`trioai.state.State` in Redis at ``url`` (see the module docstring)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 retry_interval: float = DEFAULT_RETRY_INTERVAL, prefix: str = "trioai:",
                 max_connections: int = 64) -> None:
        check_redis_url(url)
        self.max_connections = max_connections
        self.url = url
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.prefix = prefix
        tag = prefix.rstrip(":")
        self._tag = f"{{{tag}}}:"  # every key's start: one Cluster hash slot (see the module docstring)
        self._slot = binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS
        self.available = False  # whether the last call reached Redis (False until one does)
        self.failures = 0  # calls that raised StateUnavailable, fast failures included
        self._client: Client | None = None
        self._down_until = -math.inf
        self._probing = False
        self._logged_down = False
        self._connection: RedisConnection | None = None  # the scripts' connection (see _held)
        self._node: ClusterNodeLocation | None = None  # on a Cluster: the primary it goes to

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the client open until cancelled (a service task); started at once, connected or not."""
        started = False
        while True:
            try:
                async with _client(self.url, self.timeout, self.max_connections) as client:
                    self._client = client
                    if not started:
                        with contextlib.suppress(StateUnavailable):
                            await self.ping()  # so that the first calls find it available
                        started = True
                        task_status.started()
                    await trio.sleep_forever()
            except* Exception as group:  # the client's own tasks failed: log, reopen
                log.warning("redis client at %s failed (%r); reopening", redact(self.url), _first_leaf(group))
            finally:
                self._client = None
                self._drop_held()
            await trio.sleep(self.retry_interval)

    # -- the degraded-mode wrapper --------------------------------------------------------------

    async def _call(self, what: str, call: Callable[[Client], Awaitable[T]],
                    extra_time: float = 0.0) -> T:
        """``call(client)`` within the timeout, or :class:`StateUnavailable` (see the module docstring)."""
        client = self._client
        if client is None or trio.current_time() < self._down_until or self._probing:
            self.failures += 1
            raise StateUnavailable(f"redis at {redact(self.url)} unavailable")
        if not self.available:
            # One PING (one call at a time) tells whether it is back: a blocking read must not be
            # the probe, or every other call would fail for as long as it blocks.
            self._probing = True
            try:
                await self._attempt("ping", client, _ping, 0.0)
            finally:
                self._probing = False
            self.available = True
            if self._logged_down:
                log.warning("redis at %s is back: shared state again", redact(self.url))
                self._logged_down = False
        return await self._attempt(what, client, call, extra_time)

    async def _attempt(self, what: str, client: Client,
                       call: Callable[[Client], Awaitable[T]], extra_time: float) -> T:
        try:
            with trio.fail_after(self.timeout + extra_time):
                return await call(client)
        except (trio.TooSlowError, coredis.exceptions.RedisError, OSError, anyio.ClosedResourceError,
                anyio.BrokenResourceError) as exc:
            # The last two: the client's connection closed under the call (it is being reopened).
            self._drop_held()
            if isinstance(client, coredis.RedisCluster):
                self._redirected(client, exc)
            self._went_down(what, exc)
            raise StateUnavailable(f"redis at {redact(self.url)} unavailable: {exc!r}") from exc

    def _went_down(self, what: str, exc: Exception) -> None:
        self.failures += 1
        self._down_until = trio.current_time() + self.retry_interval
        if self.available or not self._logged_down:
            log.warning("redis at %s unavailable (%s: %r): local state until it is back",
                        redact(self.url), what, exc)
            self._logged_down = True
        self.available = False

    def _redirected(self, client: coredis.RedisCluster[str], exc: Exception) -> None:
        """A call to a Cluster failed: the slot is elsewhere (``MOVED``: resharded), its primary is
        down or failed over, or the connection broke. coredis hears of the error (calls on the held
        connection bypass its own routing), so that it refreshes its map of the cluster before the
        next call asks it for the slot's primary."""
        client.connection_pool.cluster_layout.report_errors(self._node, exc)  # a MOVED names the new owner at once

    def _drop_held(self) -> None:
        """Close the held connection: any failed call may have left it to a server that is no longer
        the one to write to (a Sentinel or Cluster failover), or broken."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    async def _held(self, client: Client) -> RedisConnection:
        """The connection scripts and plain commands go on: opened where the client's pool connects
        (the Sentinel's primary, the Cluster's primary for the keys' one slot), with its credentials,
        and kept until a call fails.

        Requests of several tasks share it, pipelined (see :mod:`trioai.redisconn`); blocking reads
        go through the pool, never here.
        """
        connection = self._connection
        if connection is not None and connection.usable:
            return connection
        self._connection = None
        pool = client.connection_pool
        location: Location
        if isinstance(pool, ClusterConnectionPool):
            self._node = pool.cluster_layout.node_for_slot(self._slot)
            location = self._node
        elif isinstance(pool, SentinelConnectionPool):
            location = await pool.get_primary_location()
        elif pool.location is not None:
            location = pool.location
        else:
            raise coredis.exceptions.ConnectionError("the client's pool has no server to connect to")
        settings = pool.connection_kwargs
        fresh = await RedisConnection.open(location, seconds=self.timeout, username=settings.get("username"),
                                           password=settings.get("password"), db=settings.get("db"),
                                           ssl_context=settings.get("ssl_context"))
        if self._connection is not None:  # another call opened one meanwhile: keep one
            fresh.close()
            return self._connection
        self._connection = fresh
        return fresh

    async def _script(self, script: _Script, keys: Sequence[str], args: Sequence[str | int | float],
                      what: str = "script") -> object:
        """``script``'s answer, on the held connection."""
        async def call(client: Client) -> object:
            return await script.run(await self._held(client), keys, args)

        return await self._call(what, call)

    async def _request(self, what: str, command: bytes, *args: str | bytes | int) -> object:
        """One plain command's answer (decoded text), on the held connection."""
        async def call(client: Client) -> object:
            return await (await self._held(client)).request(command, *args)

        return await self._call(what, call)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._tag}{kind}:{name}"

    # -- State ----------------------------------------------------------------------------------

    async def ping(self) -> None:
        """One round trip (``PING``); :class:`StateUnavailable` if it fails."""
        await self._call("ping", _ping)

    async def take(self, takes: Sequence[Take]) -> float:
        """See :meth:`trioai.state.State.take`."""
        args: list[str | int | float] = [repr(WINDOW)]
        for take in takes:
            args += [repr(float(take.per_minute)), repr(float(take.amount)), repr(float(take.need)),
                     repr(float(take.debit))]
        result = await self._script(_TAKE, [self._key("bucket", take.key) for take in takes], args)
        return float(str(result))

    async def acquire_lease(self, key: str, owner: str, ttl: float) -> bool:
        """See :meth:`trioai.state.State.acquire_lease`."""
        return await self._script(_ACQUIRE_LEASE, [self._key("lease", key)], [owner, _ms(ttl)]) == 1

    async def renew_claims(self, claims: Sequence[tuple[str, str]], owner: str, *, lease_ttl: float,
                           record_ttl: float) -> list[Renewal]:
        """See :meth:`trioai.state.State.renew_claims`: one script call."""
        if not claims:
            return []
        keys: list[str] = []
        for key, flag in claims:
            keys += (self._key("lease", key), self._key("record", key), self._key("record", flag))
        answers = await self._script(_RENEW_CLAIMS, keys, [owner, _ms(lease_ttl), _ms(record_ttl)], "renew_claims")
        return [Renewal(held=bool(answer), record_gone=bool(int(answer) & 2), flagged=bool(int(answer) & 4))
                for answer in cast(list[int], answers)]

    async def lease_owner(self, key: str) -> str | None:
        """See :meth:`trioai.state.State.lease_owner`."""
        owner = await self._request("lease_owner", b"GET", self._key("lease", key))
        return None if owner is None else str(owner)

    async def put_record(self, key: str, value: str, ttl: float) -> None:
        """See :meth:`trioai.state.State.put_record`."""
        await self._request("put_record", b"SET", self._key("record", key), value, b"PX", _ms(ttl))

    async def get_record(self, key: str) -> str | None:
        """See :meth:`trioai.state.State.get_record`."""
        value = await self._request("get_record", b"GET", self._key("record", key))
        return None if value is None else str(value)


    async def claim(self, key: str, owner: str, value: str, *, lease_ttl: float, record_ttl: float) -> bool:
        """See :meth:`trioai.state.State.claim`: one script call."""
        return await self._script(_CLAIM, [self._key("lease", key), self._key("record", key)],
                                  [owner, _ms(lease_ttl), value, _ms(record_ttl)], "claim") == 1

    async def append(self, log: str, entries: Sequence[LogEntry], *, ttl: float, maxlen: int) -> bool:
        """See :meth:`trioai.state.State.append`."""
        return (await self.append_many([(log, entries)], ttl=ttl, maxlen=maxlen))[0]

    async def append_many(self, appends: Sequence[tuple[str, Sequence[LogEntry]]], *, ttl: float,
                          maxlen: int) -> list[bool]:
        """See :meth:`trioai.state.State.append_many`: one script call for every log (atomic as a
        whole, though each log's answer is its own)."""
        if not appends:
            return []
        args = _append_args([entries for _, entries in appends], ttl, maxlen)
        answers = await self._script(_APPEND, [self._key("log", log) for log, _ in appends], args, "append")
        return [answer == 1 for answer in cast(list[object], answers)]

    async def read(self, log: str, after: int, limit: int = 1000) -> list[LogEntry]:
        """See :meth:`trioai.state.State.read`."""
        stream = self._key("log", log)

        async def call(client: Client) -> list[LogEntry]:
            entries = await client.xrange(stream, f"{after + 1}-0", "+", count=limit)
            return [_entry(e) for e in entries]

        return await self._call("read", call)

    async def follow(self, log: str, after: int, wait: float, limit: int = 1000) -> list[LogEntry]:
        """See :meth:`trioai.state.State.follow`.

        ``XREAD BLOCK`` holds a connection of its own meanwhile: keep the followers in flight under
        ``max_connections`` (beyond, a call waits for a connection and may time out, which counts as
        Redis unavailable); many generations are better followed by one task per instance.
        """
        stream = self._key("log", log)

        async def call(client: Client) -> list[LogEntry]:
            found = await client.xread({stream: f"{after}-0"}, count=limit, block=_ms(wait))
            if not found:
                return []
            return [_entry(e) for entries in found.values() for e in entries]

        return await self._call("follow", call, extra_time=wait)

    async def acquire_slot(self, pool: str, capacity: int, holder: str, ttl: float, *,
                           queue: str | None = None) -> bool:
        """See :meth:`trioai.state.State.acquire_slot`."""
        keys = [self._key("slots", pool), *self._queue_keys(queue if queue is not None else pool)[:2]]
        args: list[str | int | float] = [capacity, holder, _ms(ttl), 0 if queue is None else 1]
        return await self._script(_ACQUIRE_SLOT, keys, args) == 1

    async def renew_slots(self, slots: Sequence[tuple[str, str]], ttl: float) -> list[bool]:
        """See :meth:`trioai.state.State.renew_slots`: one script call."""
        if not slots:
            return []
        answers = await self._script(_RENEW_SLOTS, [self._key("slots", pool) for pool, _ in slots],
                                     [_ms(ttl), *(holder for _, holder in slots)], "renew_slots")
        return [answer == 1 for answer in cast(list[object], answers)]

    async def release_slot(self, pool: str, holder: str) -> None:
        """See :meth:`trioai.state.State.release_slot`."""
        await self._request("release_slot", b"ZREM", self._key("slots", pool), holder)

    async def slots_held(self, pool: str) -> int:
        """See :meth:`trioai.state.State.slots_held`."""
        return int(str(await self._script(_SLOTS_HELD, [self._key("slots", pool)], [])))

    async def join_queue(self, queue: str, waiter: str, ttl: float) -> int:
        """See :meth:`trioai.state.State.join_queue`."""
        return int(str(await self._script(_QUEUE_POSITION, self._queue_keys(queue), [waiter, _ms(ttl), 1])))

    async def queue_position(self, queue: str, waiter: str, ttl: float) -> int | None:
        """See :meth:`trioai.state.State.queue_position`."""
        position = int(str(await self._script(_QUEUE_POSITION, self._queue_keys(queue), [waiter, _ms(ttl), 0])))
        return None if position < 0 else position

    async def leave_queue(self, queue: str, waiter: str) -> None:
        """See :meth:`trioai.state.State.leave_queue`."""
        await self._script(_LEAVE_QUEUE, self._queue_keys(queue)[:2], [waiter], "leave_queue")

    async def queue_length(self, queue: str) -> int:
        """See :meth:`trioai.state.State.queue_length`."""
        return int(str(await self._script(_QUEUE_LENGTH, self._queue_keys(queue)[:2], [])))

    def _queue_keys(self, queue: str) -> list[str]:
        members = self._key("queue", queue)
        return [members, members + ":due", members + ":next"]


async def _ping(client: Client) -> object:
    return await client.ping()


def _entry(entry: StreamEntry) -> LogEntry:
    return int(str(entry.identifier).split("-", 1)[0]), str(entry.field_values["f"])
