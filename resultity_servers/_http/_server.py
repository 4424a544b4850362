"""The HTTP/1.1 server: listener, connection cap, lifecycle and graceful shutdown.

``HTTPServer(handler, config).serve()`` binds, reports the port through ``task_status`` and
serves until ``shutdown()``: it then stops accepting, closes idle keep-alive connections, lets
requests and streams in flight finish for up to ``shutdown_timeout_s`` (their responses carry
``connection: close``), and cancels what is left.

Each accepted connection gets a channel under its ``Connection``: on the asyncio backend an
asyncio Protocol (``ProtocolChannel``: bytes arrive in callbacks, writes go straight to the
transport), on other anyio backends an anyio stream read by a task (``StreamChannel``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.abc
import attrs

from ._conn import Channel, ClientGone, Connection
from ._types import ErrorResponder, Handler, json_error_response

__all__ = ["HTTPServer", "ServerConfig", "running_server"]

log = logging.getLogger("resultity.http")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be finite, got {value!r}")


@attrs.frozen
class ServerConfig:
    """Limits and timeouts of one server (seconds; sizes in bytes).

    ``header_timeout_s``: a new connection must deliver a complete request head within this
    time, as must a keep-alive connection once the next request's first byte arrived.
    ``idle_timeout_s``: how long a keep-alive connection may wait for its next request.
    ``body_timeout_s``: the whole request body must arrive within this time (slow clients).
    ``send_timeout_s``: a client that accepts no bytes for this long counts as disconnected.
    ``max_connections``: beyond it, new connections get 503 and are closed.
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=0,
        validator=attrs.validators.and_(
            attrs.validators.instance_of(int), attrs.validators.ge(0), attrs.validators.le(65535)
        ),
    )
    max_body_bytes: int = attrs.field(default=8 << 20, validator=_positive)
    max_header_bytes: int = attrs.field(default=64 << 10, validator=_positive)
    header_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    idle_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    body_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    send_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    max_connections: int = attrs.field(default=1000, validator=_positive)
    shutdown_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    error_response: ErrorResponder = json_error_response


