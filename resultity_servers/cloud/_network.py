"""What the Cloud needs from the Network: the ``NetworkClient`` interface and its data types.

The Cloud authenticates API keys, lists models, submits jobs with a worst-case credit
reservation, follows a job's events and cancels jobs, all through this interface. Two
implementations sit beside it: ``HTTPNetworkClient`` (the Network's internal routes over
httpcore) and ``FakeNetwork`` (in memory, for tests and demos without nodes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import attrs

from resultity_core import NoCapacityError, OpenAIRequestError, Price

__all__ = [
    "Account",
    "DoneEvent",
    "ErrorEvent",
    "JobEvent",
    "JobHandle",
    "JobSubmission",
    "ModelInfo",
    "NetworkClient",
    "NetworkStatus",
    "TokenEvent",
    "TokenLogprob",
    "network_unavailable",
]


@attrs.frozen
class Account:
    """The account an API key belongs to (the key itself is never kept)."""

    account_id: str
    name: str = ""


@attrs.frozen
class ModelInfo:
    """A model the Network can route: its id, price and context length.

    ``max_model_len`` bounds prompt plus completion tokens; ``nodes`` is how many live nodes
    serve it now (0: known but not servable).
    """

    id: str
    price: Price
    max_model_len: int
    created: int = 0
    owned_by: str = "resultity"
    nodes: int = 0


@attrs.frozen
class NetworkStatus:
    """The Network's view of capacity: live nodes, nodes ready to serve, queued jobs."""

    nodes_live: int
    nodes_ready: int
    queue_depth: int = 0
    jobs_in_flight: int = 0


@attrs.frozen
class JobSubmission:
    """One job for the Network: ``kind`` is ``chat`` or ``completion``.

    ``request`` is the JSON form of the parsed OpenAI request (``request_to_dict``);
    ``choices`` the number of choices it produces (``n`` times the number of prompts).
    The worst case the Network reserves credits for: ``prompt_tokens_estimate`` (never below
    the real prompt) and ``max_tokens`` (completion tokens over all choices); ``reserve`` is
    their cost at the model's price in micro-credits, held until the node's receipt settles it.
    """

    kind: str
    model: str
    request: dict[str, object]
    reserve: int
    choices: int
    prompt_tokens_estimate: int = 0
    max_tokens: int = 0


@attrs.frozen
class JobHandle:
    """A submitted job: ``job_id`` as the Network names it."""

    job_id: str
    model: str


@attrs.frozen
class TokenLogprob:
    """The logprob of one generated token and its top alternatives ``(token, logprob)``."""

    token: str
    logprob: float
    bytes: tuple[int, ...] | None = None
    top: tuple[tuple[str, float], ...] = ()


@attrs.frozen
class TokenEvent:
    """New text of choice ``index``; ``tokens`` is how many tokens it holds."""

    index: int
    text: str
    tokens: int = 1
    logprobs: tuple[TokenLogprob, ...] | None = None


@attrs.frozen
class DoneEvent:
    """Choice ``index`` finished; ``usage`` (prompt, completion tokens of the whole job so far)
    is set at least on the job's last choice to finish."""

    index: int
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@attrs.frozen
class ErrorEvent:
    """The job failed; ``error`` carries the OpenAI status and body to report."""

    error: OpenAIRequestError


JobEvent = TokenEvent | DoneEvent | ErrorEvent


def network_unavailable(detail: str) -> NoCapacityError:
    """Return the 503 for a Network that could not be reached or answered nonsense;
    ``detail`` says what happened. The user may retry."""
    return NoCapacityError(f"The network is unavailable right now; retry later. ({detail})")


@runtime_checkable
class NetworkClient(Protocol):
    """The Cloud's view of the Network. Implementations raise ``OpenAIRequestError``
    subclasses for failures the user should see (401, 402, 404, 503)."""

    async def authenticate(self, api_key: str) -> Account | None:
        """Return the account that owns ``api_key``, or None for an unknown key.

        Raises ``NoCapacityError`` (503) when the Network cannot be asked.
        """
        ...

    async def list_models(self) -> list[ModelInfo]:
        """Return the models the Network routes. Raises ``NoCapacityError`` if unreachable."""
        ...

    async def status(self) -> NetworkStatus:
        """Return live/ready node counts and queue depth. Raises ``NoCapacityError``."""
        ...

    async def submit(self, account: Account, job: JobSubmission) -> JobHandle:
        """Reserve ``job.reserve`` credits from ``account`` and queue the job.

        Raises ``InsufficientQuotaError`` (402), ``ModelNotFoundError`` (404),
        ``NoCapacityError`` (503) or ``InvalidRequestError`` (400).
        """
        ...

    def events(self, job: JobHandle) -> AsyncIterator[JobEvent]:
        """Return the job's events: tokens, one ``DoneEvent`` per choice, or an
        ``ErrorEvent`` that ends it. The iterator ends after the last choice is done."""
        ...

    async def cancel(self, job: JobHandle) -> None:
        """Abort the job on its node (idempotent; a finished job is left as it is)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
