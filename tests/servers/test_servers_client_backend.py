"""The HTTP client's connection wrapper: one send per request, stale pooled connections."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from resultity_servers._http import HTTPClient

pytestmark = pytest.mark.anyio


_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"


async def _raw_server(
    handle: object, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handle)  # type: ignore[arg-type]


async def test_a_post_leaves_in_one_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpcore writes a request's head and body separately; the wrapper sends them together.
    import httpcore._backends.anyio as backend

    writes: list[bytes] = []
    write = backend.AnyIOStream.write

    async def recording(self: object, buffer: bytes, timeout: float | None = None) -> None:
        writes.append(buffer)
        await write(self, buffer, timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(backend.AnyIOStream, "write", recording)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            for _ in range(2):
                await stream.receive()
                await stream.send(_ANSWER)

    async with anyio.create_task_group() as tg:
        port = await tg.start(_raw_server, handle)
        async with HTTPClient(f"http://127.0.0.1:{port}") as client:
            for payload in ({"a": 1}, {"b": "x" * 1000}):
                response = await client.request("POST", "/p", json=payload)
                assert response.status == 200
        tg.cancel_scope.cancel()
    assert len(writes) == 2
    for data, body in zip(writes, (b'{"a":1}', b'{"b":"' + b"x" * 1000 + b'"}'), strict=True):
        assert data.startswith(b"POST /p HTTP/1.1\r\n")
        assert data.endswith(b"\r\n\r\n" + body)


async def test_a_connection_the_server_closed_is_not_reused() -> None:
    # The server answers one request per connection and then closes it while the client
    # keeps it pooled: the next request must notice (readable at EOF) and reconnect.
    connections = 0

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            await stream.receive()
            await stream.send(_ANSWER)

    async with anyio.create_task_group() as tg:
        port = await tg.start(_raw_server, handle)
        async with HTTPClient(f"http://127.0.0.1:{port}") as client:
            for _ in range(3):
                assert (await client.request("GET", "/")).status == 200
                await anyio.sleep(0.05)  # the server's close reaches the client
        tg.cancel_scope.cancel()
    assert connections == 3


async def test_the_reuse_check_polls_the_socket_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpcore asks "is_readable" before every reuse of a pooled connection; the wrapper
    # answers from the descriptor (on asyncio a TransportSocket), not through anyio's extra().
    import httpcore._backends.anyio as backend

    asked: list[str] = []
    original = backend.AnyIOStream.get_extra_info

    def recording(self: object, info: str) -> object:
        asked.append(info)
        return original(self, info)  # type: ignore[arg-type]

    monkeypatch.setattr(backend.AnyIOStream, "get_extra_info", recording)
    connections = 0

    async def handle(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            while True:
                try:
                    await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                await stream.send(_ANSWER)

    async with anyio.create_task_group() as tg:
        port = await tg.start(_raw_server, handle)
        async with HTTPClient(f"http://127.0.0.1:{port}") as client:
            for _ in range(4):
                assert (await client.request("GET", "/")).status == 200
        tg.cancel_scope.cancel()
    assert connections == 1  # reused
    assert "is_readable" not in asked