class HTTPServer:
    """Serve ``handler`` (a Router or any ``async (Request) -> response`` callable)."""

    # Connections are asyncio Protocols on the asyncio backend, anyio streams on others; tests
    # set this False to run the anyio stream path on asyncio too.
    _asyncio_protocol = True

    def __init__(self, handler: Handler, config: ServerConfig | None = None) -> None:
        self.handler = handler
        self.config = config or ServerConfig()
        self._port: int | None = None
        self._connections: set[Connection] = set()
        self._rejecting = 0
        self._shutdown_requested = anyio.Event()
        self._all_closed = anyio.Event()
        self._all_closed.set()
        self._finished = anyio.Event()
        self.shutting_down = False

    @property
    def port(self) -> int:
        """Return the bound port (useful with ``port=0``); raises RuntimeError before binding."""
        if self._port is None:
            raise RuntimeError("the server is not listening yet")
        return self._port

    @property
    def url(self) -> str:
        """Return ``http://host:port`` of the listening socket."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def connection_count(self) -> int:
        """Return the number of open (accepted, not rejected) connections."""
        return len(self._connections)

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind and serve until shutdown; ``task_status.started(port)`` once listening.

        Raises OSError if the address cannot be bound.
        """
        listener = await anyio.create_tcp_listener(
            local_host=self.config.host, local_port=self.config.port
        )
        socket_listeners = [
            sub for sub in listener.listeners if isinstance(sub, anyio.abc.SocketListener)
        ]
        self._port = int(socket_listeners[0].extra(anyio.abc.SocketAttribute.local_port))
        try:
            async with anyio.create_task_group() as conn_tg:
                conn_tg.start_soon(self._watchdog)
                async with anyio.create_task_group() as accept_tg:
                    for sub in socket_listeners:
                        accept_tg.start_soon(self._accept_loop, sub, conn_tg)
                    task_status.started(self._port)
                    await self._shutdown_requested.wait()
                    accept_tg.cancel_scope.cancel()
                await listener.aclose()
                self.shutting_down = True
                for connection in list(self._connections):
                    connection.close_if_idle()
                with anyio.move_on_after(self.config.shutdown_timeout_s):
                    await self._all_closed.wait()
                conn_tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self._finished.set()

    def request_shutdown(self) -> None:
        """Start a graceful shutdown without waiting for it (safe to call more than once)."""
        self._shutdown_requested.set()

    async def shutdown(self) -> None:
        """Shut down gracefully and return when ``serve`` has finished."""
        self.request_shutdown()
        await self._finished.wait()

    async def _accept_loop(
        self, listener: anyio.abc.SocketListener, conn_tg: anyio.abc.TaskGroup
    ) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # another anyio backend: anyio's streams
        if not self._asyncio_protocol:
            loop = None
        raw = listener.extra(anyio.abc.SocketAttribute.raw_socket)
        while True:
            try:
                if loop is not None:
                    channel: Channel = await self._accept_protocol(loop, raw)
                else:
                    channel = StreamChannel(await listener.accept())
            except OSError as exc:
                # Out of file descriptors and the like: back off instead of dying.
                log.warning("accept failed: %s", exc)
                await anyio.sleep(0.05)
                continue
            if len(self._connections) >= self.config.max_connections:
                if self._rejecting >= 64:
                    conn_tg.start_soon(functools.partial(channel.close, linger=False, abort=True))
                else:
                    self._rejecting += 1
                    conn_tg.start_soon(self._reject, channel)
                continue
            connection = Connection(self, channel)
            self._connections.add(connection)
            self._all_closed = anyio.Event()
            conn_tg.start_soon(self._run_connection, connection)

    async def _accept_protocol(
        self, loop: asyncio.AbstractEventLoop, raw: socket.socket
    ) -> ProtocolChannel:
        # On asyncio a connection is an asyncio Protocol: received bytes go straight to its
        # parser and responses straight to the transport, without a task switch per read and a
        # loop round trip per write as anyio's stream adds.
        try:
            client, _ = await loop.sock_accept(raw)
        except asyncio.CancelledError:
            # sock_accept may leave the listener registered when cancelled (bpo-41317).
            with suppress(ValueError, NotImplementedError):
                loop.remove_reader(raw)
            raise
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            send_timeout = self.config.send_timeout_s
            _, protocol = await loop.connect_accepted_socket(
                lambda: ProtocolChannel(send_timeout), client
            )
        except BaseException:
            client.close()
            raise
        return protocol

    async def _watchdog(self) -> None:
        # Applies every connection's read and send deadlines, a few times per shortest
        # timeout: a timeout fires at most a quarter of the shortest one (and 1 s) late.
        config = self.config
        shortest = min(config.header_timeout_s, config.idle_timeout_s, config.body_timeout_s,
                       config.send_timeout_s)
        interval = min(1.0, max(0.01, shortest / 4))
        while True:
            await anyio.sleep(interval)
            now = time.monotonic()
            for connection in list(self._connections):
                connection.check_deadlines(now)

    async def _run_connection(self, connection: Connection) -> None:
        try:
            await connection.run()
        except Exception:
            # Last line of defence: one broken connection never takes the server down.
            log.exception("unexpected error on an HTTP connection")
        finally:
            self._connections.discard(connection)
            if not self._connections:
                self._all_closed.set()

    async def _reject(self, channel: Channel) -> None:
        try:
            response = self.config.error_response(503, "server is at its connection limit")
            head = [b"HTTP/1.1 503 Service Unavailable\r\n"]
            headers = (
                *response.headers,
                ("content-length", str(len(response.body))),
                ("connection", "close"),
                ("retry-after", "1"),
            )
            head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
            with anyio.move_on_after(1.0):
                await channel.write(b"".join(head) + b"\r\n" + response.body)
        except ClientGone:
            pass
        finally:
            self._rejecting -= 1
            await channel.close(linger=True, abort=False)

    @property
    def error_response(self) -> ErrorResponder:
        """Return the builder of layer-generated error responses."""
        return self.config.error_response


@asynccontextmanager
async def running_server(
    handler: Handler, config: ServerConfig | None = None
) -> AsyncIterator[HTTPServer]:
    """Run a server in the background for the body of an ``async with``; shut down on exit."""
    server = HTTPServer(handler, config)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        try:
            yield server
        finally:
            await server.shutdown()


# --- channels: the byte transports under a Connection ---------------------------------------

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
        transport.write(data)
        if self._write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
            if self._lost:
                raise ClientGone

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
