"""TorchAttentionBackend against a naive per-sequence causal attention, over random batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from resultity_runtime._attention import TorchAttentionBackend, build_metadata

TOL = 1e-5


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [T, Hq, D] are the last T positions of a context k/v: [S, Hkv, D]
    t, hq, _ = q.shape
    s, hkv, _ = k.shape
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    allowed = torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


@given(
    seqs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=1, max_size=5),
    block_size=st.sampled_from([1, 4, 16]),
    groups=st.sampled_from([1, 2, 4]),
    decode_only=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_backend_matches_naive_attention(
    seqs: list[tuple[int, int]], block_size: int, groups: int, decode_only: bool, seed: int
) -> None:
    if decode_only:
        seqs = [(ctx, 1) for ctx, _ in seqs]
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, 8
    hq = hkv * groups
    need = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen)  # finite garbage
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, contexts = [], []
    for (ctx, n), nb in zip(seqs, need, strict=True):
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        full_k = torch.randn(ctx + n, hkv, d, generator=gen)
        full_v = torch.randn(ctx + n, hkv, d, generator=gen)
        for pos in range(ctx):  # the cached prefix, as earlier steps would have written it
            k_cache[table[pos // block_size], pos % block_size] = full_k[pos]
            v_cache[table[pos // block_size], pos % block_size] = full_v[pos]
        contexts.append((full_k, full_v))
    meta = build_metadata([n for _, n in seqs], [c + n for c, n in seqs], tables, block_size)
    q = torch.randn(sum(n for _, n in seqs), hq, d, generator=gen)
    k = torch.cat([fk[c:] for (c, _), (fk, _) in zip(seqs, contexts, strict=True)])
    v = torch.cat([fv[c:] for (c, _), (_, fv) in zip(seqs, contexts, strict=True)])
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, d**-0.5)
    assert out.shape == q.shape
    assert meta.max_query_len == max(n for _, n in seqs)
    start = 0
    for (_, n), (fk, fv) in zip(seqs, contexts, strict=True):
        ref = _naive(q[start:start + n], fk, fv, d**-0.5)
        assert (out[start:start + n] - ref).abs().max().item() < TOL
        start += n
    # the new k/v were written at their slots
    flat_k = k_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[meta.slot_mapping], k)


def test_build_metadata_checks_its_arguments() -> None:
    meta = build_metadata([3, 1], [3, 18], [[5], [2, 7]], 16)
    assert meta.slot_mapping.tolist() == [80, 81, 82, 7 * 16 + 1]
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.block_tables.tolist() == [[5, 0], [2, 7]]
    assert (meta.max_query_len, meta.max_seq_len) == (3, 18)
    assert meta.python_lens() == ([3, 1], [3, 18])
    meta.query_lens = None
    assert meta.python_lens() == ([3, 1], [3, 18])
    with pytest.raises(ValueError, match="query_lens"):
        build_metadata([4], [3], [[0]], 16)
    with pytest.raises(ValueError, match="block_tables"):
        build_metadata([1], [17], [[0]], 16)
    with pytest.raises(ValueError, match="same non-zero length"):
        build_metadata([], [], [], 16)
