"""Paged decode attention: one query token per sequence over its paged KV cache.

Split-K (flash-decoding): the context of each sequence is cut into partitions that separate
programs reduce in parallel, each leaving a partial output and its log-sum-exp; a second small
kernel merges them. One program serves all the query heads that share a KV head (GQA packing),
so each K/V tile is read once for the whole group.
"""

from __future__ import annotations

import math

import torch

from ._triton_compat import cdiv, check_device, check_tensor, interpreting, lazy_jit, next_pow2, tl

__all__ = ["paged_decode_attention", "paged_decode_attention_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_SM_COUNT: dict[int, int] = {}


def _attend_paged(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, start, end, qk_scale,
    kvh, offs_n, offs_d, d_mask, stride_cb, stride_ct, stride_ch,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Online-softmax attention of q [R, BLOCK_D] over cached positions start..end-1 of one
    # sequence (block table row bt_row, KV head kvh); returns the updated (m_i, l_i, acc).
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + offs_n
        n_mask = pos < end
        blk = tl.load(bt_row + pos // PAGE, mask=n_mask, other=0)
        kv_off = (blk.to(tl.int64)[:, None] * stride_cb + (pos % PAGE)[:, None] * stride_ct
                  + kvh * stride_ch + offs_d[None, :])
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # [R, BLOCK_N]
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@lazy_jit(helpers=(_attend_paged,))
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    qk_scale, partition_size,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    head_dim,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE: tl.constexpr, WRITE_LSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_paged(
        q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + b * stride_bt, start,
        end, qk_scale, kvh, offs_n, offs_d, d_mask, stride_cb, stride_ct, stride_ch,
        PAGE=PAGE, BLOCK_N=BLOCK_N,
    )
    # an empty partition (past the end of a shorter sequence) leaves out = 0 and lse = -inf
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os
             + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        # base-2 log-sum-exp of the scaled scores; -inf for an empty partition
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@lazy_jit
def _decode_merge_kernel(
    part_ptr, lse_ptr, o_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    head_dim,
    SPLIT_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < head_dim
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [SPLIT_PAD]
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
                   + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=d_mask)


def _check(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor,
) -> None:
    check_tensor("q", q, ndim=3, dtypes=_FLOATS, last_contiguous=True)
    b, hq, d = q.shape
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev,
                 shape=(None, None, None, d), contiguous=True)
    hkv = k_cache.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q has {hq} heads, not a multiple of k_cache's {hkv} heads")
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=dev,
                 shape=tuple(k_cache.shape), contiguous=True)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=dev,
                 shape=(b, None), last_contiguous=True)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=dev, shape=(b,))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few "SMs" so that tests exercise the split path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None = None,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its whole paged context.

    Shapes: q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (contiguous, the
    token's own K/V already written); block_tables int32 [B, max_blocks]; seq_lens int32 [B]
    (>= 1, context length including the new token). ``max_seq_len`` (a bound on seq_lens) avoids
    a device sync; ``num_splits`` forces the split-K factor (default: enough programs to fill the
    GPU twice). ``validate=False`` skips the argument checks. Returns ``out`` (or a new tensor)
    [B, Hq, D] in q's dtype.

    Raises:
        ValueError: a shape, dtype, stride or device does not fit (the message names the argument).
        KernelUnavailableError: triton is not installed.
    """
    if validate:
        _check(q, k_cache, v_cache, block_tables, seq_lens)
        check_device("q", q)
    b, hq, d = q.shape
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    elif validate:
        check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device, shape=(b, hq, d),
                     last_contiguous=True)
    if b == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    max_seq_len = max(max_seq_len, 1)
    if block_n is None:
        block_n = 16 if interpreting() else 64
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if num_splits is None:
        want = cdiv(2 * _sm_count(q.device), b * hkv)
        num_splits = max(1, min(want, cdiv(max_seq_len, 4 * block_n)))
    partition = cdiv(cdiv(max_seq_len, max(num_splits, 1)), block_n) * block_n
    num_splits = cdiv(max_seq_len, partition)
    group = hq // hkv
    block_d = max(16, next_pow2(d))
    num_warps = 1 if interpreting() else 4
    common = {"GROUP": group, "GROUP_PAD": max(16, next_pow2(group)), "PAGE": page,
                  "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps, "num_stages": 2}
    grid = (b, hkv, num_splits)
    if num_splits == 1:
        _decode_split_kernel[grid](
            q, k_cache, v_cache, block_tables, seq_lens, out, out,
            scale * _LOG2E, partition,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1), 0, 0, 0,
            d, WRITE_LSE=False, **common,
        )
        return out
    # partial outputs: [B, Hq, S, D] float32 and their log-sum-exp [B, Hq, S]
    part = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        scale * _LOG2E, partition,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        d, WRITE_LSE=True, **common,
    )
    _decode_merge_kernel[(b, hq)](
        part, lse, out, num_splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), d,
        SPLIT_PAD=next_pow2(num_splits), BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`paged_decode_attention`: gather each context, then softmax.

    Returns [B, Hq, D] in q's dtype. Raises ValueError like :func:`paged_decode_attention`.
    """
    del max_seq_len
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    _b, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        blk = block_tables[i, pos // page].long()
        kb = k_cache[blk, pos % page].float().repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        vb = v_cache[blk, pos % page].float().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,khd->hk", q[i].float(), kb) * scale
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), vb).to(q.dtype)
    return out
