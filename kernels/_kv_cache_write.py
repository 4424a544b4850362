"""KV cache write: scatter the new tokens' K and V into their paged-cache slots."""

from __future__ import annotations

import torch

from ._triton_compat import check_device, check_tensor, lazy_jit, next_pow2, tl

__all__ = ["write_kv_cache", "write_kv_cache_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@lazy_jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cb, stride_ct, stride_ch,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per new token: copies its [Hkv, D] rows of K and of V
    n = tl.program_id(0)
    slot = tl.load(slot_ptr + n)
    if slot >= 0:  # negative slots mark padding tokens that own no cache slot
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_kv_heads) & (d < head_dim)
        kx = tl.load(k_ptr + n * stride_kn + h * stride_kh + d, mask=mask)
        vx = tl.load(v_ptr + n * stride_vn + h * stride_vh + d, mask=mask)
        dst = blk * stride_cb + off * stride_ct + h * stride_ch + d
        tl.store(k_cache_ptr + dst, kx.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, vx.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    check_tensor("k_cache", k_cache, ndim=4, dtypes=_FLOATS, contiguous=True)
    _num_blocks, _block_size, hkv, d = k_cache.shape
    dev = k_cache.device
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev,
                 shape=tuple(k_cache.shape), contiguous=True)
    check_tensor("k", k, ndim=3, dtypes=_FLOATS, device=dev, shape=(None, hkv, d),
                 last_contiguous=True)
    n = k.shape[0]
    check_tensor("v", v, ndim=3, dtypes=(k.dtype,), device=dev, shape=(n, hkv, d),
                 last_contiguous=True)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64, torch.int32),
                 device=dev, shape=(n,))


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Write ``k[i]``/``v[i]`` ([N, Hkv, D]) into cache slot ``slot_mapping[i]`` in place.

    The caches are ``[num_blocks, block_size, Hkv, D]`` (contiguous); slot = block * block_size +
    offset. A negative slot skips its token. ``validate=False`` skips the argument checks.
    Returns None.

    Raises:
        ValueError: a shape, dtype, stride or device does not fit (the message names the argument).
        KernelUnavailableError: triton is not installed.
    """
    if validate:
        _check(k, v, k_cache, v_cache, slot_mapping)
        check_device("k", k)
    n = k.shape[0]
    if n == 0:
        return
    _, block_size, hkv, d = k_cache.shape
    _write_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        hkv, d,
        BLOCK_SIZE=block_size, BLOCK_H=next_pow2(hkv), BLOCK_D=next_pow2(d),
    )


def write_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """PyTorch reference of :func:`write_kv_cache` (same contract, any device). Returns None."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    k_cache[blk, off] = k[keep].to(k_cache.dtype)
    v_cache[blk, off] = v[keep].to(v_cache.dtype)
