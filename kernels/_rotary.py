"""Rotary position embedding (GPT-NeoX layout: the two halves of each head rotate), in place."""

from __future__ import annotations

import torch

from ._triton_compat import check_device, check_tensor, interpreting, lazy_jit, next_pow2, tl

__all__ = ["apply_rotary", "apply_rotary_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@lazy_jit
def _rotary_kernel(
    x_ptr, pos_ptr, inv_freq_ptr, stride_n, stride_h, num_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # one program per token: rotates all its heads of one tensor (q or k)
    n = tl.program_id(0)
    pos = tl.load(pos_ptr + n).to(tl.float32)
    j = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)[:, None]
    jm = j < half
    freq = pos * tl.load(inv_freq_ptr + j, mask=jm, other=0.0)  # [BLOCK_HALF], float32
    cos = tl.cos(freq)[None, :]
    sin = tl.sin(freq)[None, :]
    mask = (h < num_heads) & jm[None, :]
    p1 = x_ptr + n.to(tl.int64) * stride_n + h * stride_h + j[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + half, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(p1 + half, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           inv_freq: torch.Tensor) -> None:
    check_tensor("q", q, ndim=3, dtypes=_FLOATS, last_contiguous=True)
    n, _, d = q.shape
    if d % 2:
        raise ValueError(f"q has an odd head dim {d}; rotary needs two halves")
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device, shape=(n, None, d),
                 last_contiguous=True)
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int64, torch.int32),
                 device=q.device, shape=(n,))
    check_tensor("inv_freq", inv_freq, ndim=1, dtypes=(torch.float32,), device=q.device,
                 shape=(d // 2,), contiguous=True)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    """Rotate ``q`` [N, Hq, D] and ``k`` [N, Hkv, D] in place for token ``positions`` [N].

    Angles are ``positions * inv_freq`` ([D/2], float32) computed in float32, and the first and
    second halves of each head form the rotated pairs (transformers' ``rotate_half``). Returns
    None.

    Raises:
        ValueError: a shape, dtype, stride or device does not fit (the message names the argument).
        KernelUnavailableError: triton is not installed.
    """
    _check(q, k, positions, inv_freq)
    check_device("q", q)
    n, _, d = q.shape
    if n == 0:
        return
    for x in (q, k):
        _rotary_kernel[(n,)](
            x, positions, inv_freq, x.stride(0), x.stride(1), x.shape[1], d // 2,
            BLOCK_H=next_pow2(x.shape[1]), BLOCK_HALF=next_pow2(d // 2),
            num_warps=1 if interpreting() else 4,
        )


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    """PyTorch reference of :func:`apply_rotary` (same contract, any device). Returns None."""
    _check(q, k, positions, inv_freq)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [N, D/2]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
