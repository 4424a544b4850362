"""The Cloud's HTTP application: OpenAI routes, health, metrics, auth and error mapping."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import anyio

from resultity_core import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    NoCapacityError,
    OpenAIRequestError,
    invalid_request,
    model_not_found,
    parse_chat_request,
    parse_completion_request,
)
from resultity_servers._http import (
    HTTPClientError,
    Request,
    Response,
    Router,
    StreamingResponse,
    json_error_response,
)

from ._auth import AuthCache
from ._jobs import JobRun, job_request, reservation
from ._metrics import CloudMetrics
from ._network import (
    Account,
    JobSubmission,
    ModelInfo,
    NetworkClient,
    NetworkStatus,
    network_unavailable,
)
from ._responses import (
    ChatShape,
    ClosingStream,
    CompletionShape,
    Shape,
    error_response,
    full_response,
    stream_response,
)

__all__ = ["CloudApp"]

_ROUTES = {
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/health",
    "/metrics",
}
_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STATUS_TIMEOUT_S = 2.0

Reply = Response | StreamingResponse


def _route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _json_body(request: Request) -> object:
    """Return the decoded JSON body; raises ``InvalidRequestError`` (400) otherwise."""
    ctype = request.header("content-type")
    if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
        raise invalid_request(
            f"Unsupported content type {ctype.split(';')[0].strip()!r}; "
            "send the body as 'application/json'.",
            code="invalid_content_type",
        )
    try:
        return json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_request(
            f"The request body is not valid JSON: {exc}.", code="invalid_json"
        ) from None


class CloudApp:
    """The public OpenAI-compatible API over a ``NetworkClient``; an HTTP handler.

    ``auth_ttl_s`` is how long a valid key is remembered; ``models_ttl_s`` how long the model
    list is reused between requests.
    """

    def __init__(
        self,
        network: NetworkClient,
        *,
        metrics: CloudMetrics | None = None,
        auth_ttl_s: float = 30.0,
        models_ttl_s: float = 2.0,
    ) -> None:
        self.network = network
        self.metrics = metrics or CloudMetrics()
        self.auth = AuthCache(network, ttl_s=auth_ttl_s)
        self.models_ttl_s = models_ttl_s
        self._models: tuple[float, list[ModelInfo]] | None = None
        self.router = Router(error_response=json_error_response)
        handlers: list[tuple[str, str, Callable[[Request], Awaitable[Reply]]]] = [
            ("GET", "/v1/models", self.models),
            ("GET", "/v1/models/{model}", self.model),
            ("POST", "/v1/chat/completions", self.chat),
            ("POST", "/v1/completions", self.completions),
            ("GET", "/health", self.health),
            ("GET", "/metrics", self.metrics_text),
        ]
        for method, path, handler in handlers:
            self.router.add(method, path, self._guard(handler))

    # --- middleware ----------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Reply:
        """Serve one request and record it in the metrics."""
        route = _route_label(request.path)
        started = time.perf_counter()
        self.metrics.in_flight.add(1)
        try:
            response = await self.router(request)
        except anyio.get_cancelled_exc_class():
            self._done(route, 499, started)  # the client went away (nginx's "closed request")
            raise
        except BaseException:
            self._done(route, 500, started)
            raise
        if isinstance(response, StreamingResponse):
            status = response.status
            return StreamingResponse(
                ClosingStream(response.chunks, lambda: self._done(route, status, started)),
                response.status,
                response.headers,
            )
        self._done(route, response.status, started)
        return response

    def _done(self, route: str, status: int, started: float) -> None:
        self.metrics.in_flight.add(-1)
        self.metrics.requests.inc(route, str(status))
        self.metrics.duration.observe(time.perf_counter() - started, route)

    def _guard(
        self, handler: Callable[[Request], Awaitable[Reply]]
    ) -> Callable[[Request], Awaitable[Reply]]:
        async def guarded(request: Request) -> Reply:
            try:
                return await handler(request)
            except OpenAIRequestError as exc:
                return error_response(exc)
            except HTTPClientError as exc:
                return error_response(network_unavailable(str(exc)))

        return guarded

    # --- helpers -------------------------------------------------------------------------------

    async def _account(self, request: Request) -> Account:
        return await self.auth.account(request.header("authorization"))

    async def _model_list(self) -> list[ModelInfo]:
        now = time.monotonic()
        if self._models is not None and self._models[0] > now:
            return self._models[1]
        models = await self.network.list_models()
        self._models = (now + self.models_ttl_s, models)
        return models

    async def _find_model(self, name: str) -> ModelInfo:
        for model in await self._model_list():
            if model.id == name:
                return model
        self._models = None  # perhaps just added: ask again next time
        raise model_not_found(name)

    async def _status(self) -> NetworkStatus:
        with anyio.fail_after(_STATUS_TIMEOUT_S):
            status = await self.network.status()
        self.metrics.nodes_live.set(status.nodes_live)
        self.metrics.nodes_ready.set(status.nodes_ready)
        self.metrics.queue_depth.set(status.queue_depth)
        return status

    # --- routes --------------------------------------------------------------------------------

    async def models(self, request: Request) -> Reply:
        """``GET /v1/models``: every model the Network routes."""
        await self._account(request)
        cards = tuple(
            ModelCard(id=m.id, created=m.created, owned_by=m.owned_by)
            for m in await self._model_list()
        )
        return Response.json(ModelList(data=cards).to_dict())

    async def model(self, request: Request) -> Reply:
        """``GET /v1/models/{model}``: one model card, 404 if unknown."""
        await self._account(request)
        m = await self._find_model(request.path_params["model"])
        return Response.json(
            {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
        )

    async def chat(self, request: Request) -> Reply:
        """``POST /v1/chat/completions``."""
        account = await self._account(request)
        parsed = parse_chat_request(_json_body(request))
        return await self._generate(request, account, parsed, "chat", ChatShape(parsed))

    async def completions(self, request: Request) -> Reply:
        """``POST /v1/completions``."""
        account = await self._account(request)
        parsed = parse_completion_request(_json_body(request))
        shape = CompletionShape(parsed)
        return await self._generate(request, account, parsed, "completion", shape)

    async def _generate(
        self,
        request: Request,
        account: Account,
        parsed: ChatCompletionRequest | CompletionRequest,
        kind: str,
        shape: Shape,
    ) -> Reply:
        started = time.perf_counter()
        model = await self._find_model(parsed.model)
        worst = reservation(parsed, model)
        job = JobSubmission(
            kind,
            model.id,
            job_request(parsed),
            worst.cost,
            shape.choices,
            prompt_tokens_estimate=worst.prompt_tokens,
            max_tokens=worst.completion_tokens,
        )
        handle = await self.network.submit(account, job)
        run = JobRun(self.network, handle, self.metrics, _route_label(request.path), started)
        if parsed.stream:
            return await stream_response(run, shape, parsed.include_usage)
        return await full_response(run, shape)

    async def health(self, request: Request) -> Reply:
        """``GET /health`` (no auth): 200 when a node can serve, else 503."""
        try:
            status = await self._status()
        except TimeoutError:
            raise network_unavailable("timed out (network status)") from None
        if status.nodes_ready <= 0:
            raise NoCapacityError(
                "No node is ready to serve; the cloud cannot answer requests yet."
            )
        return Response.json({"status": "ok"})

    async def metrics_text(self, request: Request) -> Reply:
        """``GET /metrics`` (no auth): Prometheus text; network gauges refreshed if possible."""
        try:
            await self._status()
        except (OpenAIRequestError, HTTPClientError, TimeoutError):
            self.metrics.nodes_ready.set(0)
        return Response.text(self.metrics.render(), content_type=_METRICS_TYPE)
