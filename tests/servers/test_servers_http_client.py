"""The httpcore-based client against our own server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from resultity_core import encode_event
from resultity_servers._http import (
    HTTPClient,
    HTTPConnectError,
    HTTPProtocolError,
    HTTPStatusError,
    HTTPTimeoutError,
    Request,
    Response,
    Router,
    ServerConfig,
    StreamingResponse,
    running_server,
)

pytestmark = pytest.mark.anyio


def _router(state: dict[str, Any]) -> Router:
    router = Router()

    @router.route("POST", "/json")
    async def echo_json(request: Request) -> Response:
        state.setdefault("ports", []).append(request.client[1])
        return Response.json(
            {
                "got": request.json(),
                "auth": request.header("authorization"),
                "type": request.header("content-type"),
            }
        )

    @router.route("GET", "/teapot")
    async def teapot(request: Request) -> Response:
        return Response.json({"error": {"message": "short and stout"}}, status=418)

    @router.route("GET", "/pause")
    async def pause(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            await anyio.sleep(0.4)  # longer than the client's default timeout in the test
            yield b"data: late\n\n"

        return StreamingResponse.sse(gen())

    @router.route("GET", "/slow")
    async def slow(request: Request) -> Response:
        await anyio.sleep(5)
        return Response()

    @router.route("GET", "/sse")
    async def sse(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            yield encode_event({"n": 1})
            # One event split across two chunks, and two events in one chunk.
            data = encode_event("line one\nline two", event="note")
            yield data[:7]
            await anyio.sleep(0.01)
            yield data[7:] + encode_event({"n": 2})
            yield b"data: [DONE]\n\n"

        return StreamingResponse.sse(gen())

    @router.route("GET", "/endless")
    async def endless(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: tick\n\n"
                    await anyio.sleep(0.01)
            finally:
                state["stream_closed"] = request.is_disconnected()

        return StreamingResponse.sse(gen())

    @router.route("GET", "/truncated")
    async def truncated(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            yield b"data: partial\n\n"
            raise RuntimeError("engine died")

        return StreamingResponse.sse(gen())

    return router


async def test_json_round_trip_keeps_the_connection_alive() -> None:
    state: dict[str, Any] = {}
    with anyio.fail_after(5):
        async with (
            running_server(_router(state)) as server,
            HTTPClient(server.url, headers={"Authorization": "Bearer k"}) as client,
        ):
            first = await client.post_json("/json", {"a": [1, "é"]})
            second = await client.post_json("/json", {"b": None})
    assert first == {"got": {"a": [1, "é"]}, "auth": "Bearer k", "type": "application/json"}
    assert second["got"] == {"b": None}
    assert state["ports"][0] == state["ports"][1]  # one pooled keep-alive connection


async def test_status_errors_and_raw_responses() -> None:
    with anyio.fail_after(5):
        async with running_server(_router({})) as server, HTTPClient(server.url) as client:
            response = await client.request("GET", "/teapot")
            assert response.status == 418
            assert response.header("Content-Type") == "application/json"
            assert response.json() == {"error": {"message": "short and stout"}}
            with pytest.raises(HTTPStatusError) as info:
                await client.get_json("/teapot")
            assert info.value.status == 418
            assert b"short and stout" in info.value.body
            missing = await client.request("GET", "/missing")
            assert missing.status == 404
            with pytest.raises(ValueError, match="not both"):
                await client.request("POST", "/json", json={}, content=b"{}")


async def test_streamed_sse_events_decode_across_chunks() -> None:
    with anyio.fail_after(5):
        async with running_server(_router({})) as server, HTTPClient(server.url) as client:
            async with client.stream("GET", "/sse") as response:
                assert response.raise_for_status().status == 200
                assert (response.header("content-type") or "").startswith("text/event-stream")
                events = [event async for event in response.aiter_sse()]
            assert [e.data for e in events] == [
                '{"n":1}',
                "line one\nline two",
                '{"n":2}',
                "[DONE]",
            ]
            assert events[1].event == "note"
            assert events[0].json() == {"n": 1}
            async with client.stream("GET", "/sse") as response:
                lines = [line async for line in response.aiter_lines()]
            assert lines[:2] == [b'data: {"n":1}', b""]


async def test_leaving_a_stream_early_is_seen_as_a_disconnect() -> None:
    state: dict[str, Any] = {}
    with anyio.fail_after(5):
        async with running_server(_router(state)) as server, HTTPClient(server.url) as client:
            async with client.stream("GET", "/endless") as response:
                async for event in response.aiter_sse():
                    assert event.data == "tick"
                    break
            with anyio.fail_after(1):
                while "stream_closed" not in state:
                    await anyio.sleep(0.01)
    assert state["stream_closed"] is True


async def test_truncated_stream_raises_protocol_error() -> None:
    with anyio.fail_after(5):
        async with (
            running_server(_router({})) as server,
            HTTPClient(server.url) as client,
            client.stream("GET", "/truncated") as response,
        ):
            with pytest.raises(HTTPProtocolError):
                await response.aread()


async def test_read_timeout_and_connect_errors_are_ours() -> None:
    with anyio.fail_after(5):
        async with running_server(_router({})) as server:
            async with HTTPClient(server.url, timeout_s=0.2) as client:
                with pytest.raises(HTTPTimeoutError) as info:
                    await client.request("GET", "/slow")
                assert info.value.url.endswith("/slow")
                async with client.stream("GET", "/pause", timeout_s=None) as response:
                    assert [e.data async for e in response.aiter_sse()] == ["late"]
                with pytest.raises(HTTPTimeoutError):
                    await client.request("GET", "/slow", timeout_s=0.05)
            port = server.port
        async with HTTPClient(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(HTTPConnectError, match="cannot connect"):
                await client.request("GET", "/json")


async def test_server_413_reaches_the_client() -> None:
    with anyio.fail_after(5):
        config = ServerConfig(max_body_bytes=16)
        async with running_server(_router({}), config) as server, HTTPClient(server.url) as c:
            response = await c.request("POST", "/json", json={"x": "y" * 100})
            assert response.status == 413
            assert response.json()["error"]["type"] == "invalid_request_error"
