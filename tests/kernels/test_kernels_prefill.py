"""Prefill attention kernel against its reference: varlen, GQA, causal, paged prefix."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import cu_seqlens, paged_cache, randn, rel_err

from resultity_kernels import prefill_attention, prefill_attention_ref


def _head_dims(device: torch.device) -> list[int]:
    return [16, 32] if device.type == "cpu" else [64, 128]


def _run(target, lens, hq, hkv, d, prefix=None, page=16, config=None, seed=0):
    device, dtype, tol = target
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = randn(n, hq, d, device=device, dtype=dtype, gen=gen)
    k = randn(n, hkv, d, device=device, dtype=dtype, gen=gen)
    v = randn(n, hkv, d, device=device, dtype=dtype, gen=gen)
    cu = cu_seqlens(lens, device)
    kwargs = {}
    if prefix is not None:
        seq = [p + m for p, m in zip(prefix, lens, strict=True)]
        k_cache, v_cache, tables = paged_cache(seq, page, hkv, d, device=device, dtype=dtype,
                                               gen=gen)
        kwargs = {"k_cache": k_cache, "v_cache": v_cache, "block_tables": tables,
                  "seq_lens": torch.tensor(seq, dtype=torch.int32, device=device)}
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k, v, cu, max(lens), 0.3, out=out, config=config, **kwargs)
    ref = prefill_attention_ref(q, k, v, cu, None, 0.3, **kwargs)
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err}"
    return out


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("lens", [[1], [17], [1, 17, 16, 33], [32, 5]])
def test_prefill_matches_reference(target, lens, hq, hkv):
    for d in _head_dims(target[0]):
        _run(target, lens, hq, hkv, d)


@pytest.mark.parametrize(
    ("prefix", "lens"),
    [([15], [1]), ([16], [17]), ([17, 0, 40], [3, 17, 16]), ([1, 31], [32, 1])],
)
def test_prefill_with_paged_prefix_matches_reference(target, prefix, lens):
    d = _head_dims(target[0])[0]
    _run(target, lens, 4, 2, d, prefix=prefix)


def test_prefill_other_tile_shapes(target):
    device = target[0]
    config = (32, 16, 1, 1) if device.type == "cpu" else (64, 64, 4, 2)
    _run(target, [1, 40, 77], 4, 2, _head_dims(device)[-1], config=config, prefix=[3, 0, 20])


def test_prefill_is_causal(target):
    device, dtype, _ = target
    d = _head_dims(device)[0]
    gen = torch.Generator().manual_seed(7)
    q = randn(20, 2, d, device=device, dtype=dtype, gen=gen)
    k = randn(20, 2, d, device=device, dtype=dtype, gen=gen)
    v = randn(20, 2, d, device=device, dtype=dtype, gen=gen)
    cu = cu_seqlens([20], device)
    base = prefill_attention(q, k, v, cu, 20)
    k2, v2 = k.clone(), v.clone()
    k2[12:] = -k2[12:]
    v2[12:] = 7.0
    moved = prefill_attention(q, k2, v2, cu, 20)
    assert torch.equal(base[:12], moved[:12])  # earlier tokens never see later keys
    assert not torch.equal(base[12:], moved[12:])


@pytest.mark.slow
def test_prefill_long_sequence(target):
    device = target[0]
    config = (64, 32, 1, 1) if device.type == "cpu" else None
    _run(target, [1025, 3], 2, 1, 32 if device.type == "cpu" else 128, config=config)


def test_prefill_rejects_bad_arguments():
    q = torch.randn(5, 4, 16)
    k = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple"):
        prefill_attention_ref(q, torch.randn(5, 3, 16), torch.randn(5, 3, 16), cu)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        prefill_attention_ref(q, k, k, cu.long())
    with pytest.raises(ValueError, match="v has dtype"):
        prefill_attention_ref(q, k, k.double(), cu)
    with pytest.raises(ValueError, match="all four or none"):
        prefill_attention_ref(q, k, k, cu, k_cache=torch.randn(2, 16, 2, 16))


def test_prefill_can_leave_single_token_rows_to_the_decode_kernel(target):
    device, dtype, tol = target
    d = _head_dims(device)[0]
    gen = torch.Generator().manual_seed(5)
    lens, prefix = [1, 17, 1], [20, 3, 0]
    seq = [p + m for p, m in zip(prefix, lens, strict=True)]
    q = randn(19, 4, d, device=device, dtype=dtype, gen=gen)
    k = randn(19, 2, d, device=device, dtype=dtype, gen=gen)
    v = randn(19, 2, d, device=device, dtype=dtype, gen=gen)
    k_cache, v_cache, tables = paged_cache(seq, 16, 2, d, device=device, dtype=dtype, gen=gen)
    kwargs = {"k_cache": k_cache, "v_cache": v_cache, "block_tables": tables,
              "seq_lens": torch.tensor(seq, dtype=torch.int32, device=device)}
    cu = cu_seqlens(lens, device)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k, v, cu, 17, out=out, skip_single_token=True, **kwargs)
    ref = prefill_attention_ref(q, k, v, cu, **kwargs)
    assert out[0].isnan().all()
    assert out[18].isnan().all()
    assert rel_err(out[1:18], ref[1:18]) < tol
