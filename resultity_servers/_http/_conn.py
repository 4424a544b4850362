"""One server-side HTTP/1.1 connection: an h11 state machine driven over an anyio stream."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import AsyncGenerator
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
import h11

from ._types import HeaderList, Request, Response, StreamingResponse

if TYPE_CHECKING:
    from ._server import HTTPServer

__all__ = ["Connection", "close_gracefully"]

log = logging.getLogger("resultity.http")

_READ_SIZE = 64 * 1024
# Bytes a client may pipeline while its previous request is still being answered.
_MAX_PIPELINED = 256 * 1024
_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache  # noqa: PLW0603 - one formatted Date per second, shared by all connections
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _ClientGone(Exception):
    """The peer closed, reset, or stopped reading; nothing more can be sent."""


class _Close(Exception):
    """End this connection now (after any error response was sent)."""


async def close_gracefully(stream: anyio.abc.ByteStream, linger_s: float = 0.5) -> None:
    """Half-close, drain what the peer still sends (briefly), then close.

    Closing a socket with unread input makes the kernel send a reset, which can destroy an
    error response the peer has not read yet; lingering avoids that.
    """
    with anyio.move_on_after(linger_s, shield=True):
        try:
            await stream.send_eof()
            drained = 0
            while drained < 1 << 20:
                drained += len(await stream.receive(_READ_SIZE))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
    with anyio.CancelScope(shield=True):
        await stream.aclose()


class Connection:
    """Serve requests on one accepted stream until it closes, times out, or the server stops.

    Timeouts are deadlines (``time.monotonic()`` seconds) that the server's watchdog checks
    (``check_deadlines``) a few times per shortest timeout: setting one is a float store, where
    a timer scope per read or write would cost a scheduled callback each.
    """

    def __init__(self, server: HTTPServer, stream: anyio.abc.SocketStream) -> None:
        self.server = server
        self.config = server.config
        self.stream = stream
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes
        )
        self.scope = anyio.CancelScope()
        self.idle = False
        self.linger = False
        self._data_ready = anyio.Event()
        self._space = anyio.Event()
        self._buffered = 0
        self._eof = False
        self._timed_out = False
        self._read_scope = anyio.CancelScope()
        self.read_deadline = math.inf
        self.send_deadline = math.inf
        self._active: Request | None = None
        try:
            address = stream.extra(anyio.abc.SocketAttribute.remote_address)
            self.client = (str(address[0]), int(address[1])) if isinstance(address, tuple) else None
        except (anyio.TypedAttributeLookupError, IndexError):
            self.client = None

    def close_if_idle(self) -> None:
        """Close now if waiting for a next request with nothing buffered (used on shutdown)."""
        if self.idle:
            self.scope.cancel()

    def check_deadlines(self, now: float) -> None:
        """Apply the read and send deadlines that have passed by ``now`` (monotonic seconds).

        A read past its deadline stops the reader (the serving loop then answers 408 or
        closes); a send past its deadline means the client stopped reading: the request counts
        as disconnected and the connection ends.
        """
        if now >= self.read_deadline and not self._timed_out:
            self._read_scope.cancel()
        if now >= self.send_deadline:
            self.send_deadline = math.inf
            if self._active is not None:
                self._active.disconnected.set()
            self.scope.cancel()

    async def run(self) -> None:
        """Serve until the connection must end; never raises for peer misbehaviour."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._reader)
                with self.scope:
                    try:
                        first = True
                        while await self._serve_one(first):
                            first = False
                    except (_ClientGone, _Close):
                        pass
                tg.cancel_scope.cancel()
        finally:
            if self.linger:
                await close_gracefully(self.stream)
            else:
                with anyio.CancelScope(shield=True):
                    await self.stream.aclose()

    # --- receiving ---------------------------------------------------------------------------
    #
    # One reader task per connection owns the socket's receiving side: it feeds h11 and wakes
    # the serving loop. Because it keeps reading while a handler runs, a client that goes away
    # is noticed at once (the handler is cancelled) without a task per request.

    async def _reader(self) -> None:
        # Read timeouts cancel this one long-lived scope: the serving loop moves
        # ``read_deadline`` and the server's watchdog calls ``check_deadlines``.
        with self._read_scope:
            while True:
                if self._buffered > _MAX_PIPELINED:
                    # The serving loop is busy and the client keeps sending: stop reading.
                    self._space = anyio.Event()
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
                self._buffered += len(data)
                self.h11.receive_data(data)
                self._data_ready.set()
                if not data:
                    self._eof = True
                    if self._active is not None:
                        # The client went away mid-request: cancel the handler or stream
                        # (ending the connection, which could not answer anyway).
                        self._active.disconnected.set()
                        self.scope.cancel()
                    return
        self._timed_out = True
        self._data_ready.set()

    def _set_read_deadline(self, deadline: float) -> None:
        self.read_deadline = deadline

    async def _wait_for_data(self) -> bool:
        """Wait until the reader fed h11 more bytes (or EOF); False once the read timed out."""
        if self._eof or self._timed_out:
            return not self._timed_out  # on EOF h11 already knows; next_event reports it
        self._buffered = 0
        self._space.set()
        self._data_ready = anyio.Event()
        await self._data_ready.wait()
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
        try:
            while True:
                event = self._next_event()
                if isinstance(event, h11.Request):
                    return event
                if isinstance(event, h11.ConnectionClosed):
                    return None
                if event is not h11.NEED_DATA:
                    raise _BadRequest(400, f"unexpected {event!r} before a request")
                if self.idle and self.h11.trailing_data[0]:
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
        body = bytearray()
        limit = self.config.max_body_bytes
        self._set_read_deadline(time.monotonic() + self.config.body_timeout_s)
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise _Status(413, f"request body is larger than {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif event is h11.NEED_DATA:
                if not await self._wait_for_data():
                    raise _Status(408, "request body not received in time")
            else:
                raise _ClientGone

    # --- one request/response cycle ------------------------------------------------------------

    async def _serve_one(self, first: bool) -> bool:
        try:
            head = await self._read_head(first)
            if head is None:
                return False
            self._check_head(head)
            if self.h11.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            request = self._build_request(head, await self._read_body())
        except _BadRequest as exc:
            await self._send_error(exc.status, exc.message)
            return False
        except _Status as exc:
            await self._send_error(exc.status, exc.message)
            return False
        gone = await self._dispatch(request)
        if gone or self.server.shutting_down:
            return False
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def _check_head(self, head: h11.Request) -> None:
        if head.http_version not in (b"1.1", b"1.0"):
            raise _Status(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        # h11 enforces its size limit only on heads that arrive in pieces; check whole ones too.
        size = len(head.target) + sum(len(n) + len(v) + 4 for n, v in head.headers)
        if size > self.config.max_header_bytes:
            raise _Status(431, "request head is too large")
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self.config.max_body_bytes:
                limit = self.config.max_body_bytes
                raise _Status(413, f"request body is larger than {limit} bytes")
        if not head.target.startswith((b"/", b"http://", b"https://")):
            raise _Status(400, "request target must be an absolute path")

    def _build_request(self, head: h11.Request, body: bytes) -> Request:
        target = head.target.decode("latin-1")
        if target.startswith(("http://", "https://")):
            split = urlsplit(target)  # absolute form (RFC 9112, 3.2.2): use its path
            target = (split.path or "/") + (f"?{split.query}" if split.query else "")
        raw_path, _, query = target.partition("?")
        if not raw_path.startswith("/"):
            raise _Status(400, "request target must be an absolute path")
        return Request(
            method=head.method.decode("ascii"),
            path=unquote(raw_path),
            query=query,
            headers=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers),
            body=body,
            client=self.client,
            http_version=head.http_version.decode("ascii"),
        )

    async def _dispatch(self, request: Request) -> bool:
        """Run the handler and send its response; return True if the connection must end."""
        if self._eof:
            request.disconnected.set()
            return True
        self._set_read_deadline(math.inf)  # the handler may take its time
        self._active = request
        close = False
        try:
            await self._respond(request)
        except _ClientGone:
            request.disconnected.set()
            close = True
        except (_Close, h11.LocalProtocolError):
            # LocalProtocolError: the handler's headers contradict its body; drop the
            # connection rather than send something malformed.
            close = True
        finally:
            self._active = None
        return close or request.disconnected.is_set()

    async def _respond(self, request: Request) -> None:
        try:
            response = await self.server.handler(request)
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            response = self.config.error_response(500, "internal server error")
        if not isinstance(response, Response | StreamingResponse):
            log.error("handler for %s returned %r, not a response", request.path, response)
            response = self.config.error_response(500, "internal server error")
        if isinstance(response, StreamingResponse):
            await self._send_stream(request, response)
        else:
            await self._send_response(request, response)

    def _head(self, status: int, headers: HeaderList, length: int | None) -> h11.Response:
        out = [(name, value) for name, value in headers if name != "content-length"]
        if length is not None:
            out.append(("content-length", str(length)))
        out.append(("date", _http_date()))
        if self.server.shutting_down:
            out.append(("connection", "close"))
        return h11.Response(status_code=status, headers=out, reason=_reason(status))

    async def _send_response(self, request: Request, response: Response) -> None:
        try:
            head = self._head(response.status, response.headers, len(response.body))
            data = self.h11.send(head)
        except h11.LocalProtocolError:
            log.exception("handler returned an invalid response for %s", request.path)
            response = self.config.error_response(500, "internal server error")
            head = self._head(response.status, response.headers, len(response.body))
            data = self.h11.send(head)
        # One write for the whole response: half the system calls of head-then-body.
        if request.method != "HEAD" and response.body:
            data = (data or b"") + (self.h11.send(h11.Data(data=response.body)) or b"")
        await self._write((data or b"") + (self.h11.send(h11.EndOfMessage()) or b""))

    async def _send_stream(self, request: Request, response: StreamingResponse) -> None:
        chunks = response.chunks
        try:
            try:
                data = self.h11.send(self._head(response.status, response.headers, None))
            except h11.LocalProtocolError:
                log.exception("handler returned an invalid stream head for %s", request.path)
                error = self.config.error_response(500, "internal server error")
                await self._send_response(request, error)
                return
            await self._write(data)
            if request.method != "HEAD":
                async for chunk in chunks:
                    if chunk:
                        await self._send(h11.Data(data=chunk))
            await self._send(h11.EndOfMessage())
        except _ClientGone:
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

    async def _write(self, data: bytes | None) -> None:
        if not data:
            return
        # A send still blocked at ``send_deadline`` ends the connection (check_deadlines).
        self.send_deadline = time.monotonic() + self.config.send_timeout_s
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise _ClientGone from exc
        finally:
            self.send_deadline = math.inf

    async def _send(self, event: h11.Event) -> None:
        await self._write(self.h11.send(event))

    async def _send_error(self, status: int, message: str) -> None:
        """Send a layer error with ``connection: close`` if a response can still start."""
        self.linger = True
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = self.config.error_response(status, message)
        headers = (*response.headers, ("connection", "close"))
        try:
            await self._send(self._head(status, headers, len(response.body)))
            await self._send(h11.Data(data=response.body))
            await self._send(h11.EndOfMessage())
        except (_ClientGone, h11.LocalProtocolError):
            pass


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


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
