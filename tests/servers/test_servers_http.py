"""The HTTP/1.1 server over real sockets on 127.0.0.1: framing, limits, timeouts, shutdown.

A raw socket plus a client-side h11 connection plays the client, so each test controls exactly
which bytes are sent and when.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import h11
import pytest

from resultity_servers._http import (
    HTTPServer,
    Request,
    Response,
    Router,
    ServerConfig,
    StreamingResponse,
    running_server,
)

pytestmark = pytest.mark.anyio

FAST = {"header_timeout_s": 2.0, "idle_timeout_s": 2.0, "body_timeout_s": 2.0}


_OPEN: list[Raw] = []


class Raw:
    """A client socket with an h11 parser for the responses."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, server: HTTPServer) -> Raw:
        raw = cls(await anyio.connect_tcp("127.0.0.1", server.port))
        _OPEN.append(raw)
        return raw

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> None:
        hdrs = [("host", "test"), *((k.replace("_", "-"), v) for k, v in headers.items())]
        if body and "transfer_encoding" not in headers:
            hdrs.append(("content-length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=path, headers=hdrs))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.send(data)

    async def next_event(self) -> Any:
        if self.h11.our_state is h11.IDLE:
            # Bytes were written by hand: tell the parser a request went out (bytes dropped).
            self.h11.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
            self.h11.send(h11.EndOfMessage())
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                self.h11.receive_data(await self.stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                self.h11.receive_data(b"")

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            body += event.data
        headers = {k.decode(): v.decode() for k, v in head.headers}
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return head.status_code, headers, body

    async def closed(self) -> bool:
        """Return True if the server closed the connection (EOF or reset) within 2 s."""
        with anyio.move_on_after(2):
            try:
                while await self.stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return True
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def _router() -> Router:
    router = Router()

    @router.route("GET", "/hello")
    async def hello(request: Request) -> Response:
        return Response.json({"hello": "world", "client_port": request.client[1]})

    @router.route("POST", "/echo")
    async def echo(request: Request) -> Response:
        return Response(200, {"content-type": "application/octet-stream"}, request.body)

    @router.route("GET", "/items/{item_id}")
    async def item(request: Request) -> Response:
        return Response.json({"id": request.path_params["item_id"], "q": request.query_params()})

    @router.route("GET", "/boom")
    async def boom(request: Request) -> Response:
        raise RuntimeError("handler bug")

    return router


@asynccontextmanager
async def server_for(
    router: Router | Callable[[Request], Awaitable[Any]], **config: Any
) -> AsyncIterator[HTTPServer]:
    try:
        async with running_server(router, ServerConfig(**{**FAST, **config})) as server:
            yield server
            await _close_all()
    finally:
        await _close_all()


@asynccontextmanager
async def _closing_raws() -> AsyncIterator[None]:
    """Close leftover client sockets, even when the test failed."""
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await _close_all()


async def _close_all() -> None:
    while _OPEN:
        await _OPEN.pop().aclose()


async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/hello")
            status, headers, body = await raw.response()
            assert status == 200
            assert headers["content-type"] == "application/json"
            assert headers["content-length"] == str(len(body))
            assert "date" in headers
            await raw.request("GET", "/hello")
            status2, _, body2 = await raw.response()
            assert status2 == 200
            assert body2 == body  # same client port: the same TCP connection
            assert server.connection_count == 1
            await raw.aclose()


async def test_pipelined_requests_are_answered_in_order() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.send(
                b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\none"
                b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\ntwo"
            )
            assert (await raw.response())[2] == b"one"
            assert (await raw.response())[2] == b"two"
            await raw.aclose()


async def test_chunked_upload_arrives_whole() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in (b"5\r\nhello\r\n", b"1\r\n \r\n", b"5\r\nworld\r\n", b"0\r\n\r\n"):
                await raw.send(piece)
                await anyio.sleep(0.01)
            status, _, body = await raw.response()
            assert (status, body) == (200, b"hello world")
            await raw.aclose()


async def test_expect_100_continue_gets_an_interim_response() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.send(
                b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n"
                b"expect: 100-continue\r\n\r\n"
            )
            interim = await raw.next_event()
            assert isinstance(interim, h11.InformationalResponse)
            assert interim.status_code == 100
            await raw.send(b"ok")
            assert (await raw.response())[2] == b"ok"
            await raw.aclose()


async def test_body_over_the_limit_gets_413_declared_or_chunked() -> None:
    with anyio.fail_after(5):
        async with server_for(_router(), max_body_bytes=10) as server:
            raw = await Raw.connect(server)
            await raw.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\n\r\n")
            status, headers, body = await raw.response()
            assert status == 413
            assert headers["connection"] == "close"
            assert b"larger than 10 bytes" in body
            assert await raw.closed()

            raw = await Raw.connect(server)
            await raw.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
            await raw.send(b"6\r\nabcdef\r\n6\r\nghijkl\r\n")
            assert (await raw.response())[0] == 413
            assert await raw.closed()

            raw = await Raw.connect(server)
            await raw.request("POST", "/echo", b"0123456789")
            assert (await raw.response())[:3:2] == (200, b"0123456789")
            await raw.aclose()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: t\r\nno colon here\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: nope\r\n\r\n",
        b"\x00\xff\x16\x03\x01 binary",
        b"GET nothing-like-a-path HTTP/1.1\r\nhost: t\r\n\r\n",
    ],
)
async def test_malformed_http_gets_400_closes_and_server_lives(garbage: bytes) -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.send(garbage)
            status, headers, body = await raw.response()
            assert status == 400
            assert headers["connection"] == "close"
            assert body.startswith(b'{"error":')
            assert await raw.closed()
            raw = await Raw.connect(server)
            await raw.request("GET", "/hello")
            assert (await raw.response())[0] == 200
            await raw.aclose()


async def test_unknown_version_gets_505_and_absolute_form_is_accepted() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.send(b"GET /hello HTTP/2.5\r\nhost: t\r\n\r\n")
            assert b"HTTP/1.1 505 " in await raw.stream.receive()
            raw = await Raw.connect(server)
            await raw.send(b"GET http://elsewhere/items/7?a=b HTTP/1.1\r\nhost: t\r\n\r\n")
            assert (await raw.response())[2] == b'{"id":"7","q":{"a":["b"]}}'


async def test_oversized_head_gets_431() -> None:
    with anyio.fail_after(5):
        async with server_for(_router(), max_header_bytes=1024) as server:
            raw = await Raw.connect(server)
            await raw.send(b"GET /hello HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 4096 + b"\r\n\r\n")
            assert (await raw.response())[0] == 431
            assert await raw.closed()


async def test_handler_error_is_500_and_connection_survives() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/boom")
            status, _, body = await raw.response()
            assert status == 500
            assert b"handler bug" not in body  # internals are not leaked
            await raw.request("GET", "/hello")
            assert (await raw.response())[0] == 200
            await raw.aclose()


async def test_routing_404_405_params_and_head() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/items/a%20b?x=1&x=2&y=")
            status, _, body = await raw.response()
            assert status == 200
            assert body == b'{"id":"a b","q":{"x":["1","2"],"y":[""]}}'
            await raw.request("GET", "/nowhere")
            assert (await raw.response())[0] == 404
            await raw.request("DELETE", "/hello")
            status, headers, _ = await raw.response()
            assert (status, headers["allow"]) == (405, "GET")
            await raw.request("HEAD", "/hello")
            status, headers, body = await raw.response()
            assert (status, body) == (200, b"")
            assert int(headers["content-length"]) > 0
            await raw.aclose()


def test_router_refuses_duplicates_and_relative_paths() -> None:
    router = Router()

    async def handler(request: Request) -> Response:
        return Response()

    router.add("GET", "/a/{x}", handler)
    router.add("POST", "/a/{x}", handler)
    with pytest.raises(ValueError, match="already registered"):
        router.add("get", "/a/{x}", handler)
    with pytest.raises(ValueError, match="must start with"):
        router.add("GET", "a", handler)


async def test_sse_stream_delivers_events_as_they_are_produced() -> None:
    gate = anyio.Event()

    async def events(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            await gate.wait()  # the client must have seen "first" before this opens
            yield b"data: second\n\n"
            yield b""
            yield b"data: [DONE]\n\n"

        return StreamingResponse.sse(gen())

    with anyio.fail_after(5):
        async with server_for(events) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/events")
            head = await raw.next_event()
            assert head.status_code == 200
            headers = dict(head.headers)
            assert headers[b"content-type"].startswith(b"text/event-stream")
            assert headers[b"transfer-encoding"] == b"chunked"
            first = await raw.next_event()
            assert first.data == b"data: first\n\n"
            gate.set()
            rest = b""
            while not isinstance(event := await raw.next_event(), h11.EndOfMessage):
                rest += event.data
            assert rest == b"data: second\n\ndata: [DONE]\n\n"
            raw.h11.start_next_cycle()
            await raw.request("GET", "/again")  # keep-alive after a chunked stream
            gate.set()
            assert (await raw.next_event()).status_code == 200
            await raw.aclose()


async def test_client_disconnect_cancels_stream_and_sets_event() -> None:
    seen: dict[str, Any] = {}
    finished = anyio.Event()

    async def forever(request: Request) -> StreamingResponse:
        seen["request"] = request

        async def gen() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: tick\n\n"
                    await anyio.sleep(0.02)
            finally:
                seen["disconnected_in_finally"] = request.is_disconnected()
                finished.set()

        return StreamingResponse.sse(gen())

    with anyio.fail_after(5):
        async with server_for(forever) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/stream")
            await raw.next_event()
            await raw.next_event()
            await raw.aclose()
            with anyio.fail_after(1):
                await finished.wait()
            assert seen["disconnected_in_finally"] is True
            assert seen["request"].disconnected.is_set()
            with anyio.fail_after(1):
                while server.connection_count:
                    await anyio.sleep(0.01)


async def test_client_disconnect_cancels_a_waiting_plain_handler() -> None:
    cancelled = anyio.Event()

    async def slow(request: Request) -> Response:
        try:
            await anyio.sleep(30)
        finally:
            if request.is_disconnected():
                cancelled.set()
        return Response()

    with anyio.fail_after(5):
        async with server_for(slow) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/slow")
            await anyio.sleep(0.05)
            await raw.aclose()
            with anyio.fail_after(1):
                await cancelled.wait()


async def test_client_that_stops_reading_counts_as_disconnected() -> None:
    done = anyio.Event()
    sent = [0]

    async def firehose(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x" * (1 << 20)
                    sent[0] += 1
            finally:
                if request.is_disconnected():
                    done.set()

        return StreamingResponse(gen())

    with anyio.fail_after(5):
        async with server_for(firehose, send_timeout_s=0.3) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/firehose")  # and then never read
            with anyio.fail_after(3):
                await done.wait()
            assert sent[0] < 200  # it stopped because writes stalled, not because it finished


async def test_error_inside_a_stream_cuts_the_connection() -> None:
    async def broken(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            raise RuntimeError("engine died")

        return StreamingResponse.sse(gen())

    with anyio.fail_after(5):
        async with server_for(broken) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/s")
            await raw.next_event()
            assert (await raw.next_event()).data == b"data: one\n\n"
            with pytest.raises(h11.RemoteProtocolError):
                await raw.next_event()  # closed without the terminating chunk


async def test_header_timeout_closes_a_silent_connection() -> None:
    with anyio.fail_after(5):
        async with server_for(_router(), header_timeout_s=0.2) as server:
            raw = await Raw.connect(server)
            start = anyio.current_time()
            assert await raw.closed()
            assert anyio.current_time() - start < 1.5
            # A partial head gets 408 before the close.
            raw = await Raw.connect(server)
            await raw.send(b"GET /hello HTTP/1.1\r\nhost: t\r\n")
            assert (await raw.response())[0] == 408
            assert await raw.closed()


async def test_idle_keep_alive_connection_is_closed() -> None:
    with anyio.fail_after(5):
        async with server_for(_router(), idle_timeout_s=0.2) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/hello")
            assert (await raw.response())[0] == 200
            assert await raw.closed()


async def test_slow_body_times_out_with_408() -> None:
    with anyio.fail_after(5):
        async with server_for(_router(), body_timeout_s=0.2) as server:
            raw = await Raw.connect(server)
            await raw.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nab")
            assert (await raw.response())[0] == 408
            assert await raw.closed()


async def test_connection_cap_rejects_with_503() -> None:
    with anyio.fail_after(5):
        async with server_for(_router(), max_connections=2) as server:
            held = [await Raw.connect(server), await Raw.connect(server)]
            while server.connection_count < 2:
                await anyio.sleep(0.01)
            extra = await Raw.connect(server)
            status, headers, _ = await extra.response()
            assert (status, headers["connection"]) == (503, "close")
            assert await extra.closed()
            # The held connections still work, and a freed slot is usable again.
            await held[0].request("GET", "/hello")
            assert (await held[0].response())[0] == 200
            await held[1].aclose()
            while server.connection_count > 1:
                await anyio.sleep(0.01)
            again = await Raw.connect(server)
            await again.request("GET", "/hello")
            assert (await again.response())[0] == 200
            await again.aclose()
            await held[0].aclose()


async def test_graceful_shutdown_finishes_in_flight_stream() -> None:
    started = anyio.Event()

    async def stream(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            started.set()
            for i in range(5):
                await anyio.sleep(0.05)
                yield f"data: {i}\n\n".encode()

        return StreamingResponse.sse(gen())

    async with _closing_raws():
        with anyio.fail_after(5):
            server = HTTPServer(stream, ServerConfig(**FAST, shutdown_timeout_s=3))
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                idle = await Raw.connect(server)
                while server.connection_count < 1:
                    await anyio.sleep(0.01)
                busy = await Raw.connect(server)
                await busy.request("GET", "/s")
                await started.wait()
                tg.start_soon(server.shutdown)
                assert await idle.closed()  # idle keep-alive connections go at once
                with pytest.raises(OSError, match="connection attempts failed"):
                    await anyio.connect_tcp("127.0.0.1", server.port)  # no longer accepting
                head = await busy.next_event()
                assert head.status_code == 200  # its head went out before the shutdown began
                body = b""
                while not isinstance(event := await busy.next_event(), h11.EndOfMessage):
                    body += event.data
                assert body == b"".join(f"data: {i}\n\n".encode() for i in range(5))
                assert await busy.closed()
            assert server.connection_count == 0


async def test_shutdown_cuts_streams_that_outlive_the_bound() -> None:
    closed = anyio.Event()

    async def endless(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: x\n\n"
                    await anyio.sleep(0.05)
            finally:
                closed.set()

        return StreamingResponse.sse(gen())

    async with _closing_raws():
        with anyio.fail_after(5):
            server = HTTPServer(endless, ServerConfig(**FAST, shutdown_timeout_s=0.3))
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                raw = await Raw.connect(server)
                await raw.request("GET", "/s")
                await raw.next_event()
                start = anyio.current_time()
                await server.shutdown()
                assert 0.25 < anyio.current_time() - start < 2
            assert closed.is_set()
            assert await raw.closed()


async def test_http_1_0_request_is_answered_and_closed() -> None:
    with anyio.fail_after(5):
        async with server_for(_router()) as server:
            raw = await Raw.connect(server)
            await raw.send(b"GET /hello HTTP/1.0\r\n\r\n")
            data = b""
            with anyio.move_on_after(2):
                try:
                    while True:
                        data += await raw.stream.receive()
                except anyio.EndOfStream:
                    pass
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert data.endswith(b"}")


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="header_timeout_s"):
        ServerConfig(header_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        ServerConfig(max_connections=-1)
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)


async def test_port_zero_reports_the_bound_port() -> None:
    server = HTTPServer(_router())
    with pytest.raises(RuntimeError):
        _ = server.port
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            assert port == server.port > 0
            assert server.url == f"http://127.0.0.1:{port}"
            await server.shutdown()


async def test_fuzzed_input_never_breaks_the_server(caplog: pytest.LogCaptureFixture) -> None:
    valid = b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello"
    chunked = (
        b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    rng = random.Random(1234)
    payloads = []
    for _ in range(150):
        base = bytearray(rng.choice([valid, chunked, b"GET /hello HTTP/1.1\r\n\r\n"]))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(base))
            if op == 0:
                base[pos] = rng.randrange(256)
            elif op == 1:
                del base[pos : pos + rng.randint(1, 8)]
            else:
                base[pos:pos] = rng.randbytes(rng.randint(1, 8))
        payloads.append(bytes(base))
    payloads += [rng.randbytes(rng.randint(1, 300)) for _ in range(50)]

    async def hit(server: HTTPServer, payload: bytes) -> None:
        stream = await anyio.connect_tcp("127.0.0.1", server.port)
        async with stream:
            await stream.send(payload)
            with anyio.move_on_after(0.05):
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    await stream.receive()

    with anyio.fail_after(20):
        async with server_for(_router(), header_timeout_s=0.5, body_timeout_s=0.5) as server:
            async with anyio.create_task_group() as tg:
                for payload in payloads:
                    tg.start_soon(hit, server, payload)
            raw = await Raw.connect(server)
            await raw.request("POST", "/echo", b"still alive")
            assert (await raw.response())[2] == b"still alive"
            await raw.aclose()
            while server.connection_count:
                await anyio.sleep(0.02)
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


async def test_handler_returning_garbage_or_bad_headers_does_not_break_the_server() -> None:
    async def handler(request: Request) -> Any:
        if request.path == "/none":
            return None
        if request.path == "/bad-header":
            return Response(200, [("bad header name", "x")], b"")
        return Response(200, [("transfer-encoding", "chunked")], b"abc")

    with anyio.fail_after(5):
        async with server_for(handler) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/none")
            assert (await raw.response())[0] == 500
            await raw.request("GET", "/bad-header")
            assert (await raw.response())[0] == 500
            await raw.request("GET", "/te")
            try:
                status = (await raw.response())[0]
            except h11.RemoteProtocolError:
                status = None  # dropped rather than answered: also acceptable
            assert status in (None, 200)
            raw = await Raw.connect(server)
            await raw.request("GET", "/none")
            assert (await raw.response())[0] == 500


def test_public_surface_imports() -> None:
    import resultity_servers._http as http

    assert sorted(http.__all__) == sorted(set(http.__all__))
    for name in http.__all__:
        assert getattr(http, name) is not None, name
