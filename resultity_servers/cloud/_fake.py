"""An in-memory ``NetworkClient``: accounts, models and a scripted node, for tests and demos.

The fake "node" answers every choice with a deterministic text (``reply``), split into
word tokens, and honours ``max_tokens``, ``stop``, ``seed`` and ``logprobs`` the way the
engine does, so the Cloud's handling of each can be checked without torch. Knobs inject
failures (``fail_submit``, ``fail_after_tokens``) and slowness (``token_delay_s``); every
submission and cancellation is recorded.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import attrs

from resultity_core import (
    InternalServerError,
    OpenAIRequestError,
    Price,
    insufficient_quota,
    model_not_found,
    no_capacity,
)

from ._network import (
    Account,
    DoneEvent,
    ErrorEvent,
    JobEvent,
    JobHandle,
    JobSubmission,
    ModelInfo,
    NetworkStatus,
    TokenEvent,
    TokenLogprob,
)

__all__ = ["FakeJob", "FakeNetwork", "default_reply"]

_WORD = re.compile(r"\s*\S+")


def default_reply(job: JobSubmission, index: int) -> str:
    """Return the fake node's answer for choice ``index``: it names the choice and the seed."""
    seed = job.request.get("seed")
    tail = f" seed {seed}" if seed is not None else ""
    return f"Hello from resultity, choice {index}{tail}. The end."


def prompt_text(job: JobSubmission) -> str:
    """Return the job's prompt as one string (chat messages joined)."""
    request = job.request
    if job.kind == "chat":
        messages: Any = request.get("messages", [])
        parts = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = "\n".join(str(p.get("text", "")) for p in content)
            parts.append(str(content or ""))
        return "\n".join(parts)
    prompts: Any = request.get("prompt", [])
    return "\n".join(prompts) if isinstance(prompts, list) else str(prompts)


@attrs.define
class FakeJob:
    """What the fake recorded about one job."""

    handle: JobHandle
    account: Account
    submission: JobSubmission
    cancelled_at: float | None = None
    finished: bool = False
    tokens_sent: int = 0
    charged: int = 0


