"""The Agent's outbox: a job's first event goes at once, later tokens are batched."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest

from resultity_core import JobEvent, JobUsage, ReceiptSubmit
from resultity_servers.node._outbox import Outbox

pytestmark = pytest.mark.anyio


class Recorder:
    """A transport that records what it is sent; ``post_events`` may take a while."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.sent: list[list[tuple[str, int, str]] | str] = []

    async def post_events(self, events: Sequence[JobEvent]) -> tuple[str, ...]:
        await anyio.sleep(self.delay_s)
        self.sent.append([(e.job_id, e.seq, e.kind) for e in events])
        return ()

    async def submit_receipt(self, submit: ReceiptSubmit) -> dict[str, Any]:
        self.sent.append("receipt")
        return {}


def token(job: str, seq: int) -> JobEvent:
    return JobEvent(job, seq, "token", index=0, text="x", token_ids=(1,))


def done(job: str, seq: int) -> JobEvent:
    return JobEvent(job, seq, "done", index=0, finish_reason="stop", usage=JobUsage(1, seq))


async def until(condition: Callable[[], object]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.002)


async def test_first_token_and_job_end_go_at_once_later_tokens_wait_for_company() -> None:
    net = Recorder()
    outbox = Outbox(net, lambda job_id: None, linger_s=30.0)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.run)
        outbox.put(token("a", 0))
        await until(lambda: net.sent)
        assert net.sent == [[("a", 0, "token")]]  # not held for the 30 s linger
        outbox.put(token("a", 1))
        outbox.put(token("a", 2))
        await anyio.sleep(0.1)
        assert len(net.sent) == 1  # later tokens wait
        assert len(outbox) == 2
        outbox.put(done("a", 3))  # the end of the job sends them with it
        outbox.put(ReceiptSubmit({"signed": {}, "signatures": []}))
        await until(lambda: len(net.sent) == 3)
        assert net.sent[1:] == [[("a", 1, "token"), ("a", 2, "token"), ("a", 3, "done")],
                                "receipt"]
        assert len(outbox) == 0
        tg.cancel_scope.cancel()


async def test_waiting_tokens_go_after_the_linger_and_batch_behind_a_call() -> None:
    net = Recorder(delay_s=0.2)
    outbox = Outbox(net, lambda job_id: None, linger_s=0.05)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.run)
        outbox.put(token("a", 0))
        await anyio.sleep(0.01)  # its call is in flight for 0.2 s
        outbox.put(token("b", 0))
        outbox.put(token("a", 1))
        await until(lambda: len(net.sent) == 2)
        assert net.sent[1] == [("b", 0, "token"), ("a", 1, "token")]  # one call after
        net.delay_s = 0.0
        start = anyio.current_time()
        outbox.put(token("a", 2))
        await until(lambda: len(net.sent) == 3)
        assert 0.04 <= anyio.current_time() - start < 1.0  # held for the linger only
        assert net.sent[2] == [("a", 2, "token")]
        tg.cancel_scope.cancel()
