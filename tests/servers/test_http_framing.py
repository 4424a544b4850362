"""Response framing of the HTTP server, checked on the raw bytes, on both channel kinds.

The server frames responses itself (h11 only parses requests): content-length for complete
bodies, chunked streams for HTTP/1.1, close-delimited streams for HTTP/1.0, no body for HEAD and
204, one ``connection: close`` when either side ends the connection, handler headers validated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

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


@pytest.fixture(params=["protocol", "stream"], autouse=True)
def channel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(HTTPServer, "_asyncio_protocol", request.param == "protocol")
    return request.param


BIG = bytes(range(256)) * (16 << 10)  # 4 MiB


def _router() -> Router:
    router = Router()

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"hello", b"", b" ", b"world" * 100):
            yield part

    @router.route("GET", "/stream")
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(parts(), headers={"content-type": "text/plain"})

    @router.route("GET", "/empty")
    async def empty(request: Request) -> Response:
        return Response(204)

    @router.route("GET", "/hello")
    async def hello(request: Request) -> Response:
        return Response.text("hi", headers={"content-length": "999", "x-n": "1"})

    @router.route("GET", "/bye")
    async def bye(request: Request) -> Response:
        return Response.text("bye", headers={"connection": "close"})

    @router.route("GET", "/non-ascii")
    async def non_ascii(request: Request) -> Response:
        return Response.text("x", headers={"x-name": "caf\u00e9"})

    @router.route("GET", "/injection")
    async def injection(request: Request) -> Response:
        return Response.text("x", headers={"x-a": "1\r\nset-cookie: evil=1"})

    @router.route("GET", "/status")
    async def status(request: Request) -> Response:
        code = request.query
        if code == "enum":
            return Response(HTTPStatus.CREATED, (), b"made")
        return Response(int(code) if code.isdigit() else code, (), b"")  # type: ignore[arg-type]

    @router.route("GET", "/big")
    async def big(request: Request) -> Response:
        return Response(200, (), BIG)

    return router


@asynccontextmanager
async def _serve() -> AsyncIterator[tuple[HTTPServer, anyio.abc.SocketStream]]:
    with anyio.fail_after(10):
        async with running_server(_router(), ServerConfig(idle_timeout_s=5)) as server:
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                yield server, stream


async def _read_to_eof(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    try:
        while True:
            data += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return data


async def _responses(
    stream: anyio.abc.SocketStream, count: int, methods: tuple[str, ...] = ()
) -> list[tuple[h11.Response, bytes]]:
    """Read ``count`` responses (to GETs, or to ``methods``) with a client-side h11 parser."""
    conn = h11.Connection(h11.CLIENT)
    out = []
    for i in range(count):
        method = methods[i] if methods else "GET"
        conn.send(h11.Request(method=method, target="/", headers=[("host", "t")]))
        conn.send(h11.EndOfMessage())
        head, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive())
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert head is not None
        out.append((head, body))
        conn.start_next_cycle()
    return out


async def test_chunked_stream_bytes_are_exact_and_keep_alive_holds() -> None:
    async with _serve() as (_, stream):
        await stream.send(b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += await stream.receive()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\ntransfer-encoding: chunked" in head
        assert b"content-length" not in head
        assert b"connection" not in head
        # Empty chunks are skipped; each non-empty one is framed in hex.
        assert body == b"5\r\nhello\r\n1\r\n \r\n1f4\r\n" + b"world" * 100 + b"\r\n0\r\n\r\n"
        await stream.send(b"GET /empty HTTP/1.1\r\nhost: t\r\n\r\n")
        ((head204, body204),) = await _responses(stream, 1)
        assert head204.status_code == 204
        assert body204 == b""


async def test_http_1_0_stream_is_close_delimited() -> None:
    async with _serve() as (_, stream):
        await stream.send(b"GET /stream HTTP/1.0\r\n\r\n")
        data = await _read_to_eof(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 ok"
    assert b"connection: close" in lines
    framing = (b"transfer-encoding", b"content-length")
    assert not [line for line in lines if line.startswith(framing)]
    assert body == b"hello " + b"world" * 100  # no chunk framing: the close ends the body


async def test_head_of_a_stream_and_of_a_fixed_response_carry_no_body() -> None:
    async with _serve() as (_, stream):
        await stream.send(
            b"HEAD /stream HTTP/1.1\r\nhost: t\r\n\r\n"
            b"HEAD /hello HTTP/1.1\r\nhost: t\r\n\r\n"
            b"GET /hello HTTP/1.1\r\nhost: t\r\n\r\n"
        )
        (s_head, s_body), (h_head, h_body), (g_head, g_body) = await _responses(
            stream, 3, ("HEAD", "HEAD", "GET")
        )
    assert (s_head.status_code, s_body) == (200, b"")
    assert dict(s_head.headers)[b"transfer-encoding"] == b"chunked"
    assert (h_head.status_code, h_body) == (200, b"")
    assert dict(h_head.headers)[b"content-length"] == b"2"
    assert (g_head.status_code, g_body) == (200, b"hi")


async def test_content_length_is_the_servers_and_close_is_sent_once() -> None:
    async with _serve() as (_, stream):
        await stream.send(b"GET /hello HTTP/1.1\r\nhost: t\r\n\r\n")
        ((head, body),) = await _responses(stream, 1)
        names = [name for name, _ in head.headers]
        assert body == b"hi"
        assert names.count(b"content-length") == 1
        assert dict(head.headers)[b"content-length"] == b"2"  # the handler's 999 is dropped
        assert dict(head.headers)[b"x-n"] == b"1"
        assert b"date" in names
        # The handler asks to close: one ``connection: close`` and the server closes.
        await stream.send(b"GET /bye HTTP/1.1\r\nhost: t\r\n\r\n")
        data = await _read_to_eof(stream)
    assert data.lower().count(b"connection: close") == 1
    assert data.endswith(b"\r\n\r\nbye")


async def test_client_connection_close_is_honoured() -> None:
    async with _serve() as (_, stream):
        await stream.send(b"GET /hello HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        data = await _read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"hi")
    assert b"\r\nconnection: close\r\n" in data


@pytest.mark.parametrize("path", ["/non-ascii", "/injection"])
async def test_invalid_handler_headers_become_500_and_nothing_is_injected(path: str) -> None:
    async with _serve() as (_, stream):
        await stream.send(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        await stream.send(b"GET /hello HTTP/1.1\r\nhost: t\r\n\r\n")
        (bad, bad_body), (good, good_body) = await _responses(stream, 2)
    assert bad.status_code == 500
    assert b"internal server error" in bad_body
    assert b"set-cookie" not in [name for name, _ in bad.headers]
    assert (good.status_code, good_body) == (200, b"hi")  # the connection was kept


async def test_deep_pipelining_is_answered_in_order_while_read_slowly() -> None:
    # More than the server buffers for a busy connection (256 KiB): it stops reading and
    # resumes as it answers, losing nothing.
    count = 1500
    pad = "p" * 200
    requests = b"".join(f"GET /hello?n={i} HTTP/1.1\r\nhost: t\r\nx-pad: {pad}\r\n\r\n".encode()
                        for i in range(count))
    assert len(requests) > 300 << 10
    async with _serve() as (_, stream):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.send, requests)
            await anyio.sleep(0.2)  # let the server fill its buffer and pause
            responses = await _responses(stream, count)
    assert len(responses) == count
    assert all(head.status_code == 200 and body == b"hi" for head, body in responses)


async def test_a_large_body_to_a_slow_reader_arrives_whole() -> None:
    async with _serve() as (_, stream):
        await stream.send(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
        await anyio.sleep(0.3)  # the server's writes back up meanwhile
        ((head, body),) = await _responses(stream, 1)
        assert head.status_code == 200
        assert body == BIG
        await stream.send(b"GET /hello HTTP/1.1\r\nhost: t\r\n\r\n")
        ((head, body),) = await _responses(stream, 1)
        assert body == b"hi"


async def test_a_layer_error_to_a_head_request_has_no_body() -> None:
    async with _serve() as (_, stream):
        await stream.send(b"HEAD /hello HTTP/1.1\r\nhost: t\r\ncontent-length: 999999999\r\n\r\n")
        data = await _read_to_eof(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"\r\nconnection: close" in head
    assert body == b""


async def test_a_peer_that_resets_while_the_server_lingers_is_let_go() -> None:
    # A bad request gets a 400, then the server half-closes and lingers for the peer's EOF;
    # a peer that closes with the 400 unread sends a reset instead, and that ends it too.
    with anyio.fail_after(10):
        async with running_server(_router(), ServerConfig(send_timeout_s=30)) as server:
            for _ in range(3):
                stream = await anyio.connect_tcp("127.0.0.1", server.port)
                await stream.send(b"NOT HTTP\r\n\r\n")
                await anyio.sleep(0.1)  # the 400 arrives unread
                await stream.aclose()
            with anyio.fail_after(3):
                while server.connection_count:
                    await anyio.sleep(0.02)


async def test_status_codes_are_checked_and_http_status_members_accepted() -> None:
    async with _serve() as (_, stream):
        await stream.send(
            b"GET /status?enum HTTP/1.1\r\nhost: t\r\n\r\n"
            b"GET /status?150 HTTP/1.1\r\nhost: t\r\n\r\n"
            b"GET /status?x HTTP/1.1\r\nhost: t\r\n\r\n"
            b"GET /status?599 HTTP/1.1\r\nhost: t\r\n\r\n"
        )
        responses = await _responses(stream, 4)
    assert [(head.status_code, body) for head, body in responses[:1]] == [(201, b"made")]
    assert responses[0][0].reason == b"Created"
    assert [head.status_code for head, _ in responses[1:]] == [500, 500, 599]
