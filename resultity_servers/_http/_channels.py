"""The byte transports under a ``Connection``: the ``Channel`` interface and its two kinds.

On the asyncio backend a connection is an asyncio Protocol (``ProtocolChannel``: bytes arrive in
callbacks, writes go straight to the transport); on other anyio backends it is an anyio stream
read by a task (``StreamChannel``). Either way the channel pushes what it receives into
``Connection.feed``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

if TYPE_CHECKING:
    from ._conn import Connection

__all__ = ["Channel", "ClientGone", "ProtocolChannel", "StreamChannel"]


class ClientGone(Exception):
    """The peer closed, reset, or stopped reading; nothing more can be sent."""


class Channel(Protocol):
    """The byte transport under one connection (the two kinds are below)."""

    client: tuple[str, int] | None

    def attach(self, connection: Connection) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """Start pushing received bytes into ``connection.feed`` (b"" at EOF); return a reader
        to run as a task if the channel needs one, None if the transport calls back by itself."""

    async def write(self, data: bytes) -> None:
        """Send ``data``; raises ClientGone if the peer is gone. Waits only when the peer
        reads slower than we write."""

    async def write_held(self, data: bytes, delay_s: float = 0.0) -> None:
        """Send ``data`` together with the next ``write`` if that comes before the event
        loop's next turn (or within ``delay_s``), else on its own then (a stream's head goes
        out with its first chunk when that is ready at once, one wake-up of the peer less,
        and is not held longer for a slow one). A channel may also just send it now."""

    def pause_reading(self) -> None:
        """Stop receiving until ``resume_reading`` (a client pipelining too much)."""

    def resume_reading(self) -> None:
        """Receive again after ``pause_reading``."""

    async def close(self, *, linger: bool, abort: bool) -> None:
        """Close: ``linger`` half-closes and drains the peer briefly first (so an error
        response is not destroyed by a reset); ``abort`` drops unsent bytes (a stalled peer)."""


_READ_SIZE = 64 * 1024
_MAX_UNATTACHED = 256 * 1024


class ProtocolChannel(asyncio.Protocol):
    """A connection's transport on the asyncio backend: callbacks feed the Connection."""

    def __init__(self, send_timeout_s: float) -> None:
        self.client: tuple[str, int] | None = None
        self._send_timeout_s = send_timeout_s
        self._transport: asyncio.Transport | None = None
        self._connection: Connection | None = None
        self._pending: list[bytes] | None = []  # received before attach; None once closing
        self._eof = False
        self._lost = False
        self._write_paused = False
        self._held: bytes | None = None  # write_held's data, until the next write or turn
        self._drain: asyncio.Future[None] | None = None
        self._peer_done: asyncio.Future[None] | None = None  # EOF or lost, while lingering
        self._closed: asyncio.Future[None] | None = None

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        address = transport.get_extra_info("peername")
        if isinstance(address, tuple) and len(address) >= 2:
            self.client = (str(address[0]), int(address[1]))

    def data_received(self, data: bytes) -> None:
        if self._connection is not None:
            self._connection.feed(data)
        elif self._pending is not None:
            self._pending.append(data)
            if sum(map(len, self._pending)) > _MAX_UNATTACHED and self._transport is not None:
                self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._peer_gone()
        return True  # keep the transport open: the response may still have to go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._peer_gone()
        for waiter in (self._drain, self._closed):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _peer_gone(self) -> None:
        if not self._eof:
            self._eof = True
            if self._connection is not None:
                self._connection.feed(b"")
        if self._peer_done is not None and not self._peer_done.done():
            self._peer_done.set_result(None)

    # Channel

    def attach(self, connection: Connection) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """Feed ``connection`` from now on (what arrived before first); no reader task."""
        pending, self._pending = self._pending or [], []
        self._connection = connection
        for data in pending:
            connection.feed(data)
        if self._eof:
            connection.feed(b"")
        elif self._transport is not None and pending:
            self._transport.resume_reading()
        return None

    async def write(self, data: bytes) -> None:
        """Write ``data`` (no wait unless the transport's buffer is full); raises ClientGone."""
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise ClientGone
        if self._held is not None:
            data, self._held = self._held + data, None
        transport.write(data)
        if self._write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
            if self._lost:
                raise ClientGone

    async def write_held(self, data: bytes, delay_s: float = 0.0) -> None:
        """Hold ``data`` for the next ``write``, or the loop's next turn (``delay_s`` > 0:
        that long); raises ClientGone."""
        transport = self._transport
        if self._lost or transport is None or transport.is_closing():
            raise ClientGone
        if self._held is None:
            self._held = data
            loop = asyncio.get_running_loop()
            if delay_s > 0:
                loop.call_later(delay_s, self._flush_held)
            else:
                loop.call_soon(self._flush_held)
        else:
            self._held += data

    def _flush_held(self) -> None:
        held, self._held = self._held, None
        transport = self._transport
        if held and not self._lost and transport is not None and not transport.is_closing():
            transport.write(held)  # a full buffer shows up at the next write (pause_writing)

    def pause_reading(self) -> None:
        """Stop reading from the socket."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again."""
        if self._transport is not None:
            self._transport.resume_reading()

    async def close(self, *, linger: bool, abort: bool) -> None:
        """Close the transport (see ``Channel.close``); always closed when this returns."""
        self._connection = None
        self._pending = None
        transport = self._transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        # Set by connection_lost, which may also come while lingering below (a reset).
        self._closed = loop.create_future()
        try:
            if abort or self._lost:
                return
            self._flush_held()  # before the EOF or the close below
            if linger and transport.can_write_eof():
                with anyio.move_on_after(0.5, shield=True):
                    try:
                        transport.write_eof()  # after what is buffered
                    except OSError:
                        return  # not connected any more: abort below
                    if not self._eof:
                        transport.resume_reading()  # what the peer still sends is discarded
                        self._peer_done = loop.create_future()
                        await self._peer_done
            if self._lost:
                return
            # close() sends what is still buffered first; a peer that reads nothing gets
            # the send timeout, then the abort below.
            transport.close()
            with anyio.move_on_after(self._send_timeout_s):
                await self._closed
        finally:
            if not self._lost:
                transport.abort()


