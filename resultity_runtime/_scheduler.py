"""Continuous batching scheduler with chunked prefill, in plain Python (no torch).

Each step the scheduler picks, under a token budget (``max_num_batched_tokens``) and a
sequence cap (``max_num_seqs``):

1. one token for every running sequence that is decoding (oldest first); if one needs a new
   block and the pool is empty, the youngest running sequence is preempted (its blocks are
   freed and it goes back to the front of the waiting queue, to be recomputed later);
2. the next chunk of every running sequence whose prompt is only partly computed;
3. waiting sequences in arrival order (strict FIFO: the head waits for room rather than being
   overtaken), each admitted only if the pool has blocks for all its tokens; its first chunk
   is what remains of the budget, so a long prompt never stalls running decodes.

A sequence's tokens are its prompt plus its generated tokens; ``num_computed_tokens`` of them
have KV in the cache. A scheduled chunk computes the next ``num_new_tokens`` of them, and the
model samples a new token only when the chunk reaches the end (``sample``). Finishing and
aborting free the blocks immediately.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from resultity_runtime._block_manager import BlockManager

__all__ = [
    "ScheduledSequence",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


_arrivals = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """One generated stream: prompt tokens followed by its output tokens."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    arrival: int = field(default_factory=lambda: next(_arrivals))
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # every running sequence must be able to decode one token per step
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    start: int  # position of the first new token (= num_computed_tokens before the step)
    block_table: list[int]
    sample: bool  # the chunk reaches the last token: the model samples the next one


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[int]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides which sequences run each step and owns their KV blocks."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        cap = self.block_manager.capacity_tokens
        self.max_seq_len = min(cap, config.max_model_len) if config.max_model_len else cap
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival, oldest first
        self._seqs: dict[int, Sequence] = {}

    # ---- requests ------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queues ``seq``. Raises ValueError if it is empty, too long or its id is in use."""
        if not seq.token_ids:
            raise ValueError("a sequence needs at least one token")
        if seq.num_tokens > self.max_seq_len:
            raise ValueError(
                f"sequence of {seq.num_tokens} tokens exceeds the limit of {self.max_seq_len}"
            )
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already in use")
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _remove(self, seq_id: int, status: SequenceStatus) -> bool:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return False
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq_id)
        seq.status = status
        return True

    def finish(self, seq_id: int) -> bool:
        """Ends ``seq_id`` and frees its blocks now. Returns False if it was not live."""
        return self._remove(seq_id, SequenceStatus.FINISHED)

    def abort(self, seq_id: int) -> bool:
        """Cancels ``seq_id`` and frees its blocks now. Returns False if it was not live."""
        return self._remove(seq_id, SequenceStatus.ABORTED)

    # ---- one step ------------------------------------------------------------------------

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        """Returns the work of the next step (possibly empty) and reserves its KV slots."""
        cfg = self.config
        bm = self.block_manager
        budget = cfg.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[int] = []
        done: set[int] = set()

        def emit(seq: Sequence, n: int) -> None:
            start = seq.num_computed_tokens
            scheduled.append(
                ScheduledSequence(
                    seq, n, start, bm.block_table(seq.seq_id), start + n == seq.num_tokens
                )
            )
            done.add(seq.seq_id)

        # 1. decodes, oldest first; preempt the youngest when a block is missing
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            if seq.num_tokens - seq.num_computed_tokens != 1:
                continue
            while not bm.can_append(seq.seq_id, seq.num_tokens):
                victim = self.running[-1]
                assert victim.seq_id not in done
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.append_slots(seq.seq_id, seq.num_tokens)
            emit(seq, 1)
            budget -= 1

        # 2. running sequences still in (chunked) prefill; their blocks are already allocated
        for seq in self.running:
            if budget == 0:
                break
            if seq.seq_id in done:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            emit(seq, n)
            budget -= n

        # 3. admit waiting sequences in order while there is budget, room and no preemption
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= cfg.max_num_seqs:
                break
            seq = self.waiting[0]
            cached = bm.allocate(seq.seq_id, seq.token_ids)
            if cached is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = cached
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            n = min(seq.num_tokens - cached, budget)
            emit(seq, n)
            budget -= n

        return SchedulerOutput(scheduled, preempted, cfg.max_num_batched_tokens - budget)

    def postprocess(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Advances the scheduled sequences after the model ran.

        ``sampled`` maps the id of every scheduled sequence with ``sample`` set to its new
        token, which is appended. Sequences finished or aborted meanwhile are skipped.
        """
        bm = self.block_manager
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            bm.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if item.sample:
                seq.token_ids.append(sampled[seq.seq_id])
