"""The continuous batching scheduler, driven by a fake model that checks the KV cache."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from resultity_runtime._scheduler import (
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
)


class FakeModel:
    """Records, per cache slot, which token prefix its KV belongs to, and checks every read."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.cache: dict[int, tuple[int, ...]] = {}

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        bs = self.sched.config.block_size
        bm = self.sched.block_manager
        written: set[int] = set()
        sampled: dict[int, int] = {}
        for item in out.scheduled:
            seq = item.seq
            table = item.block_table
            assert item.start == seq.num_computed_tokens
            assert item.start + item.num_new_tokens <= seq.num_tokens
            assert len(table) * bs >= item.start + item.num_new_tokens
            # every earlier position must hold the KV of exactly this prefix
            for p in range(item.start):
                slot = table[p // bs] * bs + p % bs
                assert self.cache.get(slot) == tuple(seq.token_ids[: p + 1]), (seq.seq_id, p)
            for p in range(item.start, item.start + item.num_new_tokens):
                block = table[p // bs]
                assert bm.ref_counts[block] == 1, "writing into a shared block"
                slot = block * bs + p % bs
                assert slot not in written, "two tokens write one slot in a step"
                written.add(slot)
                self.cache[slot] = tuple(seq.token_ids[: p + 1])
            if item.sample:
                # a deterministic "model": tokens depend only on the prefix, so recompute after
                # preemption and prefix caching cannot change outputs
                sampled[seq.seq_id] = (sum(seq.token_ids) * 31 + seq.num_tokens) % 3
        return sampled


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(4, 24),
        block_size=st.sampled_from([1, 2, 4]),
        max_num_seqs=st.integers(1, 6),
        extra_budget=st.integers(0, 12),
        caching=st.booleans(),
    )
    def setup(
        self, num_blocks: int, block_size: int, max_num_seqs: int, extra_budget: int, caching: bool
    ) -> None:
        self.cfg = SchedulerConfig(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_seqs + extra_budget,
            enable_prefix_caching=caching,
        )
        self.sched = Scheduler(self.cfg)
        self.model = FakeModel(self.sched)
        self.max_new: dict[int, int] = {}
        self.live: set[int] = set()
        self.finished: set[int] = set()
        self.aborted: set[int] = set()
        self.next_id = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=30), max_new=st.integers(1, 8))
    def add(self, prompt: list[int], max_new: int) -> None:
        cap = self.sched.max_seq_len
        prompt = prompt[: cap - 1] or [0]
        max_new = min(max_new, cap - len(prompt))
        sid = self.next_id
        self.next_id += 1
        self.sched.add(Sequence(sid, list(prompt)))
        self.max_new[sid] = max_new
        self.live.add(sid)

    def _step(self) -> None:
        sched = self.sched
        decoding = {s.seq_id for s in sched.running if s.num_tokens - s.num_computed_tokens == 1}
        out = sched.schedule()
        ids = [item.seq.seq_id for item in out.scheduled]
        assert len(ids) == len(set(ids))
        assert out.num_batched_tokens == sum(i.num_new_tokens for i in out.scheduled)
        assert out.num_batched_tokens <= self.cfg.max_num_batched_tokens
        assert len(sched.running) <= self.cfg.max_num_seqs
        assert all(i.num_new_tokens >= 1 for i in out.scheduled)
        # decodes are never starved by prefill: each runs or was preempted
        assert decoding <= set(ids) | set(out.preempted)
        if sched.has_unfinished() and not sched.running:
            pytest.fail("work is waiting but nothing runs")
        sampled = self.model.run(out)
        sched.postprocess(out, sampled)
        for sid in sampled:
            seq = sched.get(sid)
            assert seq is not None
            if seq.num_output_tokens >= self.max_new[sid]:
                assert sched.finish(sid)
                self.live.discard(sid)
                self.finished.add(sid)

    @rule()
    def step(self) -> None:
        self._step()

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.live)))
        free_before = self.sched.block_manager.num_free_blocks
        owned = len(self.sched.block_manager.tables().get(sid, []))
        assert self.sched.abort(sid)
        # blocks come back at once (shared ones stay with their other owners)
        assert self.sched.block_manager.num_free_blocks >= free_before + (
            0 if self.cfg.enable_prefix_caching else owned
        )
        assert not self.sched.block_manager.has(sid)
        assert not self.sched.abort(sid)
        self.live.discard(sid)
        self.aborted.add(sid)

    @invariant()
    def pool_is_consistent(self) -> None:
        bm = self.sched.block_manager
        bm.check_invariants()
        assert set(bm.tables()) == {s.seq_id for s in self.sched.running}
        owned = {b for t in bm.tables().values() for b in t}
        assert len(owned) + bm.num_free_blocks == self.cfg.num_blocks

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        # no starvation: everything left finishes within a bounded number of steps
        bound = 50 + 40 * (len(self.live) + 1) * (30 + 8)
        for _ in range(bound):
            if not self.sched.has_unfinished():
                break
            self._step()
            self.pool_is_consistent()
        assert not self.sched.has_unfinished(), "requests starved"
        assert not self.live
        assert self.sched.block_manager.num_free_blocks == self.cfg.num_blocks
        assert all(r == 0 for r in self.sched.block_manager.ref_counts)


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def _drive(sched: Scheduler, max_new: dict[int, int]) -> dict[int, list[int]]:
    model = FakeModel(sched)
    outputs: dict[int, list[int]] = {}
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        sampled = model.run(out)
        sched.postprocess(out, sampled)
        for sid in sampled:
            seq = sched.get(sid)
            assert seq is not None
            if seq.num_output_tokens >= max_new[sid]:
                outputs[sid] = seq.token_ids[seq.num_prompt_tokens :]
                sched.finish(sid)
    assert not sched.has_unfinished()
    return outputs


