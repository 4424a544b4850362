"""The HTTP/1.1 server: listener, connection cap, lifecycle and graceful shutdown.

``HTTPServer(handler, config).serve()`` binds, reports the port through ``task_status`` and
serves until ``shutdown()``: it then stops accepting, closes idle keep-alive connections, lets
requests and streams in flight finish for up to ``shutdown_timeout_s`` (their responses carry
``connection: close``), and cancels what is left.

Each accepted connection gets a channel under its ``Connection``: on the asyncio backend an
asyncio Protocol (``ProtocolChannel``: bytes arrive in callbacks, writes go straight to the
transport), on other anyio backends an anyio stream read by a task (``StreamChannel``); both
are in ``_channels.py``, the request/response cycle is in ``_conn.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.abc
import attrs

from ._channels import Channel, ClientGone, ProtocolChannel, StreamChannel
from ._conn import Connection
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
