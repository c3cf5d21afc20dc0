"""The held Redis connection (``trioai.redisconn``) against a real redis-server: answers, errors,
several tasks at once, cancellation and timeouts, a lost server, passwords and databases; and
``RedisState`` going through it."""

from __future__ import annotations

import coredis.exceptions
import pytest
import trio
from coredis.connection import TCPLocation, UnixDomainSocketLocation

from trioai.redisconn import RedisConnection
from trioai.redisstate import RedisState
from trioai.state import StateUnavailable

from .redisserver import RedisServer


async def connect(server: RedisServer, seconds: float = 2.0, **options: object) -> RedisConnection:
    return await RedisConnection.open(TCPLocation("127.0.0.1", server.port), seconds=seconds, **options)  # type: ignore[arg-type]


async def test_answers_come_decoded_and_errors_as_corediss_exceptions(redis_server: RedisServer) -> None:
    connection = await connect(redis_server)
    try:
        assert await connection.request(b"PING") == "PONG"
        assert await connection.request(b"SET", "k", "välue") == "OK"
        assert await connection.request(b"GET", "k") == "välue"
        assert await connection.request(b"GET", "missing") is None
        assert await connection.request(b"RPUSH", "l", 1, 2.5, b"x") == 3
        assert await connection.request(b"LRANGE", "l", 0, -1) == ["1", "2.5", "x"]
        with pytest.raises(coredis.exceptions.NoScriptError):
            await connection.request(b"EVALSHA", "0" * 40, 0)
        with pytest.raises(coredis.exceptions.ResponseError, match="wrong number of arguments"):
            await connection.request(b"GET")
        assert connection.usable  # an error answer is an answer: the connection goes on
        assert await connection.request(b"EVAL", "return {1, 'two', false}", 0) == [1, "two", None]
        # RESP3, as coredis speaks it: the same types on this path as on the client's.
        assert (await connection.request(b"HELLO"))["proto"] == 3  # type: ignore[index]
    finally:
        connection.close()


async def test_tasks_sharing_it_each_get_their_own_answer(redis_server: RedisServer) -> None:
    connection = await connect(redis_server)
    answers: dict[int, object] = {}

    async def one(i: int) -> None:
        await connection.request(b"SET", f"k{i}", f"v{i}")
        answers[i] = await connection.request(b"GET", f"k{i}")

    try:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        assert answers == {i: f"v{i}" for i in range(50)}
    finally:
        connection.close()


async def test_a_cancelled_caller_leaves_no_answer_for_the_next(redis_server: RedisServer) -> None:
    connection = await connect(redis_server)
    try:
        with trio.move_on_after(0.05) as scope:
            await connection.request(b"BLPOP", "empty", "0.3")  # Redis answers after 0.3 s
        assert scope.cancelled_caught
        # The request ran to its end (shielded): its answer was read, not left on the wire.
        assert trio.current_time() - scope.deadline > 0.2
        assert connection.usable
        assert await connection.request(b"ECHO", "next") == "next"
    finally:
        connection.close()


async def test_past_its_time_a_request_fails_and_breaks_the_connection(redis_server: RedisServer) -> None:
    connection = await connect(redis_server, seconds=0.1)
    with pytest.raises(trio.TooSlowError):
        await connection.request(b"BLPOP", "empty", "1")
    assert not connection.usable
    with pytest.raises(coredis.exceptions.ConnectionError, match="closed"):
        await connection.request(b"PING")


async def test_a_lost_server_is_a_connection_error(redis_server: RedisServer) -> None:
    connection = await connect(redis_server)
    assert await connection.request(b"PING") == "PONG"
    await redis_server.stop()
    with pytest.raises(coredis.exceptions.ConnectionError):
        await connection.request(b"PING")
    assert not connection.usable


