"""Weight-only 4-bit quantization of the projections for CPU decode.

Each output row of a weight is cut into groups of ``group_size`` input columns; a group keeps
its minimum and a step ``(max - min) / 15`` and every weight becomes the nearest of the 16
levels ``min + q * step`` (round to nearest, no calibration data). Activations stay bfloat16
and the matmul runs in PyTorch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``),
which reads half a byte per weight plus 4 bytes of scale and offset per group, instead of
the 2 bytes per weight of a bfloat16 matmul: batch-1 decode, which streams every weight once
per token, moves about a quarter of the bytes.

The model is then not numerically the checkpoint: ``benchmarks/RESULTS.md`` gives the logit
error and the greedy agreement with the unquantized model next to the speed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "INT4_GROUP_SIZES",
    "INT4_MAX_ROWS",
    "QUANTIZATIONS",
    "Int4Weight",
    "dequantize_int4",
    "int4_available",
    "int4_eligible",
    "quantize_int4",
]

QUANTIZATIONS = ("int4",)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# steps of at most this many rows run the int4 kernel (measured on a 4096 x 768 weight, one
# thread: 155 / 202 / 289 us for 1 / 2 / 4 rows against 271-277 us for the bfloat16 matmul)
INT4_MAX_ROWS = 3
_ROWS_MULTIPLE = 16  # the packed layout holds output rows in blocks of 16

_mm: Any = None
_pack: Any = None
try:
    _mm = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    _pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu.default
except (AttributeError, RuntimeError):  # a torch build without the CPU int4 kernels
    pass
_linear_pointwise: Any = None
_reorder: Any = None
with contextlib.suppress(AttributeError, RuntimeError):
    _linear_pointwise = torch.ops.mkldnn._linear_pointwise.default
    _reorder = torch.ops.mkldnn._reorder_linear_weight


class Int4Weight:
    """A 4-bit weight ``[out, in]``: ``packed`` (the kernel's layout), ``scales_zeros``
    (bfloat16 ``[in / group, out, 2]``), ``group_size``, and ``wide``: the same quantized
    values as a bfloat16 matrix (oneDNN-prepacked when oneDNN is there) for steps of more
    than ``INT4_MAX_ROWS`` rows, where the int4 kernel's cost grows with every row while a
    bfloat16 matmul's barely does (prefill, batched decode)."""

    __slots__ = ("group_size", "in_features", "out_features", "packed", "scales_zeros",
                 "wide", "wide_packed")

    def __init__(self, packed: Tensor, scales_zeros: Tensor, group_size: int,
                 wide: Tensor, wide_packed: bool) -> None:
        self.packed = packed
        self.scales_zeros = scales_zeros
        self.group_size = group_size
        self.wide = wide
        self.wide_packed = wide_packed
        self.out_features = scales_zeros.shape[1]
        self.in_features = scales_zeros.shape[0] * group_size

    def matmul(self, x: Tensor) -> Tensor:
        """Return ``x @ W.T`` for bfloat16 ``x`` ``[N, in]`` (``[N, out]``, bfloat16)."""
        out: Tensor
        if x.shape[0] <= INT4_MAX_ROWS:
            out = _mm(x, self.packed, self.group_size, self.scales_zeros)
        elif self.wide_packed:
            out = _linear_pointwise(x, self.wide, None, "none", [], "")
        else:
            out = F.linear(x, self.wide)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the 4-bit form (what a decode step of few rows reads)."""
        return self.packed.nbytes + self.scales_zeros.nbytes


def int4_eligible(out_features: int, in_features: int, group_size: int) -> bool:
    """Return whether a ``[out, in]`` weight fits the int4 kernel's layout (else it stays
    dense): ``out`` a multiple of 16, ``in`` a multiple of ``group_size``."""
    return out_features % _ROWS_MULTIPLE == 0 and in_features % group_size == 0


def _levels(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return (q int32 ``[out, in]`` in 0..15, step ``[out, groups, 1]``, minimum, likewise)."""
    out_f, in_f = weight.shape
    w = weight.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    # a constant group gets any positive step: every weight then maps to level 0 exactly
    step = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((w - lo) / step).round_().clamp_(0, 15)
    return q.reshape(out_f, in_f).to(torch.int32), step, lo


def quantize_int4(weight: Tensor, group_size: int = 32) -> Int4Weight:
    """Return the 4-bit packed form of a CPU weight ``[out, in]``.

    Raises ValueError naming ``group_size`` or the shape when the weight does not fit the
    kernel (see ``int4_eligible``), RuntimeError when this torch build has no int4 kernel.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size: {group_size} is not one of {INT4_GROUP_SIZES}")
    if weight.dim() != 2 or not int4_eligible(weight.shape[0], weight.shape[1], group_size):
        raise ValueError(f"weight: shape {tuple(weight.shape)} needs rows a multiple of "
                         f"{_ROWS_MULTIPLE} and columns a multiple of {group_size}")
    if _pack is None:
        raise RuntimeError("this torch build has no CPU int4 matmul kernel")
    q, step, lo = _levels(weight, group_size)
    packed = _pack(q, 1)
    # the kernel computes (q - 8) * scale + zero: the zero is the level-8 value
    zero = lo + 8 * step
    scales_zeros = torch.cat([step, zero], dim=-1).transpose(0, 1).contiguous()
    wide = _dequantize(q, step, lo).to(torch.bfloat16)
    wide_packed = False
    if _reorder is not None and _linear_pointwise is not None:
        with contextlib.suppress(RuntimeError):
            wide, wide_packed = _reorder(wide, 1), True
    return Int4Weight(packed, scales_zeros.to(torch.bfloat16), group_size, wide, wide_packed)


def _dequantize(q: Tensor, step: Tensor, lo: Tensor) -> Tensor:
    out_f, in_f = q.shape
    groups = step.shape[1]
    deq = q.to(torch.float32).reshape(out_f, groups, in_f // groups) * step + lo
    return deq.reshape(out_f, in_f)


def dequantize_int4(weight: Tensor, group_size: int = 32) -> Tensor:
    """Return, in float32, the weight that ``quantize_int4`` represents (for tests and error
    reports): every entry rounded to its group's nearest level."""
    return _dequantize(*_levels(weight, group_size))


def int4_available() -> bool:
    """Return whether this torch build runs the CPU int4 kernel correctly (a small probe)."""
    if _mm is None or _pack is None:
        return False
    try:
        w = torch.linspace(-1, 1, 16 * 32).reshape(16, 32)
        x = torch.ones(1, 32, dtype=torch.bfloat16)
        got = quantize_int4(w, 32).matmul(x).float()
        want = x.float() @ dequantize_int4(w, 32).T
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False
