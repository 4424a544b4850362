"""The Network's HTTP app: node routes, the Cloud's routes and operator routes.

Authentication
    * Node routes (``/network/v1/nodes/...`` after admission) take the session token issued by
      ``POST /network/v1/nodes/challenge`` as ``Authorization: Bearer rns-...``. The token is
      random (256 bits), stored only as its SHA-256, dies with the node (heartbeat timeout)
      and after ``session_ttl_s``; every message that names a node must name the session's.
      Transport secrecy is TLS's job (run behind a TLS proxy off localhost).
    * Cloud and operator routes take the shared service token (``Authorization: Bearer``),
      compared in constant time.
    * ``register``, ``challenge``, the config pointer and snapshots, and ``health`` are open:
      the first two carry their own proof (grant signature, then challenge signature) and
      snapshots are signed public data.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the status of the
exception (core OpenAI errors keep theirs, so the Cloud can forward them).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from resultity_core import (
    AccountExistsError,
    ChallengeResponse,
    Heartbeat,
    InvalidRequestError,
    JobEvent,
    LeaseBatch,
    LeaseRequest,
    LedgerError,
    OpenAIRequestError,
    ReceiptSubmit,
    RegisterRequest,
    ResultityError,
    UnknownAccountError,
    WireMessageError,
)
from resultity_servers._http import Request, Response, Router

from ._cloud_routes import CloudRoutes
from ._coordinator import Coordinator
from ._errors import NetworkError, NodeAuthError
from ._http_util import (
    PREFIX,
    Reply,
    bearer,
    error_response,
    json_object,
    waiter,
)

__all__ = ["NetworkApp"]

log = logging.getLogger("resultity.network")

class NetworkApp(CloudRoutes):
    """Route HTTP requests to a Coordinator; ``run_ticker`` applies its timeouts.

    ``clock`` returns Unix seconds. ``max_lease_wait_s`` bounds a lease long poll.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        service_token: str,
        clock: Callable[[], float] = time.time,
        max_lease_wait_s: float = 20.0,
        tick_interval_s: float = 0.5,
        keepalive_s: float = 15.0,
    ) -> None:
        if not service_token:
            raise ValueError("a non-empty service token is required")
        self.coordinator = coordinator
        self.clock = clock
        self.max_lease_wait_s = max_lease_wait_s
        self.tick_interval_s = tick_interval_s
        self.keepalive_s = keepalive_s
        self._service_token = service_token.encode()
        self.closing = False
        self._node_waiters: dict[str, anyio.Event] = {}
        self._job_waiters: dict[str, anyio.Event] = {}
        # each node's last reported update outcome (from its heartbeats), for operators
        self.update_statuses: dict[str, dict[str, Any]] = {}
        self.router = Router()
        routes: list[tuple[str, str, Callable[[Request], Awaitable[Reply]]]] = [
            ("POST", "/nodes/register", self.register),
            ("POST", "/nodes/challenge", self.challenge),
            ("POST", "/nodes/heartbeat", self.heartbeat),
            ("POST", "/nodes/lease", self.lease),
            ("POST", "/nodes/events", self.events_in),
            ("POST", "/nodes/receipt", self.receipt),
            ("POST", "/nodes/receipts", self.receipt),
            ("GET", "/config", self.config_pointer),
            ("GET", "/config/{config_hash}", self.config_snapshot),
            ("GET", "/snapshots/{config_hash}", self.config_snapshot),
            ("POST", "/config", self._service(self.publish)),
            ("GET", "/health", self.health),
            ("POST", "/auth", self._service(self.auth)),
            ("GET", "/models", self._service(self.models)),
            ("GET", "/status", self._service(self.status)),
            ("POST", "/jobs", self._service(self.submit)),
            ("GET", "/jobs/{job_id}", self._service(self.job)),
            ("GET", "/jobs/{job_id}/events", self._service(self.events_out)),
            ("POST", "/jobs/{job_id}/cancel", self._service(self.cancel)),
            ("GET", "/accounts", self._service(self.accounts)),
            ("POST", "/accounts", self._service(self.create_account)),
            ("GET", "/accounts/{account_id}", self._service(self.account)),
            ("POST", "/accounts/{account_id}/credit", self._service(self.credit)),
            ("GET", "/accounts/{account_id}/ledger", self._service(self.ledger)),
            ("POST", "/accounts/{account_id}/keys", self._service(self.new_key)),
            ("POST", "/accounts/{account_id}/public-key", self._service(self.account_key)),
        ]
        for method, path, handler in routes:
            self.router.add(method, PREFIX + path, self._guard(handler))

    async def __call__(self, request: Request) -> Reply:
        """Dispatch one request (the app is the HTTP server's handler)."""
        return await self.router(request)

    # --- plumbing -----------------------------------------------------------------------------

    def _guard(self, handler: Callable[[Request], Awaitable[Reply]]) -> Callable[
            [Request], Awaitable[Reply]]:
        async def guarded(request: Request) -> Reply:
            try:
                return await handler(request)
            except OpenAIRequestError as exc:
                return Response.json(exc.to_error_body(), status=exc.status)
            except NetworkError as exc:
                return error_response(exc.status, str(exc), exc.code)
            except UnknownAccountError as exc:
                return error_response(404, str(exc), "unknown_account")
            except AccountExistsError as exc:
                return error_response(409, str(exc), "account_exists")
            except (LedgerError, WireMessageError, ResultityError, ValueError) as exc:
                return error_response(400, str(exc), "invalid_request", "invalid_request_error")
            finally:
                self.wake()

        return guarded

    def _service(self, handler: Callable[[Request], Awaitable[Reply]]) -> Callable[
            [Request], Awaitable[Reply]]:
        async def checked(request: Request) -> Reply:
            token = bearer(request)
            if token is None or not hmac.compare_digest(token.encode(), self._service_token):
                return error_response(401, "missing or wrong service token",
                                      "invalid_service_token")
            return await handler(request)

        return checked

    def _node(self, request: Request) -> str:
        token = bearer(request)
        if token is None:
            raise NodeAuthError("missing node session token")
        return self.coordinator.authenticate_node(token, self.clock())

    def wake(self) -> None:
        """Wake long polls and event streams the coordinator has news for."""
        nodes, jobs = self.coordinator.take_wakeups()
        for key, waiters in ((nodes, self._node_waiters), (jobs, self._job_waiters)):
            for name in key:
                event = waiters.pop(name, None)
                if event is not None:
                    event.set()

    def begin_shutdown(self) -> None:
        """End lease long polls now (they answer empty); job streams run to their end."""
        self.closing = True
        for event in self._node_waiters.values():
            event.set()
        self._node_waiters.clear()

    async def run_ticker(self) -> None:
        """Apply the coordinator's timeouts every ``tick_interval_s`` (runs until cancelled)."""
        while True:
            try:
                self.coordinator.tick(self.clock())
            except Exception:
                log.exception("coordinator tick failed")
            self.wake()
            await anyio.sleep(self.tick_interval_s)

    # --- node routes --------------------------------------------------------------------------

    async def register(self, request: Request) -> Reply:
        """``POST /nodes/register`` RegisterRequest -> Challenge (403 for a bad grant)."""
        message = RegisterRequest.from_payload(json_object(request))
        challenge = self.coordinator.begin_registration(message, self.clock())
        return Response.json(challenge.to_payload())

    async def challenge(self, request: Request) -> Reply:
        """``POST /nodes/challenge`` ChallengeResponse -> node session (403 if it fails)."""
        message = ChallengeResponse.from_payload(json_object(request))
        session = self.coordinator.complete_registration(message, self.clock())
        return Response.json(session.to_payload())

    async def heartbeat(self, request: Request) -> Reply:
        """``POST /nodes/heartbeat`` Heartbeat -> state, current config hash, jobs to abort."""
        node_id = self._node(request)
        beat = Heartbeat.from_payload(json_object(request))
        reply = self.coordinator.heartbeat(node_id, beat, self.clock())
        if beat.update_status is not None:
            self.update_statuses[node_id] = {"version": beat.runtime_version,
                                             "update_status": beat.update_status,
                                             "at": self.clock()}
        return Response.json(reply.to_payload())

    async def lease(self, request: Request) -> Reply:
        """``POST /nodes/lease`` LeaseRequest -> LeaseBatch, waiting up to ``wait_ms``."""
        node_id = self._node(request)
        message = LeaseRequest.from_payload(json_object(request))
        if message.node_id != node_id:
            raise NodeAuthError("lease node_id does not match the session")
        wait = min(message.wait_ms / 1000, self.max_lease_wait_s)
        deadline = anyio.current_time() + wait
        # Re-lease at least this often: a lease counts as a sign of life.
        slice_s = max(0.05, self.coordinator.settings.heartbeat_timeout_s / 3)
        while True:
            wakeup = waiter(self._node_waiters, node_id)
            batch = self.coordinator.lease(node_id, message.max_jobs, self.clock())
            remaining = deadline - anyio.current_time()
            if batch.leases or remaining <= 0 or self.closing:
                break
            # Parked: a job submitted meanwhile for this node is leased to this poll by the
            # submit itself, so the wake-up answers at once, without a lease pass.
            parked = self.coordinator.park_lease(node_id, message.max_jobs)
            try:
                with anyio.move_on_after(min(remaining, slice_s)):
                    await wakeup.wait()
            except BaseException:
                handed = self.coordinator.unpark_lease(parked)
                if handed.leases:
                    self.coordinator.return_leases(
                        node_id, [x.job_id for x in handed.leases], self.clock())
                    self.wake()
                raise
            batch = self.coordinator.unpark_lease(parked)
            if batch.leases:
                break
        if batch.leases and request.is_disconnected():
            self.coordinator.return_leases(node_id, [x.job_id for x in batch.leases],
                                           self.clock())
            batch = LeaseBatch(())
        return Response.json(batch.to_payload())

    async def events_in(self, request: Request) -> Reply:
        """``POST /nodes/events`` ``{"events": [JobEvent...]}`` (or one JobEvent) -> the job
        ids the node must abort."""
        node_id = self._node(request)
        body = json_object(request)
        items = body.get("events") if "_type" not in body else [body]
        if not isinstance(items, list):
            raise InvalidRequestError("events must be a list of job_event objects")
        events = []
        for index, item in enumerate(items):
            try:
                events.append(JobEvent.from_payload(item))
            except WireMessageError as exc:
                raise WireMessageError(f"events[{index}].{exc.field}", exc.reason) from None
        cancel = self.coordinator.post_events(node_id, events, self.clock())
        # The job streams woken here send the new events before this answers the node (on
        # a loop shared with the Cloud and the node, the events are on the path to the
        # client; the answer is not).
        self.wake()
        await anyio.sleep(0)
        return Response.json({"_type": "events_reply", "cancel": list(cancel)})

    async def receipt(self, request: Request) -> Reply:
        """``POST /nodes/receipt`` ReceiptSubmit -> how the job was settled."""
        node_id = self._node(request)
        message = ReceiptSubmit.from_payload(json_object(request))
        outcome = self.coordinator.submit_receipt(node_id, message.receipt, self.clock())
        return Response.json(outcome.to_payload())

    async def config_pointer(self, request: Request) -> Reply:
        """``GET /config`` -> ``{"config_hash", "version"}`` of the current snapshot (404)."""
        current = self.coordinator.current_config()
        if current is None:
            return error_response(404, "no config snapshot has been published", "no_config")
        return Response.json({"_type": "config_pointer", "config_hash": current[0],
                              "version": current[1].version})

    async def config_snapshot(self, request: Request) -> Reply:
        """``GET /config/{hash}`` -> the signed snapshot envelope (404 if unknown)."""
        envelope = self.coordinator.snapshot(request.path_params["config_hash"])
        if envelope is None:
            return error_response(404, "no snapshot with this hash", "unknown_snapshot")
        return Response.json(envelope)

    async def publish(self, request: Request) -> Reply:
        """``POST /config`` signed NodeConfig envelope (service token) -> its hash."""
        digest = self.coordinator.publish_config(request.body, self.clock())
        return Response.json({"config_hash": digest})

    async def health(self, request: Request) -> Reply:
        """``GET /health`` -> node counts; 200 when a config is published, else 503."""
        counts = self._counts()
        ok = self.coordinator.current_config() is not None
        return Response.json({"ok": ok, **counts}, status=200 if ok else 503)
