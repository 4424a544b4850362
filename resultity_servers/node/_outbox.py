"""The Agent's outbox: job events and receipts to the Network, in order, batched.

Consecutive events (of any jobs) go in one ``post_events`` call of at most ``MAX_BATCH``;
receipts go one by one in their place in the queue, so a job's receipt always follows its
events. What is urgent goes at once (when no call is in flight; what arrives during a call
goes in the next one): a job's first event (its first token, on the path to the client's time
to first token), an event that ends a job (``done``, ``error``) and a receipt. A job's later
tokens wait up to ``linger_s`` for company: tokens come one per engine step, faster than the
Network answers only under load, so without the wait nearly every token cost one HTTP
request. The wait delays only tokens between a job's first and its last.

A failure to reach the Network is retried (the Network drops events it already has, by
``seq``); a refusal (4xx, or a lost session whose jobs the Network has given up) drops the
item. Job ids the Network answers with are handed to ``on_cancel``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from resultity_core import JobEvent, ReceiptSubmit

from ._transport import NetworkTransport, SessionLostError, TransportError

__all__ = ["LINGER_S", "MAX_BATCH", "RETRY_S", "Outbox"]

log = logging.getLogger("resultity.node")
MAX_BATCH = 256
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)
LINGER_S = 0.005


def _urgent(item: JobEvent | ReceiptSubmit) -> bool:
    return not isinstance(item, JobEvent) or item.kind != "token" or item.seq == 0


class Outbox:
    """Queue of what the Agent must tell the Network; ``run()`` sends it until cancelled."""

    def __init__(self, transport: NetworkTransport, on_cancel: Callable[[str], None], *,
                 linger_s: float = LINGER_S) -> None:
        self.transport = transport
        self.on_cancel = on_cancel
        self.linger_s = linger_s
        self._items: list[JobEvent | ReceiptSubmit] = []
        self._urgent = 0  # how many queued items are urgent
        self._first_at = 0.0  # when the oldest queued item was put
        self._ready = anyio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: JobEvent | ReceiptSubmit) -> None:
        """Queue an event or a receipt (never blocks)."""
        if not self._items:
            self._first_at = anyio.current_time()
        self._items.append(item)
        if _urgent(item):
            self._urgent += 1
        self._ready.set()

    def _events(self) -> list[JobEvent]:
        out: list[JobEvent] = []
        for item in self._items:
            if not isinstance(item, JobEvent) or len(out) >= MAX_BATCH:
                break
            out.append(item)
        return out

    async def _wait(self) -> bool:
        # True when the queue should be sent now; otherwise waits for news (or the linger).
        if not self._items:
            self._ready = anyio.Event()
            await self._ready.wait()
            return False
        if self._urgent or len(self._items) >= MAX_BATCH:
            return True
        left = self._first_at + self.linger_s - anyio.current_time()
        if left <= 0:
            return True
        self._ready = anyio.Event()
        with anyio.move_on_after(left):
            await self._ready.wait()
        return False

    async def run(self) -> None:
        """Send the queue in order, forever."""
        failures = 0
        while True:
            if not await self._wait():
                continue
            head = self._items[0]
            events = [] if isinstance(head, ReceiptSubmit) else self._events()
            cancel: tuple[str, ...] = ()
            started = anyio.current_time()
            try:
                if isinstance(head, ReceiptSubmit):
                    await self.transport.submit_receipt(head)
                else:
                    cancel = await self.transport.post_events(events)
            except TransportError as exc:
                if exc.retryable and not isinstance(exc, SessionLostError):
                    failures += 1
                    await anyio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                    continue
                log.warning("the network refused %s: %s", type(head).__name__, exc)
            failures = 0
            sent = max(1, len(events))
            self._urgent -= sum(1 for item in self._items[:sent] if _urgent(item))
            del self._items[:sent]
            if self._items:
                # What came in during the call has waited since (at most) its start.
                self._first_at = started
            for job_id in cancel:
                self.on_cancel(job_id)