async def test_closing_wakes_a_request_waiting_for_its_answer(redis_server: RedisServer) -> None:
    connection = await connect(redis_server)
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            async def close_soon() -> None:
                await trio.sleep(0.05)
                connection.close()

            nursery.start_soon(close_soon)
            with pytest.raises(coredis.exceptions.ConnectionError):
                await connection.request(b"BLPOP", "empty", "1")


async def test_password_user_and_database(redis_server: RedisServer) -> None:
    await redis_server.cli("ACL", "SETUSER", "gateway", "on", ">s3cret", "~*", "+@all")
    await redis_server.cli("CONFIG", "SET", "requirepass", "hunter2")
    with pytest.raises(coredis.exceptions.AuthenticationFailureError):
        await connect(redis_server, password="wrong")
    default = await connect(redis_server, password="hunter2")
    named = await connect(redis_server, username="gateway", password="s3cret", db=3)
    try:
        assert await default.request(b"ACL", b"WHOAMI") == "default"
        assert await named.request(b"ACL", b"WHOAMI") == "gateway"
        await named.request(b"SET", "in3", "x")
        assert await default.request(b"GET", "in3") is None  # database 0
        await default.request(b"SELECT", 3)
        assert await default.request(b"GET", "in3") == "x"
    finally:
        default.close()
        named.close()


async def test_over_a_unix_socket(redis_server: RedisServer) -> None:
    location = UnixDomainSocketLocation(str(redis_server.directory / "redis.sock"))
    connection = await RedisConnection.open(location, seconds=2)
    try:
        assert await connection.request(b"PING") == "PONG"
    finally:
        connection.close()


async def test_redis_state_writes_through_it_with_the_urls_password_and_database(
        nursery: trio.Nursery, redis_server: RedisServer) -> None:
    await redis_server.cli("CONFIG", "SET", "requirepass", "hunter2")
    port = redis_server.port
    state = RedisState(f"redis://:hunter2@127.0.0.1:{port}/2", timeout=1)
    await nursery.start(state.run)
    assert await state.append("log", [(1, "one"), (2, "two")], ttl=30, maxlen=100)
    assert isinstance(state._connection, RedisConnection)  # the scripts' connection is ours
    assert await state.read("log", 0) == [(1, "one"), (2, "two")]  # coredis's client, same database
    keys = await redis_server.cli("-a", "hunter2", "--no-auth-warning", "-n", "2", "KEYS", "*")
    assert keys == "{trioai}:log:log"
    wrong = RedisState(f"redis://:wrong@127.0.0.1:{port}/2", timeout=1)
    await nursery.start(wrong.run)
    with pytest.raises(StateUnavailable):
        await wrong.append("log", [(3, "three")], ttl=30, maxlen=100)


async def test_a_cancelled_state_call_does_not_take_redis_for_down(nursery: trio.Nursery,
                                                                  redis_server: RedisServer) -> None:
    state = RedisState(redis_server.url, timeout=1)
    await nursery.start(state.run)
    assert await state.append("log", [(1, "one")], ttl=30, maxlen=100)
    held = state._connection
    for _ in range(20):  # cancelled at once, or while its script is on the wire
        with trio.move_on_after(0.0001):
            await state.append("other", [(1, "x")], ttl=30, maxlen=100)
    assert state.available and state.failures == 0
    assert state._connection is held and held is not None and held.usable
    assert await state.read("log", 0) == [(1, "one")]


async def test_a_broken_connection_fails_every_request_in_flight(redis_server: RedisServer) -> None:
    connection = await connect(redis_server, seconds=5)
    failures: list[BaseException] = []

    async def blocked(i: int) -> None:
        try:
            await connection.request(b"BLPOP", f"empty{i}", "4")  # pipelined behind each other
        except coredis.exceptions.ConnectionError as exc:
            failures.append(exc)

    with trio.fail_after(3):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(blocked, i)
            await trio.sleep(0.2)
            await redis_server.cli("CLIENT", "KILL", "TYPE", "normal")
    assert len(failures) == 5
    assert not connection.usable
