"""Helpers shared by the kernel tests (imported by name: tests/kernels is on sys.path)."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float32; NaN anywhere in out gives inf."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def randn(*shape: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
          scale: float = 1.0) -> torch.Tensor:
    """Random normal test data, never exactly zero, made on the CPU for reproducibility."""
    x = torch.randn(*shape, generator=gen) * scale
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(device=device, dtype=dtype)


def paged_cache(
    seq_lens: list[int], page: int, hkv: int, d: int, *, device: torch.device,
    dtype: torch.dtype, gen: torch.Generator, spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A paged K/V cache holding random data at every sequence's positions and NaN elsewhere.

    Blocks are handed out in a shuffled order, so tables are not contiguous. Returns
    (k_cache, v_cache, block_tables int32 [B, max_blocks] padded with 0).
    """
    need = [-(-n // page) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(*need, 1)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, page, hkv, d), float("nan"))
    used = 0
    for i, n in enumerate(seq_lens):
        blocks = order[used:used + need[i]]
        used += need[i]
        tables[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for pos in range(n):
            b, o = blocks[pos // page], pos % page
            k_cache[b, o] = randn(hkv, d, device=torch.device("cpu"), dtype=torch.float32, gen=gen)
            v_cache[b, o] = randn(hkv, d, device=torch.device("cpu"), dtype=torch.float32, gen=gen)
    return (k_cache.to(device=device, dtype=dtype), v_cache.to(device=device, dtype=dtype),
            tables.to(device))


def cu_seqlens(lens: list[int], device: torch.device) -> torch.Tensor:
    """int32 [B+1] cumulative offsets (0, l0, l0+l1, ...)."""
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)
