"""The floor of one Redis round trip under Trio, in this process's CPU (issue 18): ``python -m bench.redisfloor``.

With ``--redis``, every frame is in the shared log before a client gets it ("log, then send"). At
a few paced streams the frames of different streams rarely coincide, so each token event waits for
a round trip of its own: what a round trip costs the gateway's CPU is the floor of what Redis-backed
resume adds per token event. This bench starts Debian's ``redis-server`` (as ``bench.redisresume``
does: a free port of 127.0.0.1, nothing saved, killed at the end) and, in one Trio task, makes
``--calls`` round trips one after the other by each way below, ``--repeats`` times in turn; it prints
the median CPU time of this process (``time.process_time``: user + system, every thread) and wall
time per round trip, and per command where a round trip carries several. Then the same paced: one
round trip every ``--gap`` ms, the CPU beyond that of a loop that only sleeps. Back to back, Redis
and this process stay awake; paced, as in the gateway, both sleep between round trips and each round
trip also pays for waking them (on a virtual machine, much of it in the kernel). The ways:

* ``coredis client PING``: ``await client.ping()`` (the client's whole per-command path: the pool,
  the command object, telemetry hooks, the retry policy);
* ``coredis Script, 1 stream``: the append script through coredis's :class:`~coredis.commands.Script`
  (``EVALSHA``), one log of one frame: what trioai used before it held a connection;
* ``coredis pipeline of 1`` / ``of 16``: ``client.pipeline(transaction=False)`` with 1 or 16 PINGs;
* ``coredis held connection PING``: ``connection.create_request(b"PING")`` on a connection taken
  from the pool once (``connection_pool.get_connection()``), the cheapest coredis path found (its
  reader and writer tasks each wake per request);
* ``RedisConnection PING``: trioai's held connection (:mod:`trioai.redisconn`), where the caller
  writes the command and reads its answer itself, with coredis's packer and parser;
* ``RedisState.append_many, 1 log`` / ``16 logs``: trioai's append (the held connection, one EVALSHA
  per flush, the timeout and degraded-mode wrapper) with 1 frame per log;
* ``SharedGenerations.append, 1 frame``: the same through the flusher task (one task hop each way);
* ``bare trio socket PING`` (a reference floor only, never trioai's way): ``PING`` written and
  ``+PONG`` read on a plain ``trio.socket`` within ``trio.fail_after``;
* three of them again over the server's Unix socket (``--redis unix://PATH``, for a Redis on the
  gateway's host): the kernel's share of a round trip is smaller than on TCP loopback.

Each is compared with ``--local-us``: gateway CPU per token event with local (in-process) resume at
4 paced streams (``bench.redisresume``'s ``paced 4×50`` row); issue 18's budget for Redis is 25% of it.

    python -m bench.redisfloor                        # ~1 minute
    python -m bench.redisfloor --calls 200 --repeats 1  # a smoke run
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import coredis
import trio
from coredis.connection import BaseConnection, TCPLocation

from bench.redisresume import redis_binary, redis_cli, redis_server
from bench.run import row
from trioai.config import Settings
from trioai.redisconn import RedisConnection
from trioai.redisstate import RedisState
from trioai.sharedgen import SharedGenerations

if TYPE_CHECKING:
    from trioai.generation import Generation

RoundTrip = Callable[[], Awaitable[object]]
PING = b"*1\r\n$4\r\nPING\r\n"
#: The append script of one log per call (KEYS[1]: stream; ARGV: ttl_ms, maxlen, then seq, frame pairs),
#: as trioai sent it, one EVALSHA per log, before one call carried every log of a flush.
ONE_LOG_APPEND = """
if #ARGV > 2 then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if last[1] and tonumber(ARGV[3]) <= tonumber(string.match(last[1][1], '^(%d+)')) then return 0 end
  for i = 3, #ARGV, 2 do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], ARGV[i] .. '-0', 'f', ARGV[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


