"""The HTTP server's anyio-stream channel (used off asyncio), run through the same tests.

On asyncio the server drives each connection from an asyncio Protocol; on other anyio backends
from an anyio stream with a reader task. The behaviour tests of ``test_servers_http`` run here
again with the stream channel forced, so both transports keep the same behaviour.
"""

from __future__ import annotations

import pytest
from test_servers_http import (  # noqa: F401 - collected again here, on the stream channel
    test_body_over_the_limit_gets_413_declared_or_chunked,
    test_chunked_upload_arrives_whole,
    test_client_disconnect_cancels_a_waiting_plain_handler,
    test_client_disconnect_cancels_stream_and_sets_event,
    test_client_that_stops_reading_counts_as_disconnected,
    test_connection_cap_rejects_with_503,
    test_error_inside_a_stream_cuts_the_connection,
    test_expect_100_continue_gets_an_interim_response,
    test_graceful_shutdown_finishes_in_flight_stream,
    test_handler_returning_garbage_or_bad_headers_does_not_break_the_server,
    test_header_timeout_closes_a_silent_connection,
    test_http_1_0_request_is_answered_and_closed,
    test_idle_keep_alive_connection_is_closed,
    test_keep_alive_serves_two_requests_on_one_connection,
    test_malformed_http_gets_400_closes_and_server_lives,
    test_pipelined_requests_are_answered_in_order,
    test_shutdown_cuts_streams_that_outlive_the_bound,
    test_slow_body_times_out_with_408,
    test_sse_stream_delivers_events_as_they_are_produced,
)

from resultity_servers._http import HTTPServer

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _stream_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HTTPServer, "_asyncio_protocol", False)


async def test_the_stream_channel_is_the_one_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    from resultity_servers._http import Request, Response, running_server
    from resultity_servers._http._channels import StreamChannel

    seen: list[str] = []

    async def handler(request: Request) -> Response:
        return Response.text("ok")

    original = StreamChannel.__init__

    def spy(self: StreamChannel, stream: object) -> None:
        seen.append(type(stream).__name__)
        original(self, stream)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamChannel, "__init__", spy)
    with anyio.fail_after(5):
        async with running_server(handler) as server:
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                await stream.send(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
                data = b""
                while not data.endswith(b"ok"):
                    data += await stream.receive()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(seen) == 1
