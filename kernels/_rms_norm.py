"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer."""

from __future__ import annotations

import torch

from ._triton_compat import check_device, check_tensor, interpreting, lazy_jit, next_pow2, tl

__all__ = ["rms_norm", "rms_norm_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@lazy_jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the model dtype first, as the unfused `x + residual` is
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    y = (xf * rstd).to(x.dtype)  # normalised in float32, then rounded like the model does
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs,
             (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_tensor("x", x, ndim=2, dtypes=_FLOATS, last_contiguous=True)
    check_tensor("weight", weight, ndim=1, dtypes=(x.dtype,), device=x.device,
                 shape=(x.shape[1],), contiguous=True)
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device,
                     shape=tuple(x.shape), last_contiguous=True)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of the rows of ``x`` [N, H] scaled by ``weight`` [H] (all in x's dtype).

    With ``residual`` [N, H], normalises ``x + residual`` instead and also returns that sum (the
    next residual). Normalisation is computed in float32 and rounded to the model dtype before
    the weight multiplies it, like resultity_runtime's RMSNorm. Returns (out, new_residual or
    None).

    Raises:
        ValueError: a shape, dtype, stride or device does not fit (the message names the argument).
        KernelUnavailableError: triton is not installed.
    """
    _check(x, weight, residual)
    check_device("x", x)
    n, h = x.shape
    out = torch.empty((n, h), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else None
    if n == 0:
        return out, res_out
    res_in = residual if residual is not None else x
    res_dst = res_out if res_out is not None else out
    block = next_pow2(h)
    _rms_norm_kernel[(n,)](
        x, res_in, weight, out, res_dst,
        x.stride(0), res_in.stride(0), out.stride(0), res_dst.stride(0), h, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=1 if interpreting() else min(16, max(1, block // 256)),
    )
    return out, res_out


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference of :func:`rms_norm` (the unfused add + norm). Same returns and errors."""
    _check(x, weight, residual)
    res_out = None
    if residual is not None:
        x = x + residual
        res_out = x
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return weight * y, res_out