async def measure(once: RoundTrip, calls: int, gap: float = 0.0) -> tuple[float, float]:
    """CPU and wall µs per call of ``once``, over ``calls`` calls in a row (``gap`` s of sleep before each)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        if gap:
            await trio.sleep(gap)
        await once()
    return (time.process_time() - cpu) * 1e6 / calls, (time.perf_counter() - wall) * 1e6 / calls


async def nothing() -> None:
    """No round trip: the paced loop's own cost (its sleeps)."""


async def bare_socket(port: int | str) -> tuple[trio.socket.SocketType, RoundTrip]:
    """A plain Trio socket to Redis (TCP ``port`` of 127.0.0.1, or a Unix socket's path) and one
    PING/PONG on it (the reference floor)."""
    if isinstance(port, int):
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = trio.socket.socket(socket.AF_UNIX)
        await sock.connect(port)

    async def once() -> None:
        with trio.fail_after(1):
            await sock.send(PING)
            got = b""
            while not got.endswith(b"\r\n"):
                chunk = await sock.recv(64)
                if not chunk:
                    raise OSError("redis closed the connection")
                got += chunk
        assert got == b"+PONG\r\n", got

    return sock, once


async def main_async(args: argparse.Namespace) -> None:
    binary = redis_binary(args.redis_server)
    results: dict[str, list[tuple[float, float]]] = {}
    paced: dict[str, list[float]] = {}
    gap = args.gap / 1000
    per_trip: dict[str, int] = {}
    async with (redis_server(binary, redis_cli(binary), unix_socket=True) as redis,
                trio.open_nursery() as nursery):
        client = coredis.Redis.from_url(redis.url, decode_responses=True)
        unix_client = coredis.Redis.from_url(redis.unix_url, decode_responses=True)
        async with client, unix_client:
            state = RedisState(redis.url)
            await nursery.start(state.run)
            unix_state = RedisState(redis.unix_url)
            await nursery.start(unix_state.run)
            shared = SharedGenerations(state, Settings())
            await nursery.start(shared.run)
            script = client.register_script(ONE_LOG_APPEND)
            connection = await client.connection_pool.get_connection()
            unix_connection = await unix_client.connection_pool.get_connection()
            ours = await RedisConnection.open(TCPLocation("127.0.0.1", redis.port), seconds=1)
            sock, bare = await bare_socket(redis.port)
            assert redis.unix_socket is not None
            unix_sock, unix_bare = await bare_socket(redis.unix_socket)
            seqs = iter(range(1, 1 << 40))
            generation = cast("Generation", SimpleNamespace(token="bench-floor"))

            async def pipeline(size: int) -> None:
                async with client.pipeline(transaction=False) as pipe:
                    for _ in range(size):
                        pipe.ping()

            async def held_ping(connection: BaseConnection) -> None:
                with trio.fail_after(1):
                    await connection.create_request(b"PING")

            async def our_ping() -> None:
                await ours.request(b"PING")

            async def script_call() -> None:
                await script(keys=["{trioai}:log:s"], args=[30_000, 1000, next(seqs), "frame"])

            async def append_many(logs: int, state: RedisState = state) -> None:
                seq = next(seqs)
                assert all(await state.append_many([(f"b{i}", [(seq, "frame")]) for i in range(logs)],
                                                   ttl=30, maxlen=1000))

            async def shared_append() -> None:
                assert await shared.append(generation, [f'{{"type":"token","id":"r","seq":{next(seqs)},"c":"x"}}'])

            ways: list[tuple[str, int, RoundTrip]] = [
                ("coredis client PING", 1, client.ping),
                ("coredis Script (EVALSHA), 1 log", 1, script_call),
                ("coredis pipeline of 1 PING", 1, lambda: pipeline(1)),
                ("coredis pipeline of 16 PINGs", 16, lambda: pipeline(16)),
                ("coredis held connection PING (create_request)", 1, lambda: held_ping(connection)),
                ("RedisConnection PING", 1, our_ping),
                ("RedisState.append_many, 1 log", 1, lambda: append_many(1)),
                ("RedisState.append_many, 16 logs", 16, lambda: append_many(16)),
                ("SharedGenerations.append, 1 frame", 1, shared_append),
                ("bare trio socket PING (reference)", 1, bare),
                ("Unix socket: coredis held connection PING", 1, lambda: held_ping(unix_connection)),
                ("Unix socket: RedisState.append_many, 1 log", 1, lambda: append_many(1, unix_state)),
                ("Unix socket: bare trio socket PING (reference)", 1, unix_bare),
            ]
            for name, commands, once in ways:
                await measure(once, max(args.calls // 10, 10))  # warm up
                per_trip[name] = commands
            for _ in range(args.repeats if args.calls else 0):
                for name, _, once in ways:
                    results.setdefault(name, []).append(await measure(once, args.calls))
            for _ in range(args.repeats if gap else 0):
                for name, _, once in ways:  # each against a sleeps-only loop just before it
                    sleeps = (await measure(nothing, args.paced_calls, gap))[0]
                    paced.setdefault(name, []).append((await measure(once, args.paced_calls, gap))[0] - sleeps)
            sock.close()
            ours.close()
            unix_sock.close()
            client.connection_pool.release(connection)
            unix_client.connection_pool.release(unix_connection)
            nursery.cancel_scope.cancel()

    budget = args.local_us * 0.25
    if results:
        hot_table(args, results, per_trip, budget)
    if paced:
        paced_table(args, paced, budget)


def hot_table(args: argparse.Namespace, results: dict[str, list[tuple[float, float]]], per_trip: dict[str, int],
              budget: float) -> None:
    """The round trips back to back."""
    print(f"### One Redis round trip under Trio: CPU of this process, median of {args.repeats} × {args.calls} "
          f"round trips, python {sys.version.split()[0]}, trio {trio.__version__}, coredis {coredis.__version__}\n")
    print(row("way", "CPU µs / round trip", "CPU µs / command", "wall µs / round trip",
              f"share of local resume's {args.local_us:g} µs / token event", f"× the Redis budget ({budget:.0f} µs)"))
    print(row(*["---"] * 6))
    for name, samples in results.items():
        cpu = statistics.median(s[0] for s in samples)
        wall = statistics.median(s[1] for s in samples)
        print(row(name, f"{cpu:.1f}", f"{cpu / per_trip[name]:.1f}", f"{wall:.1f}",
                  f"{100 * cpu / args.local_us:.0f}%", f"{cpu / budget:.2f}×"))


def paced_table(args: argparse.Namespace, paced: dict[str, list[float]], budget: float) -> None:
    """The round trips paced."""
    print(f"\n### Paced: one round trip every {args.gap:g} ms (4 streams at 20 ms/token), CPU beyond the loop's "
          f"own sleeps, median of {args.repeats} × {args.paced_calls}: both processes idle between round trips, "
          "as in the gateway, so every round trip also pays waking them\n")
    print(row("way", "CPU µs / round trip", f"share of local resume's {args.local_us:g} µs / token event",
              f"× the Redis budget ({budget:.0f} µs)"))
    print(row(*["---"] * 4))
    for name, extra in paced.items():
        cpu = statistics.median(extra)
        print(row(name, f"{cpu:.1f}", f"{100 * cpu / args.local_us:.0f}%", f"{cpu / budget:.2f}×"))


def main() -> None:
    """``python -m bench.redisfloor``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000,
                        help="round trips per measurement back to back (0: no such table)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per way (the median is printed)")
    parser.add_argument("--gap", type=float, default=5.0,
                        help="ms between round trips of the paced table (0: no paced table)")
    parser.add_argument("--paced-calls", type=int, default=400, help="round trips per paced measurement")
    parser.add_argument("--local-us", type=float, default=263.0,
                        help="gateway CPU µs per token event with local resume at 4 paced streams (bench.redisresume)")
    parser.add_argument("--redis-server", metavar="PATH", help="the redis-server executable (default: on PATH)")
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
