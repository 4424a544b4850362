"""The Network's routes for the Cloud (service token): API keys, models, jobs, events;
and for operators: accounts, credits, keys."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import anyio

from resultity_core import (
    InternalServerError,
    InvalidAPIKeyError,
    InvalidRequestError,
    JobEvent,
    JobState,
    NoCapacityError,
    NodeState,
    OpenAIRequestError,
    PublicKey,
    ResultityError,
    encode_comment,
    encode_event,
)
from resultity_servers._http import Request, Response, StreamingResponse

from ._coordinator import Coordinator
from ._http_util import (
    Reply,
    balance_json,
    decimalize,
    int_field,
    job_json,
    json_object,
    waiter,
)
from ._store import ACTIVE_JOB_STATES

__all__ = ["JOB_ID_HEADER", "CloudRoutes"]

JOB_ID_HEADER = "x-job-id"
"""The header naming the job of a ``POST /jobs`` answered with its event stream."""

log = logging.getLogger("resultity.network")

# How long the head of a streamed submit handed straight to a node waits for the first event:
# longer than the node takes to start the job, far shorter than a first token.
_LEASED_HEAD_HOLD_S = 0.002


class CloudRoutes:
    """Handlers of the Cloud and operator routes; mixed into ``NetworkApp``."""

    coordinator: Coordinator
    clock: Callable[[], float]
    keepalive_s: float
    _job_waiters: dict[str, anyio.Event]

    def wake(self) -> None:
        """Wake waiters the coordinator has news for (``NetworkApp`` implements it)."""
        raise NotImplementedError

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
        key = json_object(request).get("api_key")
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
        "prompt_tokens_estimate"?, "max_tokens"?, "stream"?}`` -> the job (400/402/404/503
        errors).

        With ``"stream": true`` the answer is instead the job's event stream, as ``GET
        /jobs/{job_id}/events`` sends it, with the job id in the ``x-job-id`` header: one
        round trip instead of two. Closing that stream before the job ends cancels the job.
        Refusals are the same JSON errors in both forms.
        """
        body = json_object(request)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequestError("stream must be a boolean", param="stream")
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
            prompt_tokens_estimate=int_field(body, "prompt_tokens_estimate", 0),
            max_tokens=int_field(body, "max_tokens", 0),
            reserve=None if reserve is None else int_field(body, "reserve"),
            choices=None if choices is None else int_field(body, "choices"),
        )
        hold = 0.0
        if job.state == JobState.LEASED:
            # Handed to the node's waiting lease poll: let it answer the node before this
            # answers the Cloud (on a loop shared with them, the lease is on the path to the
            # first token; the Cloud's answer is not, it only needs it before that token).
            # The streamed answer's head also waits a little for the first event, so the
            # Cloud does not read it while the node starts the job.
            self.wake()
            await anyio.sleep(0)
            hold = _LEASED_HEAD_HOLD_S
        if stream:
            return StreamingResponse.sse(self._event_stream(job.job_id, 0),
                                         headers={JOB_ID_HEADER: job.job_id},
                                         hold_head_s=hold)
        return Response.json(job_json(job))

    async def job(self, request: Request) -> Reply:
        """``GET /jobs/{job_id}`` -> the job's state and money."""
        return Response.json(job_json(self.coordinator.get_job(request.path_params["job_id"])))

    async def events_out(self, request: Request) -> Reply:
        """``GET /jobs/{job_id}/events?after=N`` -> SSE: one JobEvent payload per event, then
        ``[DONE]``. Closing the stream before the job ends cancels the job."""
        job_id = request.path_params["job_id"]
        after = request.query_params().get("after", ["0"])[0]
        start = int(after) if after.isdigit() else 0
        self.coordinator.job_events(job_id, start)  # 404 before the stream starts
        return StreamingResponse.sse(self._event_stream(job_id, start))

    async def _event_stream(self, job_id: str, index: int) -> AsyncIterator[bytes]:
        finished = delivered = False
        try:
            while True:
                wakeup = waiter(self._job_waiters, job_id)
                view = self.coordinator.job_events(job_id, index)
                index = view.next_index
                if view.events:
                    yield b"".join(_encode(e, view.error_code) for e in view.events)
                if view.finished:
                    finished = True
                    yield encode_event("[DONE]")
                    delivered = True
                    return
                with anyio.move_on_after(self.keepalive_s) as scope:
                    await wakeup.wait()
                if scope.cancelled_caught:
                    yield encode_comment("keep-alive")
        finally:
            # Drop this job's waiter (one per job, else it stays in the dict for good); set
            # it so that another stream of the same job, if any, looks again and re-creates it.
            event = self._job_waiters.pop(job_id, None)
            if event is not None:
                event.set()
            if delivered:
                self.coordinator.stream_delivered(job_id, self.clock())
            elif not finished:
                try:
                    self.coordinator.cancel_job(job_id, self.clock())
                except ResultityError:
                    log.exception("cancelling job %s after its stream closed", job_id)
                self.wake()

    async def cancel(self, request: Request) -> Reply:
        """``POST /jobs/{job_id}/cancel`` -> the job (idempotent)."""
        job = self.coordinator.cancel_job(request.path_params["job_id"], self.clock())
        return Response.json(job_json(job))

    # --- operator routes ----------------------------------------------------------------------

    async def accounts(self, request: Request) -> Reply:
        """``GET /accounts`` -> every account's balance."""
        data = [balance_json(b) for b in self.coordinator.list_accounts()]
        return Response.json({"object": "list", "data": data})

    async def create_account(self, request: Request) -> Reply:
        """``POST /accounts`` ``{"account_id"?, "public_key"?, "credits"?}`` -> the account
        and its API key (shown once)."""
        body = json_object(request)
        public = body.get("public_key")
        account_id = body.get("account_id")
        record, key = self.coordinator.create_account(
            self.clock(),
            account_id=account_id if isinstance(account_id, str) and account_id else None,
            public_key=PublicKey.from_hex(public, "public_key") if public is not None else None,
            initial_credits=int_field(body, "credits", 0),
        )
        balance = self.coordinator.account_balance(record.account_id)
        return Response.json({**balance_json(balance), "api_key": key,
                              "public_key": record.public_key}, status=201)

    async def account(self, request: Request) -> Reply:
        """``GET /accounts/{account_id}`` -> balance and reservations."""
        balance = self.coordinator.account_balance(request.path_params["account_id"])
        return Response.json(balance_json(balance))

    async def ledger(self, request: Request) -> Reply:
        """``GET /accounts/{account_id}/ledger`` -> the account's journal entries."""
        entries = self.coordinator.ledger_entries(request.path_params["account_id"])
        data = [{"seq": e.seq, "at": e.at, "kind": e.kind, "amount": e.amount,
                 "job_id": e.job_id} for e in entries]
        return Response.json({"object": "list", "data": data})

    async def credit(self, request: Request) -> Reply:
        """``POST /accounts/{account_id}/credit`` ``{"amount"}`` -> the new balance."""
        amount = int_field(json_object(request), "amount")
        balance = self.coordinator.credit_account(request.path_params["account_id"], amount,
                                                  self.clock())
        return Response.json(balance_json(balance))

    async def new_key(self, request: Request) -> Reply:
        """``POST /accounts/{account_id}/keys`` -> a new API key (shown once)."""
        account_id = request.path_params["account_id"]
        key = self.coordinator.create_api_key(account_id, self.clock())
        return Response.json({"account_id": account_id, "api_key": key}, status=201)

    async def account_key(self, request: Request) -> Reply:
        """``POST /accounts/{account_id}/public-key`` ``{"public_key"}`` (hex or null)."""
        public = json_object(request).get("public_key")
        record = self.coordinator.set_account_key(
            request.path_params["account_id"],
            PublicKey.from_hex(public, "public_key") if public is not None else None,
        )
        return Response.json({"account_id": record.account_id, "public_key": record.public_key})


def _encode(event: JobEvent, error_code: str | None) -> bytes:
    """One SSE event: a JobEvent payload, or for an error the Network raised itself an
    ``event: error`` with an OpenAI error body (503 ``no_capacity`` when no node could run
    the job, else a server error naming ``error_code``)."""
    if event.kind != "error" or error_code is None:
        return encode_event(event.to_payload())
    message = event.error or "the job failed"
    error: OpenAIRequestError = (
        NoCapacityError(message) if error_code == "no_capacity"
        else InternalServerError(message, code=error_code)
    )
    return encode_event(error.to_error_body(), event="error")