def test_chunked_prefill_does_not_stall_decodes() -> None:
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    sched = Scheduler(cfg)
    sched.add(Sequence(0, [1, 2, 3]))
    out = sched.schedule()
    sched.postprocess(out, {0: 1})
    assert sched.running[0].num_tokens == 4
    sched.add(Sequence(1, list(range(40))))
    sizes = []
    for _ in range(5):
        out = sched.schedule()
        by_id = {i.seq.seq_id: i for i in out.scheduled}
        assert by_id[0].num_new_tokens == 1  # the decode runs every step
        sizes.append(by_id[1].num_new_tokens)
        sched.postprocess(out, {i.seq.seq_id: 0 for i in out.scheduled if i.sample})
    assert sizes == [7, 7, 7, 7, 7]


def test_full_pool_makes_requests_wait_and_preempts_the_youngest() -> None:
    # 6 blocks of 2 tokens: three 4-token prompts fit, their decodes do not
    sched = Scheduler(
        SchedulerConfig(num_blocks=6, block_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    )
    for sid in range(4):
        sched.add(Sequence(sid, [sid, 1, 2, 3]))
    out = sched.schedule()
    assert [i.seq.seq_id for i in out.scheduled] == [0, 1, 2]
    assert [s.seq_id for s in sched.waiting] == [3]
    sched.postprocess(out, {0: 0, 1: 0, 2: 0})
    out = sched.schedule()  # each needs a third block: the youngest running one is preempted
    assert out.preempted == [2]
    assert [i.seq.seq_id for i in out.scheduled] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2, 3]
    assert sched.waiting[0].num_computed_tokens == 0
    assert sched.waiting[0].num_tokens == 5  # recomputed with its generated token


def test_outputs_do_not_depend_on_pool_size_or_budget() -> None:
    prompts = {sid: [sid % 3, 1, 2] * (1 + sid % 4) for sid in range(10)}
    max_new = {sid: 3 + sid % 5 for sid in range(10)}
    results = []
    for num_blocks, budget, caching in [(200, 64, False), (12, 5, False), (12, 7, True)]:
        sched = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=2,
                max_num_seqs=5,
                max_num_batched_tokens=budget,
                enable_prefix_caching=caching,
            )
        )
        for sid, p in prompts.items():
            sched.add(Sequence(sid, list(p)))
        results.append(_drive(sched, max_new))
        assert sched.block_manager.num_free_blocks == num_blocks
    assert results[0] == results[1] == results[2]
    assert all(len(results[0][s]) == max_new[s] for s in prompts)


def test_add_validates() -> None:
    sched = Scheduler(SchedulerConfig(num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="exceeds"):
        sched.add(Sequence(0, list(range(9))))
    with pytest.raises(ValueError, match="at least one"):
        sched.add(Sequence(0, []))
    sched.add(Sequence(0, [1]))
    with pytest.raises(ValueError, match="in use"):
        sched.add(Sequence(0, [1]))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(num_blocks=2, max_num_seqs=8, max_num_batched_tokens=4)
    assert sched.get(0) is not None
    assert sched.get(0).status is SequenceStatus.WAITING


def test_scheduler_imports_no_torch() -> None:
    code = "import resultity_runtime._scheduler, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
