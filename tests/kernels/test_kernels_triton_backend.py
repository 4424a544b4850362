"""TritonAttentionBackend against TorchAttentionBackend over whole engine-shaped steps."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import randn, rel_err

from resultity_runtime._attention import TorchAttentionBackend, build_metadata

triton_backend = pytest.importorskip("resultity_runtime._triton_backend")


def _step(target, query_lens, seq_lens, hq=4, hkv=2, page=16, seed=0):
    """Run one step through both backends on identical caches; return both outputs, caches."""
    device, dtype, tol = target
    d = 32 if device.type == "cpu" else 128
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // page) for s in seq_lens]
    order = torch.randperm(sum(need) + 2, generator=gen).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n])
        used += n
    meta = build_metadata(query_lens, seq_lens, tables, page, device)
    num_blocks = sum(need) + 2
    # earlier tokens of every sequence are already cached; new tokens' slots start as NaN
    k_cache = randn(num_blocks, page, hkv, d, device=device, dtype=dtype, gen=gen)
    v_cache = randn(num_blocks, page, hkv, d, device=device, dtype=dtype, gen=gen)
    k_cache.view(-1, hkv, d)[meta.slot_mapping] = float("nan")
    v_cache.view(-1, hkv, d)[meta.slot_mapping] = float("nan")
    n = sum(query_lens)
    qkv = randn(n, (hq + 2 * hkv) * d, device=device, dtype=dtype, gen=gen)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    caches = (k_cache.clone(), v_cache.clone())
    out = triton_backend.TritonAttentionBackend().forward(q, k, v, *caches, meta, 0.25)
    ref = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.25)
    assert torch.equal(caches[0], k_cache)
    assert torch.equal(caches[1], v_cache)
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err}"


def test_decode_step_matches_torch_backend(target):
    _step(target, [1, 1, 1, 1], [1, 16, 17, 90])


def test_mixed_prefill_step_matches_torch_backend(target):
    # a fresh prompt, a chunk over a cached prefix, and two decode rows in one step
    _step(target, [17, 9, 1, 1], [17, 40, 33, 1])


def test_backend_name():
    assert triton_backend.TritonAttentionBackend.name == "triton"
