"""RMSNorm (+ residual) and rotary embedding kernels against their references and the model."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import randn, rel_err

from resultity_kernels import apply_rotary, apply_rotary_ref, rms_norm, rms_norm_ref


@pytest.mark.parametrize("n", [1, 17])
@pytest.mark.parametrize("hidden", [48, 256])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(target, n, hidden, with_residual):
    device, dtype, tol = target
    gen = torch.Generator().manual_seed(n * hidden)
    x = randn(n, 2 * hidden, device=device, dtype=dtype, gen=gen)[:, :hidden]  # strided rows
    w = randn(hidden, device=device, dtype=dtype, gen=gen)
    res = randn(n, hidden, device=device, dtype=dtype, gen=gen) if with_residual else None
    out, new_res = rms_norm(x, w, 1e-5, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-5, res)
    assert rel_err(out, ref) < tol
    if with_residual:
        assert new_res is not None
        assert torch.equal(new_res, ref_res)
    else:
        assert new_res is None


def test_rms_norm_matches_the_model_norm():
    from resultity_runtime._model import RMSNorm

    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    x = torch.randn(5, 64)
    ref, _ = rms_norm_ref(x, norm.weight.detach(), 1e-6)
    assert torch.allclose(norm(x).detach(), ref, rtol=1e-5, atol=1e-6)


def _inv_freq(d: int, device: torch.device) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))


@pytest.mark.parametrize("n", [1, 17])
def test_rotary_matches_reference(target, n):
    device, dtype, tol = target
    d = 32 if device.type == "cpu" else 128
    gen = torch.Generator().manual_seed(n)
    qk = randn(n, 6, d, device=device, dtype=dtype, gen=gen)
    q, k = qk[:, :4], qk[:, 4:]  # views into one tensor, as the model passes them
    positions = torch.randint(0, 4096, (n,), generator=gen).to(device)
    inv_freq = _inv_freq(d, device)
    expect = qk.clone()
    apply_rotary_ref(expect[:, :4], expect[:, 4:], positions, inv_freq)
    apply_rotary(q, k, positions, inv_freq)
    assert rel_err(qk, expect) < tol


def test_rotary_reference_matches_the_model_rotation():
    from resultity_runtime._model import _rotate

    d = 16
    q = torch.randn(7, 3, d)
    k = torch.randn(7, 1, d)
    positions = torch.arange(100, 107)
    inv_freq = _inv_freq(d, torch.device("cpu"))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    want_q, want_k = _rotate(q, emb.cos(), emb.sin()), _rotate(k, emb.cos(), emb.sin())
    apply_rotary_ref(q, k, positions, inv_freq)
    assert torch.allclose(q, want_q, atol=1e-5)
    assert torch.allclose(k, want_k, atol=1e-5)


def test_norm_and_rotary_reject_bad_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_ref(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_ref(x, torch.ones(8), 1e-5, torch.randn(3, 9))
    q = torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rotary_ref(q, q.clone(), torch.arange(2), torch.ones(3))
    with pytest.raises(ValueError, match="positions"):
        apply_rotary_ref(q, q.clone(), torch.arange(3), torch.ones(4))
