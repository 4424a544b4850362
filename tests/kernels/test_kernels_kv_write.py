"""KV cache write kernel against its reference: scattered slots, strided inputs, skipped slots."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import randn

from resultity_kernels import write_kv_cache, write_kv_cache_ref


@pytest.mark.parametrize("n", [1, 17, 64])
def test_write_matches_reference_and_touches_only_its_slots(target, n):
    device, dtype, _ = target
    gen = torch.Generator().manual_seed(n)
    page, hkv, d, hq = 16, 2, 32, 4
    num_blocks = n // page + 4
    # k and v are strided views into a fused qkv projection, as in the model
    qkv = randn(n, (hq + 2 * hkv) * d, device=device, dtype=dtype, gen=gen)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    slots = torch.randperm(num_blocks * page, generator=gen)[:n]
    if n > 1:
        slots[n // 2] = -1  # a padding token that owns no slot
    slots = slots.to(device)
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"), device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    write_kv_cache(k, v, k_cache, v_cache, slots)
    write_kv_cache_ref(k, v, k_ref, v_ref, slots)

    assert torch.equal(k_cache.isnan(), k_ref.isnan())
    assert torch.equal(torch.nan_to_num(k_cache), torch.nan_to_num(k_ref))
    assert torch.equal(torch.nan_to_num(v_cache), torch.nan_to_num(v_ref))
    written = (~k_cache.isnan()).all(-1).all(-1).sum().item()
    assert written == int((slots >= 0).sum())
    flat = k_cache.view(-1, hkv, d)
    keep = slots >= 0
    assert torch.equal(flat[slots[keep]], k[keep])


def test_write_rejects_bad_arguments():
    k = torch.randn(3, 2, 8)
    cache = torch.zeros(4, 16, 2, 8)
    slots = torch.arange(3)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache_ref(k, k, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="v_cache"):
        write_kv_cache_ref(k, k, cache, torch.zeros(4, 16, 2, 4), slots)
    with pytest.raises(ValueError, match="k "):
        write_kv_cache_ref(torch.randn(3, 3, 8), k, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="unit stride"):
        write_kv_cache_ref(torch.randn(3, 8, 2).transpose(1, 2), k, cache, cache.clone(), slots)
