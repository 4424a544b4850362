"""The Cloud: Resultity's public OpenAI-compatible API.

``CloudApp`` serves ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health`` and ``/metrics`` over a ``NetworkClient``; ``serve_cloud(CloudSettings(...))``
runs it on the shared HTTP layer. ``HTTPNetworkClient`` talks to the Network's internal
routes; ``FakeNetwork`` is the in-memory stand-in for tests. Importing this package never
imports torch.
"""

from __future__ import annotations

from ._app import CloudApp
from ._auth import AuthCache, bearer_token
from ._fake import FakeJob, FakeNetwork, default_reply
from ._http_network import ROUTES, HTTPNetworkClient, error_from_response, event_from_payload
from ._jobs import Estimate, job_request, reservation
from ._metrics import CloudMetrics
from ._network import (
    Account,
    DoneEvent,
    ErrorEvent,
    JobEvent,
    JobHandle,
    JobSubmission,
    ModelInfo,
    NetworkClient,
    NetworkStatus,
    TokenEvent,
    TokenLogprob,
)
from ._serve import CloudSettings, running_cloud, serve_cloud

__all__ = [
    "ROUTES",
    "Account",
    "AuthCache",
    "CloudApp",
    "CloudMetrics",
    "CloudSettings",
    "DoneEvent",
    "ErrorEvent",
    "Estimate",
    "FakeJob",
    "FakeNetwork",
    "HTTPNetworkClient",
    "JobEvent",
    "JobHandle",
    "JobSubmission",
    "ModelInfo",
    "NetworkClient",
    "NetworkStatus",
    "TokenEvent",
    "TokenLogprob",
    "bearer_token",
    "default_reply",
    "error_from_response",
    "event_from_payload",
    "job_request",
    "reservation",
    "running_cloud",
    "serve_cloud",
]
