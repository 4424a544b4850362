"""The Agent's outbox: job events and receipts to the Network, in order, batched.

Consecutive events (of any jobs) go in one ``post_events`` call of at most ``MAX_BATCH``;
receipts go one by one in their place in the queue, so a job's receipt always follows its
events. A failure to reach the Network is retried (the Network drops events it already has, by
``seq``); a refusal (4xx, or a lost session whose jobs the Network has given up) drops the
item. Job ids the Network answers with are handed to ``on_cancel``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from resultity_core import JobEvent, ReceiptSubmit

from ._transport import NetworkTransport, SessionLostError, TransportError

__all__ = ["MAX_BATCH", "RETRY_S", "Outbox"]

log = logging.getLogger("resultity.node")
MAX_BATCH = 256
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class Outbox:
    """Queue of what the Agent must tell the Network; ``run()`` sends it until cancelled."""

    def __init__(self, transport: NetworkTransport, on_cancel: Callable[[str], None]) -> None:
        self.transport = transport
        self.on_cancel = on_cancel
        self._items: list[JobEvent | ReceiptSubmit] = []
        self._ready = anyio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: JobEvent | ReceiptSubmit) -> None:
        """Queue an event or a receipt (never blocks)."""
        self._items.append(item)
        self._ready.set()

    def _events(self) -> list[JobEvent]:
        out: list[JobEvent] = []
        for item in self._items:
            if not isinstance(item, JobEvent) or len(out) >= MAX_BATCH:
                break
            out.append(item)
        return out

    async def run(self) -> None:
        """Send the queue in order, forever."""
        failures = 0
        while True:
            if not self._items:
                self._ready = anyio.Event()
                await self._ready.wait()
                continue
            head = self._items[0]
            events = [] if isinstance(head, ReceiptSubmit) else self._events()
            cancel: tuple[str, ...] = ()
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
            del self._items[:max(1, len(events))]
            for job_id in cancel:
                self.on_cancel(job_id)