class StreamChannel:
    """A connection's transport on other anyio backends: an anyio stream and a reader task."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._connection: Connection | None = None
        self._space: anyio.Event | None = None
        try:
            address = stream.extra(anyio.abc.SocketAttribute.remote_address)
            self.client = (str(address[0]), int(address[1])) if isinstance(address, tuple) else None
        except (anyio.TypedAttributeLookupError, IndexError):
            self.client = None

    def attach(self, connection: Connection) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """Return the reader task that feeds ``connection``."""
        self._connection = connection
        return self._read

    async def _read(self) -> None:
        assert self._connection is not None
        while True:
            if self._space is not None:
                await self._space.wait()
                continue
            try:
                data = await self.stream.receive(_READ_SIZE)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                data = b""
            self._connection.feed(data)
            if not data:
                return

    async def write(self, data: bytes) -> None:
        """Send ``data``; raises ClientGone if the peer is gone."""
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ClientGone from exc

    async def write_held(self, data: bytes, delay_s: float = 0.0) -> None:
        """Send ``data`` now (anyio streams have no loop turn to wait for)."""
        await self.write(data)

    def pause_reading(self) -> None:
        """Make the reader wait for ``resume_reading``."""
        if self._space is None:
            self._space = anyio.Event()

    def resume_reading(self) -> None:
        """Let the reader go on."""
        space, self._space = self._space, None
        if space is not None:
            space.set()

    async def close(self, *, linger: bool, abort: bool) -> None:
        """Close the stream (lingering: half-close and drain for up to 0.5 s first)."""
        if linger and not abort:
            with anyio.move_on_after(0.5, shield=True):
                try:
                    await self.stream.send_eof()
                    drained = 0
                    while drained < 1 << 20:
                        drained += len(await self.stream.receive(_READ_SIZE))
                except (
                    anyio.EndOfStream,
                    anyio.BrokenResourceError,
                    anyio.ClosedResourceError,
                    OSError,
                ):
                    pass
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()
