"""A streamed response's head goes out with its first chunk when that is ready at once.

The peer then wakes once for both instead of once for the head and again for the chunk; a
head whose first chunk is slow is not held back for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import h11
import pytest
from test_servers_http import Raw, server_for

from resultity_servers._http import Request, StreamingResponse
from resultity_servers._http._channels import ProtocolChannel

pytestmark = pytest.mark.anyio


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _channel() -> tuple[ProtocolChannel, _Transport]:
    channel = ProtocolChannel(send_timeout_s=1.0)
    transport = _Transport()
    channel.connection_made(transport)
    return channel, transport


async def test_held_data_goes_with_the_next_write_of_the_same_turn() -> None:
    channel, transport = _channel()
    await channel.write_held(b"HEAD")
    assert transport.writes == []
    await channel.write(b"chunk")
    assert transport.writes == [b"HEADchunk"]
    await asyncio.sleep(0)  # the flush at the next turn finds nothing left
    assert transport.writes == [b"HEADchunk"]


async def test_held_data_goes_alone_at_the_next_turn() -> None:
    channel, transport = _channel()
    await channel.write_held(b"HEAD")
    await asyncio.sleep(0)
    assert transport.writes == [b"HEAD"]
    await channel.write(b"chunk")
    assert transport.writes == [b"HEAD", b"chunk"]


async def test_held_data_may_wait_for_a_set_delay() -> None:
    channel, transport = _channel()
    await channel.write_held(b"HEAD", 0.05)
    await asyncio.sleep(0.01)
    assert transport.writes == []  # not at the next turn: within the delay
    await asyncio.sleep(0.1)
    assert transport.writes == [b"HEAD"]  # not longer than the delay
    await channel.write_held(b"HEAD2", 0.05)
    await channel.write(b"chunk")
    assert transport.writes == [b"HEAD", b"HEAD2chunk"]


async def test_close_sends_held_data_first() -> None:
    channel, transport = _channel()
    await channel.write_held(b"HEAD")
    task = asyncio.ensure_future(channel.close(linger=False, abort=False))
    await asyncio.sleep(0)
    channel.connection_lost(None)
    await task
    assert transport.writes == [b"HEAD"]


async def test_server_sends_head_and_ready_first_chunk_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []
    made = ProtocolChannel.connection_made

    def spy(self: ProtocolChannel, transport: asyncio.BaseTransport) -> None:
        made(self, transport)
        assert isinstance(transport, asyncio.Transport)
        original = transport.write

        def write(data: Any) -> None:
            writes.append(bytes(data))
            original(data)

        transport.write = write  # type: ignore[method-assign]

    monkeypatch.setattr(ProtocolChannel, "connection_made", spy)
    gate = anyio.Event()

    async def ready(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            if request.path == "/slow":
                await gate.wait()
            yield b"data: first\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse.sse(gen())

    with anyio.fail_after(5):
        async with server_for(ready) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/ready")
            assert (await raw.next_event()).status_code == 200
            assert (await raw.next_event()).data == b"data: first\n\n"
            assert len(writes) >= 2
            assert writes[0].startswith(b"HTTP/1.1 200 ")
            assert writes[0].endswith(b"\r\n\r\nd\r\ndata: first\n\n\r\n")  # head + chunk
            while not isinstance(await raw.next_event(), h11.EndOfMessage):
                pass
            # A first chunk that is not ready: the head goes out without waiting for it.
            raw.h11.start_next_cycle()
            await raw.request("GET", "/slow")
            assert (await raw.next_event()).status_code == 200
            gate.set()
            assert (await raw.next_event()).data == b"data: first\n\n"
            await raw.aclose()


async def test_a_held_head_waits_for_a_first_chunk_within_hold_head_s() -> None:
    gate = anyio.Event()

    async def held(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            await gate.wait()
            yield b"data: first\n\n"

        return StreamingResponse.sse(gen(), hold_head_s=float(request.query or "0"))

    with anyio.fail_after(5):
        async with server_for(held) as server:
            raw = await Raw.connect(server)
            await raw.request("GET", "/?0.05")
            with anyio.move_on_after(0.02) as early:
                await raw.next_event()
            assert early.cancelled_caught  # nothing yet: the head waits for the chunk
            started = anyio.current_time()
            assert (await raw.next_event()).status_code == 200  # then comes alone
            assert anyio.current_time() - started < 1.0
            gate.set()
            assert (await raw.next_event()).data == b"data: first\n\n"
            await raw.aclose()
