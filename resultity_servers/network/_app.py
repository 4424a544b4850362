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
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio

from resultity_core import (
    AccountExistsError,
    ChallengeResponse,
    Heartbeat,
    InvalidAPIKeyError,
    InvalidRequestError,
    JobEvent,
    JobState,
    LeaseBatch,
    LeaseRequest,
    LedgerError,
    NodeState,
    OpenAIRequestError,
    PublicKey,
    ReceiptSubmit,
    RegisterRequest,
    ResultityError,
    UnknownAccountError,
    WireMessageError,
    encode_comment,
    encode_event,
    parse_json_strict,
)
from resultity_servers._http import Request, Response, Router, StreamingResponse

from ._coordinator import AccountBalance, Coordinator
from ._errors import NetworkError, NodeAuthError
from ._records import JobRecord
from ._store import ACTIVE_JOB_STATES

__all__ = ["NetworkApp", "decimalize"]

log = logging.getLogger("resultity.network")

Reply = Response | StreamingResponse
PREFIX = "/network/v1"


def _error(status: int, message: str, code: str | None, kind: str = "network_error",
           param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response.json(body, status=status)


def _bearer(request: Request) -> str | None:
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _body(request: Request) -> Any:
    """Parse the body strictly (duplicate keys refused); raises MalformedEnvelopeError."""
    return parse_json_strict(request.body or b"{}")


def _obj(request: Request) -> dict[str, Any]:
    body = _body(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return body


def decimalize(value: Any, path: str = "request") -> Any:
    """Return ``value`` with every float replaced by its shortest decimal text.

    Leases are canonical JSON (no floats); nodes read fractional settings back from decimal
    strings. Raises InvalidRequestError for NaN or infinity.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequestError(f"{path} must be a finite number", param=path)
        return repr(value)
    if isinstance(value, dict):
        return {k: decimalize(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [decimalize(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _int_field(body: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"{name} must be a non-negative integer", param=name)
    return value


class NetworkApp:
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
                return _error(exc.status, str(exc), exc.code)
            except UnknownAccountError as exc:
                return _error(404, str(exc), "unknown_account")
            except AccountExistsError as exc:
                return _error(409, str(exc), "account_exists")
            except (LedgerError, WireMessageError, ResultityError, ValueError) as exc:
                return _error(400, str(exc), "invalid_request", "invalid_request_error")
            finally:
                self.wake()

        return guarded

    def _service(self, handler: Callable[[Request], Awaitable[Reply]]) -> Callable[
            [Request], Awaitable[Reply]]:
        async def checked(request: Request) -> Reply:
            token = _bearer(request)
            if token is None or not hmac.compare_digest(token.encode(), self._service_token):
                return _error(401, "missing or wrong service token", "invalid_service_token")
            return await handler(request)

        return checked

    def _node(self, request: Request) -> str:
        token = _bearer(request)
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

    @staticmethod
    def _waiter(waiters: dict[str, anyio.Event], name: str) -> anyio.Event:
        event = waiters.get(name)
        if event is None:
            event = waiters[name] = anyio.Event()
        return event

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
        message = RegisterRequest.from_payload(_obj(request))
        challenge = self.coordinator.begin_registration(message, self.clock())
        return Response.json(challenge.to_payload())

    async def challenge(self, request: Request) -> Reply:
        """``POST /nodes/challenge`` ChallengeResponse -> node session (403 if it fails)."""
        message = ChallengeResponse.from_payload(_obj(request))
        session = self.coordinator.complete_registration(message, self.clock())
        return Response.json(session.to_payload())

    async def heartbeat(self, request: Request) -> Reply:
        """``POST /nodes/heartbeat`` Heartbeat -> state, current config hash, jobs to abort."""
        node_id = self._node(request)
        beat = Heartbeat.from_payload(_obj(request))
        reply = self.coordinator.heartbeat(node_id, beat, self.clock())
        return Response.json(reply.to_payload())

    async def lease(self, request: Request) -> Reply:
        """``POST /nodes/lease`` LeaseRequest -> LeaseBatch, waiting up to ``wait_ms``."""
        node_id = self._node(request)
        message = LeaseRequest.from_payload(_obj(request))
        if message.node_id != node_id:
            raise NodeAuthError("lease node_id does not match the session")
        wait = min(message.wait_ms / 1000, self.max_lease_wait_s)
        deadline = anyio.current_time() + wait
        # Re-lease at least this often: a lease counts as a sign of life.
        slice_s = max(0.05, self.coordinator.settings.heartbeat_timeout_s / 3)
        while True:
            waiter = self._waiter(self._node_waiters, node_id)
            batch = self.coordinator.lease(node_id, message.max_jobs, self.clock())
            remaining = deadline - anyio.current_time()
            if batch.leases or remaining <= 0 or self.closing:
                break
            with anyio.move_on_after(min(remaining, slice_s)):
                await waiter.wait()
        if batch.leases and request.is_disconnected():
            self.coordinator.return_leases(node_id, [x.job_id for x in batch.leases],
                                           self.clock())
            batch = LeaseBatch(())
        return Response.json(batch.to_payload())

    async def events_in(self, request: Request) -> Reply:
        """``POST /nodes/events`` ``{"events": [JobEvent...]}`` (or one JobEvent) -> the job
        ids the node must abort."""
        node_id = self._node(request)
        body = _obj(request)
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
        return Response.json({"_type": "events_reply", "cancel": list(cancel)})

    async def receipt(self, request: Request) -> Reply:
        """``POST /nodes/receipt`` ReceiptSubmit -> how the job was settled."""
        node_id = self._node(request)
        message = ReceiptSubmit.from_payload(_obj(request))
        outcome = self.coordinator.submit_receipt(node_id, message.receipt, self.clock())
        return Response.json(outcome.to_payload())

    async def config_pointer(self, request: Request) -> Reply:
        """``GET /config`` -> ``{"config_hash", "version"}`` of the current snapshot (404)."""
        current = self.coordinator.current_config()
        if current is None:
            return _error(404, "no config snapshot has been published", "no_config")
        return Response.json({"_type": "config_pointer", "config_hash": current[0],
                              "version": current[1].version})

    async def config_snapshot(self, request: Request) -> Reply:
        """``GET /config/{hash}`` -> the signed snapshot envelope (404 if unknown)."""
        envelope = self.coordinator.snapshot(request.path_params["config_hash"])
        if envelope is None:
            return _error(404, "no snapshot with this hash", "unknown_snapshot")
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

    # --- Cloud routes -------------------------------------------------------------------------

    def _counts(self) -> dict[str, int]:
        nodes = self.coordinator.list_nodes()
        with self.coordinator.store.transaction() as tx:
            active = tx.list_jobs(ACTIVE_JOB_STATES)
        return {
            "nodes_live": sum(1 for n in nodes if n.state != NodeState.DEAD),
            "nodes_ready": sum(1 for n in nodes if n.state == NodeState.READY),
            "queue_depth": sum(1 for j in active if j.state == JobState.QUEUED),
            "jobs_in_flight": sum(1 for j in active if j.state != JobState.QUEUED),
        }

    async def auth(self, request: Request) -> Reply:
        """``POST /auth`` ``{"api_key"}`` -> ``{"account_id", "name"}`` (401 unknown key)."""
        key = _obj(request).get("api_key")
        account_id = self.coordinator.authenticate(key if isinstance(key, str) else "")
        return Response.json({"account_id": account_id, "name": account_id})

    async def models(self, request: Request) -> Reply:
        """``GET /models`` -> ``{"data": [{"id", "price", "max_model_len", "created",
        "owned_by", "nodes"}]}`` for the current config."""
        current = self.coordinator.current_config()
        data = []
        if current is not None:
            config = current[1]
            for model in self.coordinator.list_models():
                data.append({
                    "id": model.name,
                    "version": model.version,
                    "price": {"prompt_per_1k": model.price.prompt_per_1k,
                              "completion_per_1k": model.price.completion_per_1k},
                    "max_model_len": config.runtime.max_model_len,
                    "created": config.issued_at,
                    "owned_by": "resultity",
                    "nodes": model.ready_nodes,
                })
        return Response.json({"object": "list", "data": data})

    async def status(self, request: Request) -> Reply:
        """``GET /status`` -> nodes live/ready, queue depth, jobs in flight."""
        return Response.json(self._counts())

    async def submit(self, request: Request) -> Reply:
        """``POST /jobs`` ``{"account_id", "model", "request", "reserve"?, "choices"?,
        "prompt_tokens_estimate"?, "max_tokens"?}`` -> the job (400/402/404/503 errors)."""
        body = _obj(request)
        account_id, model, payload = body.get("account_id"), body.get("model"), body.get(
            "request")
        if not isinstance(account_id, str) or not account_id:
            raise InvalidAPIKeyError("account_id is required")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("model is required", param="model")
        if not isinstance(payload, dict):
            raise InvalidRequestError("request must be a JSON object", param="request")
        reserve = body.get("reserve")
        choices = body.get("choices")
        job = self.coordinator.submit_job(
            account_id, model, decimalize(payload), now=self.clock(),
            prompt_tokens_estimate=_int_field(body, "prompt_tokens_estimate", 0),
            max_tokens=_int_field(body, "max_tokens", 0),
            reserve=None if reserve is None else _int_field(body, "reserve"),
            choices=None if choices is None else _int_field(body, "choices"),
        )
        return Response.json(_job_json(job))

    async def job(self, request: Request) -> Reply:
        """``GET /jobs/{job_id}`` -> the job's state and money."""
        return Response.json(_job_json(self.coordinator.get_job(request.path_params["job_id"])))

    async def events_out(self, request: Request) -> Reply:
        """``GET /jobs/{job_id}/events?after=N`` -> SSE: one JobEvent payload per event, then
        ``[DONE]``. Closing the stream before the job ends cancels the job."""
        job_id = request.path_params["job_id"]
        after = request.query_params().get("after", ["0"])[0]
        start = int(after) if after.isdigit() else 0
        self.coordinator.job_events(job_id, start)  # 404 before the stream starts
        return StreamingResponse.sse(self._event_stream(job_id, start))

    async def _event_stream(self, job_id: str, index: int) -> AsyncIterator[bytes]:
        finished = False
        try:
            while True:
                waiter = self._waiter(self._job_waiters, job_id)
                view = self.coordinator.job_events(job_id, index)
                index = view.next_index
                if view.events:
                    yield b"".join(encode_event(e.to_payload()) for e in view.events)
                if view.finished:
                    finished = True
                    yield encode_event("[DONE]")
                    return
                with anyio.move_on_after(self.keepalive_s) as scope:
                    await waiter.wait()
                if scope.cancelled_caught:
                    yield encode_comment("keep-alive")
        finally:
            if not finished:
                try:
                    self.coordinator.cancel_job(job_id, self.clock())
                except ResultityError:
                    log.exception("cancelling job %s after its stream closed", job_id)
                self.wake()

    async def cancel(self, request: Request) -> Reply:
        """``POST /jobs/{job_id}/cancel`` -> the job (idempotent)."""
        job = self.coordinator.cancel_job(request.path_params["job_id"], self.clock())
        return Response.json(_job_json(job))

    # --- operator routes ----------------------------------------------------------------------

    async def accounts(self, request: Request) -> Reply:
        """``GET /accounts`` -> every account's balance."""
        data = [_balance_json(b) for b in self.coordinator.list_accounts()]
        return Response.json({"object": "list", "data": data})

    async def create_account(self, request: Request) -> Reply:
        """``POST /accounts`` ``{"account_id"?, "public_key"?, "credits"?}`` -> the account
        and its API key (shown once)."""
        body = _obj(request)
        public = body.get("public_key")
        account_id = body.get("account_id")
        record, key = self.coordinator.create_account(
            self.clock(),
            account_id=account_id if isinstance(account_id, str) and account_id else None,
            public_key=PublicKey.from_hex(public, "public_key") if public is not None else None,
            initial_credits=_int_field(body, "credits", 0),
        )
        balance = self.coordinator.account_balance(record.account_id)
        return Response.json({**_balance_json(balance), "api_key": key,
                              "public_key": record.public_key}, status=201)

    async def account(self, request: Request) -> Reply:
        """``GET /accounts/{account_id}`` -> balance and reservations."""
        balance = self.coordinator.account_balance(request.path_params["account_id"])
        return Response.json(_balance_json(balance))

    async def credit(self, request: Request) -> Reply:
        """``POST /accounts/{account_id}/credit`` ``{"amount"}`` -> the new balance."""
        amount = _int_field(_obj(request), "amount")
        balance = self.coordinator.credit_account(request.path_params["account_id"], amount,
                                                  self.clock())
        return Response.json(_balance_json(balance))

    async def new_key(self, request: Request) -> Reply:
        """``POST /accounts/{account_id}/keys`` -> a new API key (shown once)."""
        account_id = request.path_params["account_id"]
        key = self.coordinator.create_api_key(account_id, self.clock())
        return Response.json({"account_id": account_id, "api_key": key}, status=201)

    async def account_key(self, request: Request) -> Reply:
        """``POST /accounts/{account_id}/public-key`` ``{"public_key"}`` (hex or null)."""
        public = _obj(request).get("public_key")
        record = self.coordinator.set_account_key(
            request.path_params["account_id"],
            PublicKey.from_hex(public, "public_key") if public is not None else None,
        )
        return Response.json({"account_id": record.account_id, "public_key": record.public_key})


def _job_json(job: JobRecord) -> dict[str, Any]:
    return {
        "job_id": job.job_id, "account_id": job.account_id, "model": job.model,
        "state": str(job.state), "node_id": job.node_id, "attempts": job.attempts,
        "reserved": job.reserved, "charge": job.charge, "settled": job.settled,
        "prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
        "error": job.error, "created": job.created, "first_token_at": job.first_token_at,
    }


def _balance_json(balance: AccountBalance) -> dict[str, Any]:
    return {"account_id": balance.account_id, "balance": balance.balance,
            "reserved": balance.reserved}
