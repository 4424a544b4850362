"""Paged decode attention kernel against its reference: splits, GQA packing, page boundaries."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import paged_cache, randn, rel_err

from resultity_kernels import paged_decode_attention, paged_decode_attention_ref


def _run(target, seq_lens, hq, hkv, d, *, num_splits=None, page=16, block_n=None, seed=0):
    device, dtype, tol = target
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = paged_cache(seq_lens, page, hkv, d, device=device, dtype=dtype,
                                           gen=gen)
    q = randn(len(seq_lens), hq, d, device=device, dtype=dtype, gen=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, tables, lens, max(seq_lens), 0.2, out=out,
                           num_splits=num_splits, block_n=block_n)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, None, 0.2)
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err}"


def _head_dim(device: torch.device) -> int:
    return 32 if device.type == "cpu" else 128


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 2), (14, 2)])
def test_decode_matches_reference(target, hq, hkv, num_splits):
    _run(target, [1, 17, 16, 32, 100], hq, hkv, _head_dim(target[0]), num_splits=num_splits)


@pytest.mark.parametrize("page", [8, 16, 32])
def test_decode_page_sizes_and_lengths_at_page_edges(target, page):
    lens = [page - 1, page, page + 1, 3 * page]
    _run(target, lens, 4, 1, 16 if target[0].type == "cpu" else 64, page=page, num_splits=2)


def test_decode_more_splits_than_a_short_sequence_needs(target):
    # splits past the end of the short sequences must contribute nothing to the merge
    _run(target, [1, 2, 130], 4, 2, _head_dim(target[0]), num_splits=8)


@pytest.mark.slow
def test_decode_long_context(target):
    device = target[0]
    block_n = 64 if device.type == "cpu" else None
    _run(target, [1025, 7], 8, 2, _head_dim(device), block_n=block_n)


def test_decode_rejects_bad_arguments():
    q = torch.randn(2, 4, 16)
    cache = torch.randn(4, 16, 2, 16)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention_ref(q, cache, cache, tables.long(), lens)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention_ref(q, cache, cache, tables, lens[:1])
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention_ref(torch.randn(2, 3, 16), cache, cache, tables, lens)
    with pytest.raises(ValueError, match="contiguous"):
        paged_decode_attention_ref(q, cache.transpose(0, 1), cache, tables, lens)
