"""One server-side HTTP/1.1 connection: h11 parses its requests, ``_framing`` frames responses.

The bytes come from a ``Channel`` (the interface and its two kinds are in ``_channels.py``): an
asyncio Protocol on the asyncio backend, an anyio stream with a reader task elsewhere. Either
way the channel pushes what it receives into ``Connection.feed``, so a client that goes away is
noticed at once (the handler is cancelled) without a task per request.

h11 validates every request, with a new h11 state machine per request/response cycle;
responses are serialized by ``ResponseWriter`` (``_framing.py``), not sent through h11.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import anyio
import h11

from ._channels import Channel, ClientGone
from ._framing import BadResponse, ResponseWriter
from ._types import Request, Response, StreamingResponse

if TYPE_CHECKING:
    from ._server import HTTPServer

__all__ = ["Connection"]

log = logging.getLogger("resultity.http")

# Bytes a client may pipeline while its previous request is still being answered.
_MAX_PIPELINED = 256 * 1024


class _Close(Exception):
    """End this connection now (after any error response was sent)."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status if status in (400, 431) else 400
        self.message = message


class _Status(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Connection:
    """Serve requests on one accepted channel until it closes, times out, or the server stops.

    Timeouts are deadlines (``time.monotonic()`` seconds) that the server's watchdog checks
    (``check_deadlines``) a few times per shortest timeout: setting one is a float store, where
    a timer scope per read or write would cost a scheduled callback each.
    """

    def __init__(self, server: HTTPServer, channel: Channel) -> None:
        self.server = server
        self.config = server.config
        self.channel = channel
        self.client = channel.client
        self.h11 = self._parser()
        self.scope = anyio.CancelScope()
        self.idle = False
        self.linger = False
        self._abort = False
        self._waiter: asyncio.Future[None] | anyio.Event | None = None
        try:
            # On asyncio a plain future is the cheapest way to wait for the next bytes.
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._buffered = 0
        self._paused = False
        self._eof = False
        self._timed_out = False
        self._started = False  # the current cycle's response head was written
        self._head: h11.Request | None = None  # the current cycle's request head, once read
        self.read_deadline = math.inf
        self.send_deadline = math.inf
        self._active: Request | None = None
        self._reader = channel.attach(self)

    def _parser(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)

    def close_if_idle(self) -> None:
        """Close now if waiting for a next request with nothing buffered (used on shutdown)."""
        if self.idle:
            self.scope.cancel()

    def check_deadlines(self, now: float) -> None:
        """Apply the read and send deadlines that have passed by ``now`` (monotonic seconds).

        A read past its deadline wakes the serving loop, which answers 408 or closes; a send
        past its deadline means the client stopped reading: the request counts as
        disconnected and the connection ends.
        """
        if now >= self.read_deadline and not self._timed_out:
            self._timed_out = True
            self._wake()
        if now >= self.send_deadline:
            self.send_deadline = math.inf
            self._abort = True
            if self._active is not None:
                self._active.disconnected.set()
            self.scope.cancel()

    async def run(self) -> None:
        """Serve until the connection must end; never raises for peer misbehaviour."""
        try:
            async with anyio.create_task_group() as tg:
                if self._reader is not None:
                    tg.start_soon(self._reader)
                with self.scope:
                    try:
                        first = True
                        while await self._serve_one(first):
                            first = False
                    except (ClientGone, _Close):
                        pass
                tg.cancel_scope.cancel()
        finally:
            await self.channel.close(linger=self.linger and not self._abort, abort=self._abort)

    # --- receiving ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take bytes the channel received (b"" at EOF); called from its reader or callbacks."""
        if self._eof:
            return
        self._buffered += len(data)
        self.h11.receive_data(data)
        if not data:
            self._eof = True
            if self._active is not None:
                # The client went away mid-request: cancel the handler or stream (ending the
                # connection, which could not answer anyway).
                self._active.disconnected.set()
                self.scope.cancel()
        elif self._buffered > _MAX_PIPELINED and not self._paused:
            # The serving loop is busy and the client keeps sending: stop reading.
            self._paused = True
            self.channel.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if isinstance(waiter, anyio.Event):
                waiter.set()
            elif not waiter.done():
                waiter.set_result(None)

    def _set_read_deadline(self, deadline: float) -> None:
        self.read_deadline = deadline

    async def _wait_for_data(self) -> bool:
        """Wait until the channel fed h11 more bytes (or EOF); False once the read timed out."""
        if self._eof or self._timed_out:
            return not self._timed_out  # on EOF h11 already knows; next_event reports it
        self._buffered = 0
        if self._paused:
            self._paused = False
            self.channel.resume_reading()
        if self._loop is not None:
            future: asyncio.Future[None] = self._loop.create_future()
            self._waiter = future
            await future
        else:
            event = self._waiter = anyio.Event()
            await event.wait()
        return not self._timed_out

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _BadRequest(exc.error_status_hint, str(exc)) from exc

    async def _read_head(self, first: bool) -> h11.Request | None:
        buffered = bool(self.h11.trailing_data[0])
        if not buffered and self.server.shutting_down:
            return None
        # Idle: nothing of a request received yet, so shutdown may close it at once.
        self.idle = not buffered
        limit = self.config.header_timeout_s if first else self.config.idle_timeout_s
        self._set_read_deadline(time.monotonic() + limit)
        # Nothing buffered (the usual keep-alive case): wait before asking the parser.
        waiting = not buffered and not self._eof
        try:
            while True:
                if waiting:
                    event: h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED] = h11.NEED_DATA
                else:
                    event = self._next_event()
                if type(event) is h11.Request:
                    return event
                if type(event) is h11.ConnectionClosed:
                    return None
                if event is not h11.NEED_DATA:
                    raise _BadRequest(400, f"unexpected {event!r} before a request")
                if waiting:
                    waiting = False
                elif self.idle and self.h11.trailing_data[0]:
                    self.idle = False  # a request has begun: now the head timeout applies
                    self._set_read_deadline(time.monotonic() + self.config.header_timeout_s)
                if not await self._wait_for_data():
                    # Timed out: a silent or too slow client.
                    if self.h11.trailing_data[0]:
                        await self._send_error(408, "request head not received in time")
                    return None
        finally:
            self.idle = False

    async def _read_body(self) -> bytes:
        event = self._next_event()
        if type(event) is h11.EndOfMessage:
            return b""  # no body (the usual GET): no deadline to set
        body = bytearray()
        limit = self.config.max_body_bytes
        self._set_read_deadline(time.monotonic() + self.config.body_timeout_s)
        while True:
            if type(event) is h11.Data:
                body += event.data
                if len(body) > limit:
                    raise _Status(413, f"request body is larger than {limit} bytes")
            elif type(event) is h11.EndOfMessage:
                return bytes(body)
            elif event is h11.NEED_DATA:
                if not await self._wait_for_data():
                    raise _Status(408, "request body not received in time")
            else:
                raise ClientGone
            event = self._next_event()

    # --- one request/response cycle ------------------------------------------------------------

    async def _serve_one(self, first: bool) -> bool:
        self._started = False
        self._head = None
        try:
            head = await self._read_head(first)
            if head is None:
                return False
            self._head = head
            headers = list(head.headers)  # one pass over h11's header view, used thrice
            self._check_head(head, headers)
            if self.h11.they_are_waiting_for_100_continue:
                self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
                await self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request = self._build_request(head, headers, await self._read_body())
        except _BadRequest as exc:
            await self._send_error(exc.status, exc.message)
            return False
        except _Status as exc:
            await self._send_error(exc.status, exc.message)
            return False
        writer = ResponseWriter(head, headers, self.server.shutting_down)
        gone = await self._dispatch(request, writer)
        if gone or writer.close or self.server.shutting_down:
            return False
        if self.h11.their_state is not h11.DONE:
            return False
        # A fresh parser for the next request, fed what the client already sent after this one.
        data, closed = self.h11.trailing_data
        self.h11 = self._parser()
        if data:
            self.h11.receive_data(data)
        if closed:
            self.h11.receive_data(b"")
        return True

    def _check_head(self, head: h11.Request, headers: list[tuple[bytes, bytes]]) -> None:
        if head.http_version not in (b"1.1", b"1.0"):
            raise _Status(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        # h11 enforces its size limit only on heads that arrive in pieces; check whole ones too.
        size = len(head.target)
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"content-length" and int(value) > self.config.max_body_bytes:
                limit = self.config.max_body_bytes
                raise _Status(413, f"request body is larger than {limit} bytes")
        if size > self.config.max_header_bytes:
            raise _Status(431, "request head is too large")
        if not head.target.startswith((b"/", b"http://", b"https://")):
            raise _Status(400, "request target must be an absolute path")

    def _build_request(
        self, head: h11.Request, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Request:
        target = head.target.decode("latin-1")
        if target.startswith(("http://", "https://")):
            split = urlsplit(target)  # absolute form (RFC 9112, 3.2.2): use its path
            target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        raw_path, _, query = target.partition("?")
        if not raw_path.startswith("/"):
            raise _Status(400, "request target must be an absolute path")
        return Request(
            method=head.method.decode("ascii"),
            path=unquote(raw_path) if "%" in raw_path else raw_path,
            query=query,
            headers=tuple([(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]),
            body=body,
            client=self.client,
            http_version=head.http_version.decode("ascii"),
        )

    async def _dispatch(self, request: Request, writer: ResponseWriter) -> bool:
        """Run the handler and send its response; return True if the connection must end."""
        if self._eof:
            request.disconnected.set()
            return True
        self._set_read_deadline(math.inf)  # the handler may take its time
        self._active = request
        try:
            await self._respond(request, writer)
        except ClientGone:
            request.disconnected.set()
            return True
        except _Close:
            return True
        finally:
            self._active = None
        return request.disconnected.is_set()

    async def _respond(self, request: Request, writer: ResponseWriter) -> None:
        try:
            response = await self.server.handler(request)
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            response = self.config.error_response(500, "internal server error")
        if isinstance(response, Response):
            await self._send_response(request, writer, response)
        elif isinstance(response, StreamingResponse):
            await self._send_stream(request, writer, response)
        else:
            log.error("handler for %s returned %r, not a response", request.path, response)
            error = self.config.error_response(500, "internal server error")
            await self._send_response(request, writer, error)

    async def _send_response(
        self, request: Request, writer: ResponseWriter, response: Response
    ) -> None:
        try:
            data = writer.complete(response.status, response.headers, response.body)
        except BadResponse as exc:
            log.error("handler returned an invalid response for %s: %s", request.path, exc)
            error = self.config.error_response(500, "internal server error")
            data = writer.complete(error.status, error.headers, error.body)
        self._started = True
        await self._write(data)  # one write for the whole response

    async def _send_stream(
        self, request: Request, writer: ResponseWriter, response: StreamingResponse
    ) -> None:
        chunks = response.chunks
        try:
            try:
                head = writer.stream_head(response.status, response.headers)
            except BadResponse as exc:
                log.error("handler returned an invalid stream head for %s: %s", request.path, exc)
                error = self.config.error_response(500, "internal server error")
                await self._send_response(request, writer, error)
                return
            self._started = True
            if writer.has_body:
                # with the first chunk if that is ready (within hold_head_s)
                await self.channel.write_held(head, response.hold_head_s)
            else:
                await self._write(head)
            if writer.has_body:
                async for chunk in chunks:
                    if chunk:
                        await self._write(writer.chunk(chunk))
                await self._write(writer.end())
        except ClientGone:
            request.disconnected.set()  # before the generator's cleanup runs below
            raise
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            # The status line is gone already: the only honest signal left is to cut the
            # connection without the final chunk, so the client sees an incomplete body.
            log.exception("stream failed for %s %s", request.method, request.path)
            raise _Close from exc
        finally:
            if isinstance(chunks, AsyncGenerator):
                with anyio.CancelScope(shield=True):
                    await chunks.aclose()

    # --- sending -------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        # A send still blocked at ``send_deadline`` ends the connection (check_deadlines).
        self.send_deadline = time.monotonic() + self.config.send_timeout_s
        try:
            await self.channel.write(data)
        finally:
            self.send_deadline = math.inf

    async def _send_error(self, status: int, message: str) -> None:
        """Send a layer error with ``connection: close`` if a response can still start."""
        self.linger = True
        if self._started:
            return
        self._started = True
        response = self.config.error_response(status, message)
        head = self._head  # known unless the head itself was bad: a HEAD gets no body
        writer = ResponseWriter(head, list(head.headers) if head else [], closing=True)
        with contextlib.suppress(ClientGone, BadResponse):
            await self._write(writer.complete(status, response.headers, response.body))