def _hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class FakeNetwork:
    """An in-memory Network (see the module docstring); implements ``NetworkClient``."""

    def __init__(
        self,
        *,
        models: list[ModelInfo] | None = None,
        reply: Callable[[JobSubmission, int], str] = default_reply,
    ) -> None:
        self.models = (
            models
            if models is not None
            else [ModelInfo("tiny", Price(1000, 2000), max_model_len=2048, created=1, nodes=1)]
        )
        self.reply = reply
        self.keys: dict[str, Account] = {}
        self.balances: dict[str, int] = {}
        self.jobs: dict[str, FakeJob] = {}
        self.auth_calls = 0
        self.token_delay_s = 0.0
        self.first_token_delay_s = 0.0
        self.fail_submit: OpenAIRequestError | None = None
        self.fail_after_tokens: int | None = None
        self.queue_depth = 0
        self.unreachable = False
        self.cancelled = anyio.Event()
        self._ids = itertools.count(1)

    # --- setup ---------------------------------------------------------------------------------

    def add_account(self, api_key: str, credits: int = 10**9, name: str = "") -> Account:
        """Create an account owning ``api_key`` with ``credits`` micro-credits; return it."""
        account = Account(f"acct-{len(self.keys) + 1}", name)
        self.keys[_hash_key(api_key)] = account
        self.balances[account.account_id] = credits
        return account

    def set_nodes(self, count: int) -> None:
        """Set how many live nodes serve every model."""
        self.models = [attrs.evolve(m, nodes=count) for m in self.models]

    # --- NetworkClient -------------------------------------------------------------------------

    def _check_reachable(self) -> None:
        if self.unreachable:
            raise no_capacity()

    async def authenticate(self, api_key: str) -> Account | None:
        """Return the key's account or None."""
        self._check_reachable()
        self.auth_calls += 1
        return self.keys.get(_hash_key(api_key))

    async def list_models(self) -> list[ModelInfo]:
        """Return the configured models."""
        self._check_reachable()
        return list(self.models)

    async def status(self) -> NetworkStatus:
        """Return the node count of the best-served model as live and ready nodes."""
        self._check_reachable()
        nodes = max((m.nodes for m in self.models), default=0)
        in_flight = sum(1 for j in self.jobs.values() if not j.finished)
        return NetworkStatus(nodes, nodes, self.queue_depth, in_flight)

    async def submit(self, account: Account, job: JobSubmission) -> JobHandle:
        """Check model, nodes and credits like the Network; record and return the job."""
        self._check_reachable()
        if self.fail_submit is not None:
            raise self.fail_submit
        model = next((m for m in self.models if m.id == job.model), None)
        if model is None:
            raise model_not_found(job.model)
        if model.nodes <= 0:
            raise no_capacity(job.model)
        balance = self.balances.get(account.account_id, 0)
        if job.reserve > balance:
            raise insufficient_quota(job.reserve, balance)
        handle = JobHandle(f"job-{next(self._ids)}", job.model)
        self.jobs[handle.job_id] = FakeJob(handle, account, job)
        return handle

    async def events(self, job: JobHandle) -> AsyncIterator[JobEvent]:
        """Generate every choice, one word token at a time, choices interleaved."""
        record = self.jobs[job.job_id]
        sub = record.submission
        request = sub.request
        max_tokens: Any = request.get("max_completion_tokens") or request.get("max_tokens")
        stops: Any = request.get("stop") or []
        lp_field = request.get("logprobs")
        if sub.kind == "chat":
            want_logprobs = lp_field is True
        else:
            want_logprobs = isinstance(lp_field, int) and not isinstance(lp_field, bool)
        top: Any = request.get("top_logprobs") if sub.kind == "chat" else request.get("logprobs")
        plans = [self._plan(sub, i, max_tokens, stops) for i in range(sub.choices)]
        prompt_tokens = len(_WORD.findall(prompt_text(sub)))
        if self.first_token_delay_s:
            await anyio.sleep(self.first_token_delay_s)
        position = 0
        longest = max((len(t) for t, _ in plans), default=0)
        last_index = max(i for i, (t, _) in enumerate(plans) if len(t) == longest)
        for step in range(longest + 1):
            for index, (tokens, reason) in enumerate(plans):
                if record.cancelled_at is not None:
                    return
                if step < len(tokens):
                    if self.fail_after_tokens is not None and (
                        record.tokens_sent >= self.fail_after_tokens
                    ):
                        record.finished = True
                        yield ErrorEvent(InternalServerError("the node failed mid-stream"))
                        return
                    if self.token_delay_s:
                        await anyio.sleep(self.token_delay_s)
                    record.tokens_sent += 1
                    position += 1
                    lp = _logprobs(tokens[step], position, top or 0) if want_logprobs else None
                    yield TokenEvent(index, tokens[step], 1, lp)
                elif step == len(tokens):
                    if step == longest and index == last_index:
                        record.finished = True
                        used = record.tokens_sent
                        self._settle(record, prompt_tokens, used)
                        yield DoneEvent(index, reason, prompt_tokens, used)
                    else:
                        yield DoneEvent(index, reason)

    async def cancel(self, job: JobHandle) -> None:
        """Record the cancellation (time included); charge only the tokens sent."""
        record = self.jobs.get(job.job_id)
        if record is None or record.cancelled_at is not None:
            return
        record.cancelled_at = time.monotonic()
        if not record.finished:
            record.finished = True
            prompt_tokens = len(_WORD.findall(prompt_text(record.submission)))
            self._settle(record, prompt_tokens, record.tokens_sent)
        self.cancelled.set()

    async def aclose(self) -> None:
        """Nothing to release."""

    # --- helpers -------------------------------------------------------------------------------

    def _plan(
        self, sub: JobSubmission, index: int, max_tokens: int | None, stops: list[str]
    ) -> tuple[list[str], str]:
        text = self.reply(sub, index)
        reason = "stop"
        cut = min((p for p in (text.find(s) for s in stops) if p >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        tokens = _WORD.findall(text)
        if max_tokens is not None and len(tokens) > max_tokens:
            tokens, reason = tokens[:max_tokens], "length"
        return tokens, reason

    def _settle(self, record: FakeJob, prompt_tokens: int, completion_tokens: int) -> None:
        model = next(m for m in self.models if m.id == record.handle.model)
        cost = (
            prompt_tokens * model.price.prompt_per_1k
            + completion_tokens * model.price.completion_per_1k
        ) // 1000
        record.charged = min(cost, record.submission.reserve)
        account = record.account.account_id
        self.balances[account] = self.balances.get(account, 0) - record.charged


def _logprobs(token: str, position: int, top: int) -> tuple[TokenLogprob, ...]:
    logprob = -0.25 * position
    alternatives = [(token, logprob)] + [(f"alt{k}", logprob - k) for k in range(1, top)]
    return (TokenLogprob(token, logprob, tuple(token.encode()), tuple(alternatives[:top])),)
