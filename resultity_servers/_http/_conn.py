"""One server-side HTTP/1.1 connection: h11 parses the requests, responses are framed here.

The bytes come from a ``Channel`` (the two kinds are in ``_server.py``): an asyncio Protocol
on the asyncio backend, an anyio stream with a reader task elsewhere. Either
way the channel pushes what it receives into ``Connection.feed``, so a client that goes away is
noticed at once (the handler is cancelled) without a task per request.

h11 validates every request; a new h11 state machine per request/response cycle is cheaper
than sending the response through h11 (whose header validation and state bookkeeping were a
fifth of the server's time per request), so responses are serialized by ``_ResponseWriter``
below with the same framing rules: ``content-length`` for complete bodies, chunked for streams
to HTTP/1.1 clients, close-delimited for HTTP/1.0 ones, no body for HEAD, 204 and 304.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import anyio
import h11

from ._types import HeaderList, Request, Response, StreamingResponse

if TYPE_CHECKING:
    from ._server import HTTPServer

__all__ = ["Channel", "ClientGone", "Connection"]

log = logging.getLogger("resultity.http")

# Bytes a client may pipeline while its previous request is still being answered.
_MAX_PIPELINED = 256 * 1024
_date_cache: tuple[int, bytes] = (0, b"")


def _date_line() -> bytes:
    global _date_cache  # noqa: PLW0603 - one formatted Date per second, shared by all connections
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, b"date: %s\r\n" % formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


class ClientGone(Exception):
    """The peer closed, reset, or stopped reading; nothing more can be sent."""


class _Close(Exception):
    """End this connection now (after any error response was sent)."""


class _BadResponse(Exception):
    """A handler's response cannot be sent as HTTP (bad status or header)."""


class Channel(Protocol):
    """The byte transport under one connection (``_server.py`` has the two kinds)."""

    client: tuple[str, int] | None

    def attach(self, connection: Connection) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """Start pushing received bytes into ``connection.feed`` (b"" at EOF); return a reader
        to run as a task if the channel needs one, None if the transport calls back by itself."""

    async def write(self, data: bytes) -> None:
        """Send ``data``; raises ClientGone if the peer is gone. Waits only when the peer
        reads slower than we write."""

    def pause_reading(self) -> None:
        """Stop receiving until ``resume_reading`` (a client pipelining too much)."""

    def resume_reading(self) -> None:
        """Receive again after ``pause_reading``."""

    async def close(self, *, linger: bool, abort: bool) -> None:
        """Close: ``linger`` half-closes and drains the peer briefly first (so an error
        response is not destroyed by a reset); ``abort`` drops unsent bytes (a stalled peer)."""


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
        writer = _ResponseWriter(head, headers, self.server.shutting_down)
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

    async def _dispatch(self, request: Request, writer: _ResponseWriter) -> bool:
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

    async def _respond(self, request: Request, writer: _ResponseWriter) -> None:
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
        self, request: Request, writer: _ResponseWriter, response: Response
    ) -> None:
        try:
            data = writer.complete(response.status, response.headers, response.body)
        except _BadResponse as exc:
            log.error("handler returned an invalid response for %s: %s", request.path, exc)
            error = self.config.error_response(500, "internal server error")
            data = writer.complete(error.status, error.headers, error.body)
        self._started = True
        await self._write(data)  # one write for the whole response

    async def _send_stream(
        self, request: Request, writer: _ResponseWriter, response: StreamingResponse
    ) -> None:
        chunks = response.chunks
        try:
            try:
                head = writer.stream_head(response.status, response.headers)
            except _BadResponse as exc:
                log.error("handler returned an invalid stream head for %s: %s", request.path, exc)
                error = self.config.error_response(500, "internal server error")
                await self._send_response(request, writer, error)
                return
            self._started = True
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
        writer = _ResponseWriter(head, list(head.headers) if head else [], closing=True)
        with contextlib.suppress(ClientGone, _BadResponse):
            await self._write(writer.complete(status, response.headers, response.body))


# --- response framing ------------------------------------------------------------------------

# RFC 9110 field names (tokens) and values, as h11 validates them.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_LINES: dict[tuple[str, str], bytes] = {}  # validated header -> its encoded line
_MAX_CACHED_LINES = 4096
_FRAMING = frozenset({"content-length", "transfer-encoding"})


def _header_line(item: tuple[str, str]) -> bytes:
    line = _LINES.get(item)
    if line is not None:
        return line
    try:
        name, value = item[0].encode("ascii"), item[1].encode("ascii")
    except (UnicodeEncodeError, AttributeError, IndexError) as exc:
        raise _BadResponse(f"header {item!r} is not ASCII text") from exc
    if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
        raise _BadResponse(f"illegal header {item!r}")
    line = b"%s: %s\r\n" % (name, value)
    if len(_LINES) >= _MAX_CACHED_LINES:
        _LINES.clear()  # handlers that put per-request values in headers: keep it bounded
    _LINES[item] = line
    return line


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        reason = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


class _ResponseWriter:
    """Frames one response to the request ``head`` (None: a layer error, no valid request)."""

    __slots__ = ("chunked", "close", "has_body", "head_only", "http10")

    def __init__(
        self,
        head: h11.Request | None,
        headers: list[tuple[bytes, bytes]],
        closing: bool = False,
    ) -> None:
        self.close = closing
        self.head_only = head is not None and head.method == b"HEAD"
        self.http10 = head is None or head.http_version != b"1.1"
        if head is not None and not self.close:
            # h11's keep-alive rule: HTTP/1.1 without ``connection: close``.
            if self.http10:
                self.close = True
            else:
                for name, value in headers:
                    if name == b"connection" and b"close" in value.lower():
                        self.close = True
        self.has_body = not self.head_only
        self.chunked = False

    def _head(self, status: int, headers: HeaderList, framing: bytes) -> bytes:
        if type(status) is not int:
            if not isinstance(status, int) or isinstance(status, bool):
                raise _BadResponse(f"status {status!r} is not an integer")
            status = int(status)  # an HTTPStatus
        if not 200 <= status <= 999:
            raise _BadResponse(f"status {status} is not a final HTTP status")
        lines = [_status_line(status)]
        for item in headers:
            if item[0] in _FRAMING:
                continue  # the framing is ours to choose
            if item[0] == "connection" and "close" in item[1].lower():
                self.close = True
                continue  # sent below, once
            lines.append(_header_line(item))
        lines.append(framing)
        lines.append(_date_line())
        lines.append(b"connection: close\r\n\r\n" if self.close else b"\r\n")
        return b"".join(lines)

    def complete(self, status: int, headers: HeaderList, body: bytes) -> bytes:
        """Return the whole response with ``content-length`` framing."""
        if status in (204, 304):
            self.has_body = False
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        return head + body if self.has_body and body else head

    def stream_head(self, status: int, headers: HeaderList) -> bytes:
        """Return the head of a streamed response (chunked, or close-delimited for HTTP/1.0)."""
        if status in (204, 304):
            self.has_body = False
            return self._head(status, headers, b"content-length: 0\r\n")
        if self.http10:
            self.close = self.close or self.has_body
            return self._head(status, headers, b"")
        self.chunked = True
        return self._head(status, headers, b"transfer-encoding: chunked\r\n")

    def chunk(self, data: bytes) -> bytes:
        """Return ``data`` framed as one chunk of the body (as is when close-delimited)."""
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data

    def end(self) -> bytes:
        """Return what ends the body: the last chunk, or nothing."""
        return b"0\r\n\r\n" if self.chunked else b""


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
