"""Prefill attention: causal, GQA, variable lengths packed by cu_seqlens, optional paged prefix.

Flash-attention style: one program owns BLOCK_M query rows of one head of one sequence and
streams key tiles through an online softmax, so no [q_len, k_len] matrix is ever stored. Tiles
above the causal diagonal are never visited, and only the diagonal tiles pay for a mask.

With a cached prefix (chunked prefill, prefix reuse) the keys before the new tokens are read
from the paged cache through the block table, the new tokens' keys from the packed k/v tensors.
"""

from __future__ import annotations

import math

import torch

from ._decode_attention import _attend_paged
from ._triton_compat import cdiv, check_device, check_tensor, interpreting, lazy_jit, next_pow2, tl

__all__ = ["prefill_attention", "prefill_attention_ref"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@lazy_jit(helpers=(_attend_paged,))
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, cu_q_ptr,
    qk_scale,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_bt,
    head_dim,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HAS_PREFIX: tl.constexpr, SKIP_SINGLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # the last query tiles of a causal sequence do the most work: launch them first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m_start = pid_m * BLOCK_M
    run = m_start < q_len
    if SKIP_SINGLE:
        run = run & (q_len > 1)  # single-token rows are left to the paged decode kernel
    if run:
        kvh = head // GROUP
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < head_dim
        m_mask = offs_m < q_len
        q = tl.load(
            q_ptr + (q_start + offs_m)[:, None] * stride_qn + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :], other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        if HAS_PREFIX:
            # cached keys: every new token sees all of them, so only the length needs a mask
            prefix_len = tl.load(seq_lens_ptr + seq) - q_len
            m_i, l_i, acc = _attend_paged(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt,
                0, prefix_len, qk_scale, kvh, offs_n, offs_d, d_mask, stride_cb, stride_ct,
                stride_ch, PAGE=PAGE, BLOCK_N=BLOCK_N,
            )

        k_base = k_ptr + q_start * stride_kn + kvh * stride_kh
        v_base = v_ptr + q_start * stride_vn + kvh * stride_vh
        # new keys strictly left of this query tile: no mask at all (BLOCK_M % BLOCK_N == 0)
        for start_n in range(0, m_start, BLOCK_N):
            pos = start_n + offs_n
            k = tl.load(k_base + pos[:, None] * stride_kn + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * stride_vn + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # diagonal tiles: causal and length mask; tiles right of the diagonal are skipped
        hi = tl.minimum(m_start + BLOCK_M, q_len)
        for start_n in range(m_start, hi, BLOCK_N):
            pos = start_n + offs_n
            n_mask = pos < q_len
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + pos[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            visible = (pos[None, :] <= offs_m[:, None]) & n_mask[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(
            o_ptr + (q_start + offs_m)[:, None] * stride_on + head * stride_oh + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :],
        )


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None, seq_lens: torch.Tensor | None,
) -> bool:
    check_tensor("q", q, ndim=3, dtypes=_FLOATS, last_contiguous=True)
    n, hq, d = q.shape
    dev = q.device
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=dev, shape=(n, None, d),
                 last_contiguous=True)
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q has {hq} heads, not a multiple of k's {hkv} heads")
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=dev, shape=(n, hkv, d),
                 last_contiguous=True)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=dev)
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError("cu_seqlens_q must hold at least two offsets (one sequence)")
    prefix = (k_cache, v_cache, block_tables, seq_lens)
    if all(t is None for t in prefix):
        return False
    if any(t is None for t in prefix):
        raise ValueError("k_cache, v_cache, block_tables and seq_lens: give all four or none")
    assert k_cache is not None
    assert v_cache is not None
    assert block_tables is not None
    assert seq_lens is not None
    b = cu_seqlens_q.shape[0] - 1
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=dev,
                 shape=(None, None, hkv, d), contiguous=True)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), device=dev,
                 shape=tuple(k_cache.shape), contiguous=True)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=dev,
                 shape=(b, None), last_contiguous=True)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=dev, shape=(b,))
    return True


