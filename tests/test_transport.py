"""H11Transport: httpx over h11 on Trio, against the fake engine and raw sockets that misbehave."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
import trio

from trioai.fake_upstream import FakeUpstream, Script
from trioai.sse import DONE, SSEDecoder, parse_chunk
from trioai.transport import REQUEST_WRITTEN, H11Transport, ResponseBody
from trioai.upstream import Upstream

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def raw_server(nursery: trio.Nursery, handler: Handler) -> str:
    """A TCP server running ``handler`` per connection; its base URL."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def replying(data: bytes, then: Callable[[trio.SocketStream], Awaitable[object]]) -> Handler:
    """A raw server's handler: read the request, send ``data`` as the answer, then ``then(stream)``."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(data)
        await then(stream)

    return handle


def watching_for_eof(closed: trio.Event) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Keep the connection and set ``closed`` when the client closes it."""

    async def watch(stream: trio.SocketStream) -> None:
        if await stream.receive_some(65536) == b"":
            closed.set()

    return watch


def client(base_url: str, transport: H11Transport, **timeouts: float | None) -> httpx.AsyncClient:
    timeout = httpx.Timeout(**{"timeout": 5.0, **timeouts})
    return httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout)


def chat_body(content: str, max_tokens: int) -> dict[str, object]:
    return {"model": "m", "stream": True, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


async def test_get_and_a_streamed_post_reuse_one_connection(upstream: FakeUpstream) -> None:
    async with client(upstream.base_url, H11Transport()) as http:
        models = await http.get("/models")
        assert models.status_code == 200
        assert models.json()["data"][0]["id"] == "fake-model"
        for _ in range(3):
            request = http.build_request("POST", "/chat/completions", json=chat_body("a b", 4))
            response = await http.send(request, stream=True)
            body = b"".join([part async for part in response.aiter_raw()])
            await response.aclose()
            assert response.status_code == 200
            assert response.http_version == "HTTP/1.1"
            chunks = [parse_chunk(event) for event in SSEDecoder().feed(body)]
            assert chunks[-1] is DONE
            assert "".join(c.content or "" for c in chunks if c is not DONE) == "a b a b "
            assert body.rstrip().endswith(b"data: [DONE]")
    assert upstream.tcp_connections == 1  # keep-alive: every request went over the first connection


async def test_closing_a_response_early_closes_its_connection(upstream: FakeUpstream) -> None:
    async with client(upstream.base_url, H11Transport()) as http:
        request = http.build_request("POST", "/chat/completions", json=chat_body("x", 1000))
        response = await http.send(request, stream=True)
        async for _ in response.aiter_raw():
            break  # one read, then hang up as a cancelled generation does
        await response.aclose()
        record = upstream.requests[-1]
        with trio.fail_after(5):
            await record.closed.wait()
        assert record.disconnected_at is not None and not record.completed
        assert (await http.get("/models")).status_code == 200
    assert upstream.tcp_connections == 2  # the cut connection was not reused


async def test_an_idle_connection_the_engine_closed_is_not_reused(nursery: trio.Nursery) -> None:
    accepted = 0

    async def close(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await stream.aclose()  # keep-alive was implied, but the server goes away

    base = await raw_server(nursery, replying(OK, close))
    async with client(base, H11Transport()) as http:
        assert (await http.get("/")).text == "ok"
        await trio.sleep(0.1)  # the FIN arrives: the pooled socket turns readable
        assert (await http.get("/")).text == "ok"
    assert accepted == 2


@pytest.mark.parametrize(("listen_on", "url_host"), [
    pytest.param("127.0.0.1", "127.0.0.1", id="ipv4-literal"),
    pytest.param("::1", "[::1]", id="ipv6-literal"),
    pytest.param("127.0.0.1", "localhost", id="name"),
])
async def test_the_engine_is_reached_by_address_or_name(nursery: trio.Nursery, listen_on: str, url_host: str) -> None:
    """IP literals take the plain-connect path, names go through trio's resolver: both must arrive."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, replying(OK, trio.SocketStream.aclose), 0,
                                                      host=listen_on))
    port = listeners[0].socket.getsockname()[1]
    async with client(f"http://{url_host}:{port}", H11Transport()) as http:
        response = await http.get("/")
    assert response.text == "ok"


async def test_connection_refused_is_a_connect_error() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}", H11Transport()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_garbage_instead_of_http_is_a_protocol_error(nursery: trio.Nursery) -> None:
    async def linger(stream: trio.SocketStream) -> None:
        await trio.sleep(1)

    garbage = replying(b"SSH-2.0-OpenSSH\r\n\r\n", linger)
    async with client(await raw_server(nursery, garbage), H11Transport()) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/")


async def test_a_body_cut_short_is_a_protocol_error(nursery: trio.Nursery) -> None:
    cut = replying(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", trio.SocketStream.aclose)
    async with client(await raw_server(nursery, cut), H11Transport()) as http, http.stream("GET", "/") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()


async def test_no_response_head_in_time_is_a_read_timeout(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with client(await raw_server(nursery, silent), H11Transport(), read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")


async def test_connection_limit_waits_then_times_out_then_hands_over(upstream: FakeUpstream) -> None:
    async with client(upstream.base_url, H11Transport(max_connections=1), pool=0.2) as http:
        first = await http.send(http.build_request("POST", "/chat/completions", json=chat_body("x", 1000)),
                                stream=True)
        with pytest.raises(httpx.PoolTimeout):
            await http.get("/models")
        results: list[int] = []

        async def wait_for_the_connection() -> None:
            results.append((await http.get("/models", timeout=5.0)).status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_the_connection)
            await trio.sleep(0.05)
            assert results == []  # still waiting: the only connection streams
            await first.aclose()
        assert results == [200]


async def test_closing_the_transport_closes_idle_connections(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    keep_alive = replying(OK, watching_for_eof(closed))

    transport = H11Transport()
    async with client(await raw_server(nursery, keep_alive), transport) as http:
        assert (await http.get("/")).text == "ok"
        assert not closed.is_set()
    with trio.fail_after(5):
        await closed.wait()
    with pytest.raises(RuntimeError):
        await transport.handle_async_request(httpx.Request("GET", "http://127.0.0.1:1/"))


async def test_idle_connections_past_their_expiry_are_closed(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    keep_alive = replying(OK, watching_for_eof(closed))

    transport = H11Transport(keepalive_expiry=0.1)
    async with client(await raw_server(nursery, keep_alive), transport) as http:
        assert (await http.get("/")).text == "ok"
        assert transport.close_expired() == 0  # fresh: kept
        assert (transport.connections_open, transport.connections_idle) == (1, 1)
        await trio.sleep(0.15)
        assert transport.close_expired() == 1
        assert (transport.connections_open, transport.connections_idle) == (0, 0)
        with trio.fail_after(5):
            await closed.wait()


async def test_the_fake_engine_keeps_a_request_sent_while_it_streams(upstream: FakeUpstream) -> None:
    """Keep-alive reuse can race the engine's disconnect watcher: the next request must not be lost."""
    upstream.script = lambda body: Script(tokens=("x ",) * 5, delay=0.05)
    stream = await trio.open_tcp_stream("127.0.0.1", upstream.port)
    async with stream:
        body = json.dumps(chat_body("x", 5)).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await stream.send_all(request)
        received = await stream.receive_some(65536)  # the head and the first chunk: now streaming
        await stream.send_all(request)  # arrives while the engine's watcher task is reading
        with trio.fail_after(5):
            while received.count(b"data: [DONE]") < 2:
                data = await stream.receive_some(65536)
                assert data, "the engine closed the connection"
                received += data
        assert len(upstream.requests) == 2
        with trio.fail_after(5):
            await upstream.requests[1].closed.wait()
    assert all(r.completed for r in upstream.requests)


async def test_model_listing_and_health_checks_take_no_chat_connection(upstream: FakeUpstream) -> None:
    async with Upstream(upstream.base_url) as engine:
        assert await engine.list_models() == ["fake-model"]
        assert await engine.health()
        assert isinstance(engine.transport, H11Transport)
        assert engine.transport.connections_open == 0
        assert upstream.tcp_connections == 2  # a connection of the probes' own each time, closed after it


async def test_health_answers_while_every_chat_connection_is_busy(upstream: FakeUpstream) -> None:
    upstream.script = lambda body: Script(tokens=("x ",), stall_after=0)  # headers sent, then nothing
    payload = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with Upstream(upstream.base_url, max_connections=2, connect_timeout=5.0) as engine:
        assert isinstance(engine.transport, H11Transport)
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(2):
                await streams.enter_async_context(engine.stream_chat(payload))
            assert engine.transport.connections_open == 2  # the chat pool is exhausted
            with trio.fail_after(1):  # not the 5 s pool timeout
                assert await engine.health()
                assert await engine.list_models() == ["fake-model"]
            assert (engine.transport.connections_open, engine.transport.connections_idle) == (2, 0)


async def test_the_request_written_hook_runs_before_the_answer_and_reads_are_stamped(nursery: trio.Nursery) -> None:
    """REQUEST_WRITTEN (upstream's request-start histogram) runs once the request's bytes are out,
    before the engine answers: this engine answers only after the hook ran."""
    written = trio.Event()
    calls: list[float] = []

    async def answer_after_the_hook(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await written.wait()
        await stream.send_all(OK)

    def hook() -> None:
        calls.append(trio.current_time())
        written.set()

    base_url = await raw_server(nursery, answer_after_the_hook)
    transport = H11Transport()
    request = httpx.Request("GET", base_url + "/x", extensions={REQUEST_WRITTEN: hook, "timeout": {}})
    with trio.fail_after(5):
        response = await transport.handle_async_request(request)
        assert response.status_code == 200
        assert calls and len(calls) == 1
        body = response.stream
        assert isinstance(body, httpx.AsyncByteStream)
        assert b"".join([part async for part in body]) == b"ok"
        assert getattr(body, "read_at", None) is None or body.read_at > 0  # type: ignore[attr-defined]
        await body.aclose()
    await transport.aclose()


class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


@pytest.mark.parametrize("pooled", [False, True])
async def test_a_request_is_written_without_a_schedule_point(nursery: trio.Nursery, pooled: bool) -> None:
    """New (to an address) or pooled, an engine connection takes no yield before the request is out:
    in a burst of requests every yield there costs a pass over all the others (issue 19)."""
    async def answer(stream: trio.SocketStream) -> None:
        while await stream.receive_some(65536):
            await stream.send_all(OK)

    base_url = await raw_server(nursery, answer)
    transport = H11Transport()
    steps_at_write: list[int] = []
    counter = StepCounter(trio.lowlevel.current_task())
    if pooled:
        response = await transport.handle_async_request(httpx.Request("GET", base_url + "/x"))
        await response.aread()
        await response.aclose()
        assert transport.connections_idle == 1
    request = httpx.Request("GET", base_url + "/x",
                            extensions={REQUEST_WRITTEN: lambda: steps_at_write.append(counter.steps)})
    trio.lowlevel.add_instrument(counter)
    try:
        response = await transport.handle_async_request(request)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert steps_at_write == [0]  # written in the step that asked
    await response.aread()
    assert response.content == b"ok"
    await response.aclose()
    await transport.aclose()


async def test_a_refused_connect_found_at_the_first_write_is_a_connect_error() -> None:
    with socket_closed_port() as port:
        transport = H11Transport()
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{port}/x"))
        assert transport.connections_open == 0
        await transport.aclose()


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    """A local port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


# --- send_now: a request written without an await (Gateway.begin's eager start) ---------------------


async def answering_each_request(stream: trio.SocketStream) -> None:
    """A raw server's handler: ``OK`` for every request read, on one keep-alive connection."""
    while await stream.receive_some(65536):
        await stream.send_all(OK)


async def read_to_the_end(response: httpx.Response) -> bytes:
    """The whole body, the response then closed (its connection pooled, having been read to its end)."""
    body = await response.aread()
    await response.aclose()
    return body


async def test_send_now_writes_on_a_pooled_connection_before_it_returns(nursery: trio.Nursery) -> None:
    """On an idle pooled connection the request is all written inside send_now (REQUEST_WRITTEN has
    run); response() reads the answer, and the connection goes back to the pool."""
    base_url = await raw_server(nursery, answering_each_request)
    transport = H11Transport()
    assert await read_to_the_end(await transport.handle_async_request(httpx.Request("GET", base_url + "/x"))) == b"ok"
    assert (transport.connections_open, transport.connections_idle) == (1, 1)
    written: list[int] = []
    sent = transport.send_now(httpx.Request("GET", base_url + "/x",
                                            extensions={REQUEST_WRITTEN: lambda: written.append(1)}))
    assert sent is not None
    assert written == [1]  # before any await
    assert (transport.connections_open, transport.connections_idle) == (1, 0)  # the pooled one, taken
    with trio.fail_after(5):
        response = await sent.response()
        assert response.status_code == 200
        assert await read_to_the_end(response) == b"ok"
    assert written == [1]  # not run again by response()
    assert (transport.connections_open, transport.connections_idle) == (1, 1)
    await transport.aclose()


async def test_send_now_opens_a_connection_to_an_address(nursery: trio.Nursery) -> None:
    """No idle connection, an IP address: send_now opens one itself (no await) and the answer is read."""
    base_url = await raw_server(nursery, answering_each_request)
    transport = H11Transport()
    written: list[int] = []
    sent = transport.send_now(httpx.Request("GET", base_url + "/x",
                                            extensions={REQUEST_WRITTEN: lambda: written.append(1)}))
    assert sent is not None
    assert (transport.connections_open, transport.connections_idle) == (1, 0)
    with trio.fail_after(5):
        assert await read_to_the_end(await sent.response()) == b"ok"
    assert written == [1]
    assert (transport.connections_open, transport.connections_idle) == (1, 1)
    await transport.aclose()


async def _streamed_body() -> AsyncIterator[bytes]:
    yield b"not in memory"


@pytest.mark.parametrize("case", ["https", "host-name", "streamed-body"])
async def test_send_now_declines_what_it_cannot_write_at_once(nursery: trio.Nursery, case: str) -> None:
    """TLS, a name to resolve, a body not in memory: None, and no connection opened."""
    base_url = await raw_server(nursery, answering_each_request)
    port = base_url.rsplit(":", 1)[1]
    request = {
        "https": lambda: httpx.Request("GET", f"https://127.0.0.1:{port}/x"),
        "host-name": lambda: httpx.Request("GET", f"http://localhost:{port}/x"),
        "streamed-body": lambda: httpx.Request("POST", base_url + "/x", content=_streamed_body()),
    }[case]()
    transport = H11Transport()
    assert transport.send_now(request) is None
    assert transport.connections_open == 0
    await transport.aclose()


async def test_send_now_declines_when_the_pool_is_full(nursery: trio.Nursery) -> None:
    """max_connections reached (a response still open): None, and nothing else opened."""
    base_url = await raw_server(nursery, answering_each_request)
    transport = H11Transport(max_connections=1)
    with trio.fail_after(5):
        response = await transport.handle_async_request(httpx.Request("GET", base_url + "/x"))
    assert (transport.connections_open, transport.connections_idle) == (1, 0)
    assert transport.send_now(httpx.Request("GET", base_url + "/x")) is None
    assert (transport.connections_open, transport.connections_idle) == (1, 0)
    assert await read_to_the_end(response) == b"ok"
    assert transport.send_now(httpx.Request("GET", base_url + "/x")) is not None  # now the idle one is free
    await transport.aclose()


async def test_abandoning_a_sent_request_closes_its_connection(nursery: trio.Nursery) -> None:
    """abandon() closes the connection (the engine sees EOF, the slot is free); abandon() again does
    nothing more, and response() after it raises StreamClosed."""
    closed = trio.Event()
    received = trio.Event()

    async def read_the_request_then_watch(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        received.set()
        await watching_for_eof(closed)(stream)

    base_url = await raw_server(nursery, read_the_request_then_watch)
    transport = H11Transport()
    sent = transport.send_now(httpx.Request("GET", base_url + "/x"))
    assert sent is not None
    with trio.fail_after(5):
        await received.wait()
    assert not closed.is_set()
    sent.abandon()
    assert (transport.connections_open, transport.connections_idle) == (0, 0)
    with trio.fail_after(5):
        await closed.wait()
    sent.abandon()
    assert (transport.connections_open, transport.connections_idle) == (0, 0)  # the slot not given back twice
    with pytest.raises(httpx.StreamClosed):
        await sent.response()
    assert transport.connections_open == 0
    await transport.aclose()


async def test_abandon_after_response_leaves_the_connection_to_the_response(nursery: trio.Nursery) -> None:
    """Once response() took the connection, abandon() does not close it; response() again raises."""
    base_url = await raw_server(nursery, answering_each_request)
    transport = H11Transport()
    sent = transport.send_now(httpx.Request("GET", base_url + "/x"))
    assert sent is not None
    with trio.fail_after(5):
        response = await sent.response()
    sent.abandon()
    assert transport.connections_open == 1
    with pytest.raises(httpx.StreamClosed):
        await sent.response()
    assert await read_to_the_end(response) == b"ok"
    assert (transport.connections_open, transport.connections_idle) == (1, 1)
    await transport.aclose()


BIG_BODY = 16 * 1024 * 1024  # more than the kernel's socket buffers take at once


async def test_what_send_now_could_not_write_is_written_by_response(nursery: trio.Nursery) -> None:
    """A body larger than the socket buffers: send_now writes what the kernel takes; REQUEST_WRITTEN
    runs only once response() has written the rest, and the engine (which answers after reading the
    whole body) answers."""
    bodies: list[int] = []

    async def read_whole_body_then_answer(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        size = len(body)
        while size < length:
            chunk = await stream.receive_some(1 << 20)
            assert chunk
            size += len(chunk)
        bodies.append(size)
        await stream.send_all(OK)
        await stream.receive_some(65536)

    base_url = await raw_server(nursery, read_whole_body_then_answer)
    transport = H11Transport()
    written: list[int] = []
    request = httpx.Request("POST", base_url + "/x", content=b"x" * BIG_BODY,
                            extensions={REQUEST_WRITTEN: lambda: written.append(len(bodies))})
    sent = transport.send_now(request)
    assert sent is not None
    assert written == []  # the kernel did not take 16 MiB at once
    with trio.fail_after(10):
        response = await sent.response()
        assert written == [0]  # once, when the last byte was out, before the engine answered
        assert await read_to_the_end(response) == b"ok"
    assert bodies == [BIG_BODY]
    assert written == [0]
    await transport.aclose()


@pytest.mark.parametrize("opened_by", ["handle_async_request", "send_now"])
async def test_a_reused_connection_is_no_longer_connecting(nursery: trio.Nursery, opened_by: str) -> None:
    """However a new connection's first request was written, the connect is over once it was: the
    next request on it, stuck writing, times out as a write (WriteTimeout, the write timeout), not
    as a connect (ConnectTimeout, under the connect timeout)."""
    async def answer_once_then_stop_reading(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(OK)
        await stream.receive_some(65536)  # the start of the next request, then nothing more is read
        await trio.sleep_forever()

    base_url = await raw_server(nursery, answer_once_then_stop_reading)
    transport = H11Transport()
    with trio.fail_after(5):
        if opened_by == "send_now":
            sent = transport.send_now(httpx.Request("GET", base_url + "/x"))
            assert sent is not None
            response = await sent.response()
        else:
            response = await transport.handle_async_request(httpx.Request("GET", base_url + "/x"))
        assert await read_to_the_end(response) == b"ok"
    assert (transport.connections_open, transport.connections_idle) == (1, 1)
    timeouts = {"connect": 1.0, "write": 0.2, "read": 5.0, "pool": 5.0}
    request = httpx.Request("POST", base_url + "/x", content=b"x" * BIG_BODY, extensions={"timeout": timeouts})
    with trio.fail_after(10), pytest.raises(httpx.WriteTimeout):
        await transport.handle_async_request(request)
    assert transport.connections_open == 0
    await transport.aclose()


@pytest.mark.parametrize("written_at_once", [False, True])
async def test_a_chat_request_carries_its_own_headers_and_no_httpx_defaults(upstream: FakeUpstream,
                                                                           written_at_once: bool) -> None:
    """Built once per engine (Host included) with the body as a stream: httpx adds nothing, so
    what the engine gets is exactly these, on the eager path and the awaited one alike."""
    from trioai import __version__

    body = chat_body("a b", 2)
    async with Upstream(upstream.base_url, api_key="k-1") as engine:
        sent = engine.send_chat_now(body) if written_at_once else None
        assert (sent is not None) is written_at_once
        async with engine.stream_chat(body, sent=sent) as stream:
            assert [chunk.content async for chunk in stream if chunk.content] == ["a ", "b "]
    record = upstream.requests[-1]
    assert record.body == {**body, "stream": True, "stream_options": {"include_usage": True}}
    content_length = record.headers.pop("content-length")
    assert int(content_length) == len(json.dumps(record.body, separators=(",", ":")).encode())
    assert record.headers == {
        "host": upstream.base_url.removeprefix("http://").split("/")[0], "user-agent": f"trioai/{__version__}",
        "accept-encoding": "identity", "authorization": "Bearer k-1", "content-type": "application/json",
    }


async def test_new_plain_connections_send_without_delay(upstream: FakeUpstream) -> None:
    """Both ways of opening one (the eager write's and the awaited one) set ``TCP_NODELAY``, as
    trio's ``SocketStream`` did before connections were made without it."""
    import socket

    transport = H11Transport()
    async with Upstream(upstream.base_url, transport=transport) as engine:
        for sent in (engine.send_chat_now(chat_body("a", 1)), None):
            async with engine.stream_chat(chat_body("a", 1), sent=sent) as stream:
                assert [chunk.content async for chunk in stream if chunk.content] == ["a "]
                body = stream._response.stream
                assert isinstance(body, ResponseBody) and body._conn is not None
                assert body._conn.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            transport.close_expired()
            while transport.connections_idle:  # the next request opens a new connection
                transport._discard(transport._idle.pop())


def test_ip_family_tells_addresses_from_names() -> None:
    import socket

    from trioai.transport import _ip_family

    assert _ip_family(b"127.0.0.1") == socket.AF_INET
    assert _ip_family(b"::1") == socket.AF_INET6
    assert _ip_family(b"localhost") is None
    assert _ip_family(b"engine.internal") is None
