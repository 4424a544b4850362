"""Fused sampling: temperature, top-k, top-p and min-p over the full vocabulary, no sort.

One program per row. Truncation is a logit threshold: the row is kept where ``x >= thr``.
Top-k and top-p thresholds are found by bisection on the logit value (count of tokens at or above
the pivot for top-k, their probability mass for top-p); each step is one pass over the row, and
the search stops as soon as the bracket holds a single distinct value, so ties are kept or dropped
together. The token is then drawn by Gumbel-max over the kept logits with Philox noise keyed by
the row's seed and step, so a request's (seed, step) fixes its token whatever the batch.

Semantics (those of resultity_runtime's torch sampler): temperature 0 is greedy (lowest id among
ties); top-k keeps the tokens >= the k-th largest logit; top-p then keeps the smallest set of
most likely tokens whose mass, renormalised over the top-k set, reaches top_p (a token is kept
when the mass strictly above it is below top_p); min-p drops tokens whose probability is below
min_p times the largest.
"""

from __future__ import annotations

import math

import torch

from ._triton_compat import check_device, check_tensor, interpreting, lazy_jit, tl

__all__ = ["sample", "sample_ref", "sampling_probs_ref"]

_MAX_ITERS = 64


def _bisect(
    base, cmax_row, vocab, offs, lo, hi, target, mx, c,
    BLOCK: tl.constexpr, MAX_ITERS: tl.constexpr, BY_MASS: tl.constexpr,
):
    # Largest v in [lo, hi] with F(v) >= target, F(v) the count of tokens x >= v (or, BY_MASS,
    # their unnormalised probability mass exp2((x - mx) * c)). Invariants F(lo) >= target >
    # F(hi); stops once [lo, hi) holds a single distinct value, so ties move together.
    inf = float("inf")
    vmin = tl.full([], 0.0, tl.float32)  # typed: loop-carried values keep one type
    vmax = tl.full([], 1.0, tl.float32)
    it = tl.full([], 0, tl.int32)
    while (vmax > vmin) & (it < MAX_ITERS):
        mid = lo + (hi - lo) * 0.5
        f = tl.zeros([BLOCK], tl.float32 if BY_MASS else tl.int32)
        min1 = tl.full([BLOCK], inf, tl.float32)
        max1 = tl.full([BLOCK], -inf, tl.float32)
        min2 = tl.full([BLOCK], inf, tl.float32)
        max2 = tl.full([BLOCK], -inf, tl.float32)
        for start in range(0, vocab, BLOCK):
            if tl.load(cmax_row + start // BLOCK) >= lo:
                idx = start + offs
                x = tl.load(base + idx, mask=idx < vocab, other=-inf).to(tl.float32)
                up = x >= mid
                if BY_MASS:
                    f += tl.where(up, tl.exp2((x - mx) * c), 0.0)
                else:
                    f += up.to(tl.int32)
                in1 = (x >= lo) & (x < mid)
                in2 = up & (x < hi)
                min1 = tl.minimum(min1, tl.where(in1, x, inf))
                max1 = tl.maximum(max1, tl.where(in1, x, -inf))
                min2 = tl.minimum(min2, tl.where(in2, x, inf))
                max2 = tl.maximum(max2, tl.where(in2, x, -inf))
        if tl.sum(f, 0) >= target:
            lo = mid
            vmin = tl.min(min2, 0)
            vmax = tl.max(max2, 0)
        else:
            hi = mid
            vmin = tl.min(min1, 0)
            vmax = tl.max(max1, 0)
        it += 1
    return lo


@lazy_jit(helpers=(_bisect,))
def _sample_kernel(
    logits_ptr, stride_row, vocab,
    temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, out_ptr, thr_ptr,
    cmax_ptr, num_chunks,
    BLOCK: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    cmax_row = cmax_ptr + row.to(tl.int64) * num_chunks
    offs = tl.arange(0, BLOCK)
    inf = float("inf")

    # pass 1: per-lane max (first index), count of the max, finite min; the max of every chunk
    # is kept so that later passes skip the chunks that lie wholly below their bracket
    lane_max = tl.full([BLOCK], -inf, tl.float32)
    lane_idx = tl.zeros([BLOCK], tl.int32)
    lane_cnt = tl.zeros([BLOCK], tl.int32)
    lane_min = tl.full([BLOCK], inf, tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < vocab, other=-inf).to(tl.float32)
        tl.store(cmax_row + start // BLOCK, tl.max(x, 0))
        better = x > lane_max
        lane_cnt = tl.where(better, 1, lane_cnt + (x == lane_max).to(tl.int32))
        lane_idx = tl.where(better, idx, lane_idx)
        lane_max = tl.where(better, x, lane_max)
        lane_min = tl.minimum(lane_min, tl.where(x > -inf, x, inf))
    mx = tl.max(lane_max, 0)
    result = tl.min(tl.where(lane_max == mx, lane_idx, vocab), 0)
    cnt_max = tl.sum(tl.where(lane_max == mx, lane_cnt, 0), 0)
    mn = tl.min(lane_min, 0)

    temp = tl.load(temp_ptr + row)
    thr = mx
    if temp > 0.0:
        c = 1.4426950408889634 / temp  # exp2((x - mx) * c) is a probability times Z
        thr = mn
        top_k = tl.load(top_k_ptr + row)
        if (top_k > 0) & (top_k < vocab) & (cnt_max < top_k):
            # largest value with count(x >= value) >= top_k
            thr = _bisect(base, cmax_row, vocab, offs, mn, mx, top_k, mx, c,
                          BLOCK=BLOCK, MAX_ITERS=MAX_ITERS, BY_MASS=False)
        elif (top_k > 0) & (top_k < vocab):
            thr = mx  # the tied maximum alone already holds k tokens
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            mass_k = tl.zeros([BLOCK], tl.float32)
            for start in range(0, vocab, BLOCK):
                if tl.load(cmax_row + start // BLOCK) >= thr:
                    idx = start + offs
                    x = tl.load(base + idx, mask=idx < vocab, other=-inf).to(tl.float32)
                    mass_k += tl.where(x >= thr, tl.exp2((x - mx) * c), 0.0)
            target = top_p * tl.sum(mass_k, 0)
            # the tied maximum has mass cnt_max (weight 1 each)
            if cnt_max.to(tl.float32) < target:
                # keep x >= v iff the mass strictly above v is below top_p, i.e. F(v) >= target
                thr = _bisect(base, cmax_row, vocab, offs, thr, mx, target, mx, c,
                              BLOCK=BLOCK, MAX_ITERS=MAX_ITERS, BY_MASS=True)
            else:
                thr = mx
        min_p = tl.load(min_p_ptr + row)
        if min_p > 0.0:
            thr = tl.maximum(thr, mx + tl.log(min_p) * temp)
        # Gumbel-max over the kept tokens: argmax of log p + G, G = -log(-log u). One Philox
        # call gives four uniforms: counter t of a chunk serves its four quarters at offset t.
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        q_offs = tl.arange(0, BLOCK // 4)
        zero = tl.zeros([BLOCK // 4], tl.uint32)
        step_lo = (step & 0xFFFFFFFF).to(tl.uint32) + zero
        step_hi = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
        best = tl.full([BLOCK // 4], -inf, tl.float32)
        best_idx = tl.zeros([BLOCK // 4], tl.int32)
        inv_t = 1.0 / temp
        for start in range(0, vocab, BLOCK):
            if tl.load(cmax_row + start // BLOCK) >= thr:
                counter = (start // 4 + q_offs).to(tl.uint32)
                r0, r1, r2, r3 = tl.philox(seed, counter, step_lo, step_hi, zero)
                for j in tl.static_range(4):
                    r = r0 if j == 0 else (r1 if j == 1 else (r2 if j == 2 else r3))
                    idx = start + j * (BLOCK // 4) + q_offs
                    x = tl.load(base + idx, mask=idx < vocab, other=-inf).to(tl.float32)
                    u = tl.uint_to_uniform_float(r)
                    u = tl.minimum(tl.maximum(u, 1e-20), 0.99999994)
                    score = (x - mx) * inv_t - tl.log(-tl.log(u))
                    score = tl.where((x >= thr) & (idx < vocab), score, -inf)
                    better = score > best
                    best_idx = tl.where(better, idx, best_idx)
                    best = tl.where(better, score, best)
        top = tl.max(best, 0)
        result = tl.min(tl.where(best == top, best_idx, vocab), 0)
    tl.store(out_ptr + row, result.to(tl.int64))
    tl.store(thr_ptr + row, thr)


def _row_params(
    name: str, value: torch.Tensor | float | int, m: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, ndim=1, shape=(m,), device=device)
        return value.to(dtype).contiguous()
    return torch.full((m,), value, dtype=dtype, device=device)


def _check_logits(logits: object) -> torch.Tensor:
    return check_tensor("logits", logits, ndim=2,
                        dtypes=(torch.float32, torch.float16, torch.bfloat16), last_contiguous=True)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int = 0,
    top_p: torch.Tensor | float = 1.0,
    min_p: torch.Tensor | float = 0.0,
    *,
    seeds: torch.Tensor,
    steps: torch.Tensor | int = 0,
    block: int | None = None,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` [M, V] after temperature/top-k/top-p/min-p.

    Per-row parameters are tensors [M] (or one scalar for all rows): ``temperature`` (0 = greedy),
    ``top_k`` (<= 0 or >= V: off), ``top_p`` in (0, 1] (1: off), ``min_p`` in [0, 1) (0: off).
    ``seeds`` int64 [M] and ``steps`` int64 [M] key each row's Philox stream: the same (seed,
    step, logits, parameters) always give the same token, alone or in any batch. ``thresholds``
    (float32 [M], optional) receives each row's logit threshold: the kept tokens are exactly
    those with ``logits >= threshold`` (for greedy rows, the maximum). Returns int64 token ids
    [M].

    Parameter values are trusted (validate them with SamplingParams first): checking tensor
    values here would cost a device sync.

    Raises:
        ValueError: a shape, dtype or device does not fit (the message names the argument).
        KernelUnavailableError: triton is not installed.
    """
    logits = _check_logits(logits)
    check_device("logits", logits)
    m, v = logits.shape
    dev = logits.device
    temps = _row_params("temperature", temperature, m, torch.float32, dev)
    ks = _row_params("top_k", top_k, m, torch.int32, dev)
    ps = _row_params("top_p", top_p, m, torch.float32, dev)
    mps = _row_params("min_p", min_p, m, torch.float32, dev)
    check_tensor("seeds", seeds, ndim=1, shape=(m,), dtypes=(torch.int64,), device=dev)
    st = _row_params("steps", steps, m, torch.int64, dev)
    out = torch.empty(m, dtype=torch.int64, device=dev)
    if thresholds is None:
        thresholds = torch.empty(m, dtype=torch.float32, device=dev)
    check_tensor("thresholds", thresholds, ndim=1, shape=(m,), dtypes=(torch.float32,),
                 device=dev, contiguous=True)
    if m == 0:
        return out
    if block is None:
        block = 64 if interpreting() else 2048
    if block < 4 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 4, got {block}")
    num_chunks = -(-v // block)
    chunk_max = torch.empty((m, num_chunks), dtype=torch.float32, device=dev)  # scratch
    _sample_kernel[(m,)](
        logits, logits.stride(0), v, temps, ks, ps, mps, seeds.contiguous(), st, out, thresholds,
        chunk_max, num_chunks, BLOCK=block, MAX_ITERS=_MAX_ITERS,
        num_warps=1 if interpreting() else 8,
    )
    return out


def sampling_probs_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int = 0,
    top_p: torch.Tensor | float = 1.0,
    min_p: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Sort-based reference: the float32 [M, V] distribution that :func:`sample` draws from.

    Greedy rows (temperature 0) are one-hot on the lowest-id argmax. Raises ValueError on
    malformed input.
    """
    logits = _check_logits(logits)
    m, v = logits.shape
    dev = logits.device
    temps = _row_params("temperature", temperature, m, torch.float32, dev)
    ks = _row_params("top_k", top_k, m, torch.int64, dev)
    ps = _row_params("top_p", top_p, m, torch.float32, dev)
    mps = _row_params("min_p", min_p, m, torch.float32, dev)
    x = logits.float()
    greedy = temps <= 0
    y = x / torch.where(greedy, 1.0, temps)[:, None]
    sorted_y, _ = y.sort(dim=-1, descending=True)
    ks = torch.where((ks <= 0) | (ks >= v), v, ks)
    kth = sorted_y.gather(1, (ks - 1)[:, None])
    sorted_y = torch.where(sorted_y >= kth, sorted_y, -math.inf)
    sorted_p = sorted_y.softmax(-1)
    # dropped (-inf) entries have mass 0 and must not pass `mass above < top_p` by rounding
    keep = ((sorted_p.cumsum(-1) - sorted_p) < ps[:, None]) & (sorted_y > -math.inf)
    keep[:, 0] = True
    n_keep = keep.sum(-1, keepdim=True)
    thr = sorted_y.gather(1, n_keep - 1)
    y = torch.where(y >= thr, y, -math.inf)
    floor = y.amax(-1, keepdim=True) + torch.log(mps)[:, None]  # log(0) = -inf keeps all
    probs = torch.where(y >= floor, y, -math.inf).softmax(-1)
    one_hot = torch.zeros_like(probs)
    one_hot[torch.arange(m, device=dev), x.argmax(-1)] = 1.0
    return torch.where(greedy[:, None], one_hot, probs)


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int = 0,
    top_p: torch.Tensor | float = 1.0,
    min_p: torch.Tensor | float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sort-based PyTorch sampling with the same semantics as :func:`sample` (its own RNG).

    Returns int64 token ids [M]. Raises ValueError on malformed input.
    """
    probs = sampling_probs_ref(logits, temperature, top_k, top_p, min_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