def _default_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch; small tiles when interpreting."""
    if interpreting():
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    # untuned guesses for Hopper; benchmarks/kernels_gpu.py sweeps alternatives
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int | None = None,
    scale: float | None = None,
    *,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    validate: bool = True,
    skip_single_token: bool = False,
) -> torch.Tensor:
    """Causal GQA attention of packed new tokens, each over its own sequence.

    Shapes: q [N, Hq, D]; k, v [N, Hkv, D] (Hq % Hkv == 0); cu_seqlens_q int32 [B+1] with the
    offsets of each sequence's new tokens in N. Without a prefix, token i of a sequence attends to
    its tokens 0..i. With k_cache/v_cache ([num_blocks, block_size, Hkv, D]), block_tables int32
    [B, max_blocks] and seq_lens int32 [B] (total length after this step), each sequence first
    has ``seq_lens[b] - q_len_b`` cached tokens that every new token attends to.
    ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the tile choice
    (BLOCK_M % BLOCK_N == 0). ``validate=False`` skips the argument checks (for callers that
    build the arguments themselves, once per layer and step). ``skip_single_token`` leaves the
    rows of sequences with a single new token unwritten (a caller hands those to
    paged_decode_attention, which suits them better). Returns ``out`` (or a new tensor)
    [N, Hq, D] in q's dtype.

    Raises:
        ValueError: a shape, dtype, stride or device does not fit (the message names the argument).
        KernelUnavailableError: triton is not installed.
    """
    if validate:
        has_prefix = _check(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens)
        check_device("q", q)
    else:
        has_prefix = k_cache is not None
    n, hq, d = q.shape
    hkv = k.shape[1]
    if out is None:
        out = torch.empty_like(q)
    elif validate:
        check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device, shape=(n, hq, d),
                     last_contiguous=True)
    b = cu_seqlens_q.shape[0] - 1
    if n == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if max_seqlen_q <= 0:
        return out
    block_m, block_n, num_warps, num_stages = config or _default_config(d, q.dtype)
    if block_m % block_n != 0:
        raise ValueError(f"config: BLOCK_M {block_m} must be a multiple of BLOCK_N {block_n}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if has_prefix:
        assert k_cache is not None
        assert v_cache is not None
        assert block_tables is not None
        assert seq_lens is not None
        kc, vc, bt, sl = k_cache, v_cache, block_tables, seq_lens
        page = k_cache.shape[1]
        cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0))
    else:
        kc, vc, bt, sl = k, v, cu_seqlens_q, cu_seqlens_q  # never read: HAS_PREFIX is False
        page, cache_strides = 1, (0, 0, 0, 0)
    grid = (cdiv(max_seqlen_q, block_m), hq, b)
    _prefill_kernel[grid](
        q, k, v, out, kc, vc, bt, sl, cu_seqlens_q,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), *cache_strides,
        d,
        GROUP=hq // hkv, PAGE=page, HAS_PREFIX=has_prefix, SKIP_SINGLE=skip_single_token,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(d)),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int | None = None,
    scale: float | None = None,
    *,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`prefill_attention` (float32 math, one sequence at a time).

    Returns [N, Hq, D] in q's dtype. Raises ValueError like :func:`prefill_attention`.
    """
    del max_seqlen_q
    has_prefix = _check(q, k, v, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens)
    _n, hq, d = q.shape
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    offsets = cu_seqlens_q.tolist()
    for i in range(len(offsets) - 1):
        s, e = offsets[i], offsets[i + 1]
        if e == s:
            continue
        kb, vb = k[s:e].float(), v[s:e].float()
        prefix = 0
        if has_prefix:
            assert k_cache is not None
            assert v_cache is not None
            assert block_tables is not None
            assert seq_lens is not None
            prefix = int(seq_lens[i]) - (e - s)
            page = k_cache.shape[1]
            pos = torch.arange(prefix, device=q.device)
            blk = block_tables[i, pos // page].long()
            kb = torch.cat([k_cache[blk, pos % page].float(), kb])
            vb = torch.cat([v_cache[blk, pos % page].float(), vb])
        kb = kb.repeat_interleave(group, dim=1)  # [L, Hq, D]
        vb = vb.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), kb) * scale
        qpos = torch.arange(e - s, device=q.device)[:, None] + prefix
        kpos = torch.arange(kb.shape[0], device=q.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vb).to(q.dtype)
    return out
