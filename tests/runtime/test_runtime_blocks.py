"""The KV block pool: allocation, growth, freeing and prefix caching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resultity_runtime._block_manager import BlockManager


def test_allocate_grow_free_round_trip() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate(1, list(range(5))) == 0
    assert len(bm.block_table(1)) == 2
    assert bm.num_free_blocks == 2
    assert bm.can_append(1, 8)
    bm.append_slots(1, 8)
    assert len(bm.block_table(1)) == 2  # 8 tokens still fit in two blocks
    bm.append_slots(1, 9)
    assert len(bm.block_table(1)) == 3
    assert not bm.can_append(1, 17)
    with pytest.raises(RuntimeError):
        bm.append_slots(1, 17)
    bm.check_invariants()
    bm.free(1)
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_allocate_refuses_without_room_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.allocate(1, list(range(8))) == 0
    assert bm.allocate(2, list(range(9))) is None
    assert not bm.has(2)
    assert bm.num_free_blocks == 1
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate(1, [1])
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(3, [])


def test_prefix_blocks_are_shared_only_when_computed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    prompt = list(range(10))  # two full blocks + 2 tokens
    assert bm.allocate(1, prompt) == 0
    # nothing computed yet: no sharing
    assert bm.allocate(2, prompt) == 0
    bm.free(2)
    bm.mark_computed(1, prompt, 10)
    assert bm.allocate(3, [*prompt, 99]) == 8
    assert bm.hit_tokens == 8
    assert bm.block_table(3)[:2] == bm.block_table(1)[:2]
    assert bm.block_table(3)[2] != bm.block_table(1)[2]
    assert bm.ref_counts[bm.block_table(1)[0]] == 2
    bm.check_invariants()
    # a different second block shares only the first
    other = [*prompt[:4], 50, 51, 52, 53, 54]
    assert bm.allocate(4, other) == 4
    bm.check_invariants()


def test_full_prompt_hit_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    prompt = list(range(8))
    bm.allocate(1, prompt)
    bm.mark_computed(1, prompt, 8)
    # the whole prompt is cached, but its last block must be recomputed for logits
    assert bm.allocate(2, prompt) == 4
    bm.check_invariants()


def test_freed_cached_blocks_are_revived_then_evicted() -> None:
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate(1, prompt)
    bm.mark_computed(1, prompt, 5)
    bm.free(1)
    assert bm.num_free_blocks == 3
    # revived from the free list
    assert bm.allocate(2, prompt) == 4
    assert bm.num_free_blocks == 0
    bm.check_invariants()
    bm.free(2)
    # unrelated tokens need every block: the cached ones are evicted
    assert bm.allocate(3, [9, 9, 9, 9, 9, 9]) == 0
    bm.free(3)
    assert bm.allocate(4, prompt) == 0
    bm.check_invariants()


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["alloc", "grow", "compute", "free"]),
            st.integers(0, 5),
            st.lists(st.integers(0, 2), min_size=1, max_size=14),
        ),
        max_size=60,
    ),
    caching=st.booleans(),
)
def test_random_operations_keep_the_pool_consistent(
    ops: list[tuple[str, int, list[int]]], caching: bool
) -> None:
    bm = BlockManager(num_blocks=6, block_size=3, enable_prefix_caching=caching)
    tokens: dict[int, list[int]] = {}
    for op, sid, toks in ops:
        if op == "alloc" and not bm.has(sid):
            before = bm.num_free_blocks
            cached = bm.allocate(sid, toks)
            if cached is None:
                assert bm.num_free_blocks == before
            else:
                assert cached % 3 == 0
                assert cached < len(toks)
                tokens[sid] = list(toks)
        elif op == "grow" and bm.has(sid):
            n = len(tokens[sid]) + len(toks)
            if bm.can_append(sid, n):
                bm.append_slots(sid, n)
                tokens[sid] += toks
                assert len(bm.block_table(sid)) * 3 >= n
        elif op == "compute" and bm.has(sid):
            bm.mark_computed(sid, tokens[sid], len(tokens[sid]))
        elif op == "free":
            bm.free(sid)
            tokens.pop(sid, None)
        bm.check_invariants()
        owned = {b for t in bm.tables().values() for b in t}
        assert len(owned) + bm.num_free_blocks == 6
    for sid in list(tokens):
        bm.free(sid)
    assert bm.num_free_blocks == 6
    assert all(r == 0 for r in bm.ref_counts)
