"""Kernel benchmarks on a CUDA GPU: each Triton kernel against its PyTorch path and the roofline.

Run from the repository root with only torch and triton installed:

    PYTHONPATH=. python benchmarks/kernels_gpu.py [--quick] [--no-sweep]

For every kernel it first checks the output against the PyTorch path at the benchmark shapes in
bf16, then times both (CUDA events, warm-up, median of N) and prints a table: time, achieved
TFLOP/s (attention) or GB/s (memory-bound kernels), the speed-up over PyTorch, and the fraction
of the device's own measured ceilings: a large device-to-device copy (bandwidth) and a large bf16
matmul (compute). PyTorch paths: scaled_dot_product_attention for prefill (seq 4k-16k);
gather-then-SDPA (the engine's torch backend) for paged decode (context 4k, batch 32); a
sort-based top-k/top-p/min-p for sampling (vocab 128k, batch 64); index_copy_ for the KV write;
the unfused torch ops for RMSNorm + residual and rotary embedding.
Prefill also sweeps a few tile configurations and reports the best. With the environment
variable OUT set, the results are written to $OUT/kernels_gpu.json as well. Without a CUDA
device it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Row = dict[str, Any]


def bench(fn: Callable[[], object], iters: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs (CUDA events), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def ceilings(quick: bool) -> tuple[float, float]:
    """(copy bandwidth GB/s counting read + write, bf16 matmul TFLOP/s) measured on this GPU."""
    n = (1 << 28) if not quick else (1 << 26)  # 512 MiB of bf16 per buffer
    bufs = [torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_() for _ in range(2)]

    def copy() -> None:
        bufs[1].copy_(bufs[0])

    ms = bench(copy, iters=20)
    bw = 2 * n * 2 / (ms * 1e-3) / 1e9
    bufs.clear()
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = bench(lambda: a @ b, iters=20)
    tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    return bw, tflops


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---- prefill -----------------------------------------------------------------------------------

_PREFILL_CONFIGS = [
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
    (128, 32, 4, 3), (64, 32, 4, 4), (128, 64, 4, 3),
]


def bench_prefill(
    batch: int, seq: int, hq: int, hkv: int, d: int, *, sweep: bool, iters: int
) -> Row:
    from resultity_kernels import prefill_attention

    dt = torch.bfloat16
    n = batch * seq
    q = torch.randn(n, hq, d, dtype=dt, device="cuda")
    k = torch.randn(n, hkv, d, dtype=dt, device="cuda")
    v = torch.randn(n, hkv, d, dtype=dt, device="cuda")
    cu = torch.arange(0, n + 1, seq, dtype=torch.int32, device="cuda")
    scale = d**-0.5
    # SDPA layout [B, H, S, D]; K/V expanded to Hq heads outside the timed region
    qs = q.view(batch, seq, hq, d).transpose(1, 2)
    ks = k.view(batch, seq, hkv, d).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vs = v.view(batch, seq, hkv, d).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    qs, ks, vs = qs.contiguous(), ks.contiguous(), vs.contiguous()

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)

    ref = sdpa().transpose(1, 2).reshape(n, hq, d)
    out = prefill_attention(q, k, v, cu, seq, scale)
    err = rel_err(out, ref)
    flops = 4 * batch * hq * seq * seq * d / 2  # two matmuls, causal half
    t_ref = bench(sdpa, iters=iters)
    t_default = bench(lambda: prefill_attention(q, k, v, cu, seq, scale), iters=iters)
    best, best_cfg = t_default, "default"
    if sweep:
        for cfg in _PREFILL_CONFIGS:
            try:
                t = bench(lambda c=cfg: prefill_attention(q, k, v, cu, seq, scale, config=c),
                          iters=max(5, iters // 3), warmup=2)
            except Exception as exc:  # a config may not fit in shared memory
                print(f"  prefill config {cfg}: {type(exc).__name__}", file=sys.stderr)
                continue
            if t < best:
                best, best_cfg = t, str(cfg)
    return {
        "kernel": "prefill_attention", "shape": f"B{batch} S{seq} Hq{hq} Hkv{hkv} D{d}",
        "baseline": "sdpa(causal)", "ms": best, "ms_default": t_default, "config": best_cfg,
        "ms_torch": t_ref, "tflops": flops / (best * 1e-3) / 1e12,
        "tflops_torch": flops / (t_ref * 1e-3) / 1e12, "rel_err": err, "ok": err < 3e-2,
    }


# ---- paged decode ------------------------------------------------------------------------------

def bench_decode(batch: int, ctx: int, hq: int, hkv: int, d: int, *, iters: int) -> Row:
    from resultity_kernels import paged_decode_attention

    dt, page = torch.bfloat16, 16
    nblk = ctx // page
    k_cache = torch.randn(batch * nblk + 1, page, hkv, d, dtype=dt, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * nblk, device="cuda").view(batch, nblk).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, dtype=dt, device="cuda")
    scale = d**-0.5

    def gather_sdpa() -> torch.Tensor:  # the torch backend's decode path
        kk = k_cache[tables.long()].view(batch, ctx, hkv, d).transpose(1, 2)
        vv = v_cache[tables.long()].view(batch, ctx, hkv, d).transpose(1, 2)
        mask = torch.arange(ctx, device="cuda")[None, :] < lens[:, None]
        qg = q.view(batch, hkv, hq // hkv, d)
        o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask[:, None, None, :],
                                           scale=scale)
        return o.reshape(batch, hq, d)

    def ours() -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, ctx, scale)

    err = rel_err(ours(), gather_sdpa())
    t_ref, t = bench(gather_sdpa, iters=iters), bench(ours, iters=iters)
    nbytes = 2 * batch * ctx * hkv * d * 2 + 2 * q.numel() * 2
    return {
        "kernel": "paged_decode_attention", "shape": f"B{batch} ctx{ctx} Hq{hq} Hkv{hkv} D{d}",
        "baseline": "gather+sdpa", "ms": t, "ms_torch": t_ref,
        "gbps": nbytes / (t * 1e-3) / 1e9, "gbps_torch": nbytes / (t_ref * 1e-3) / 1e9,
        "rel_err": err, "ok": err < 3e-2,
    }


# ---- KV write ----------------------------------------------------------------------------------

def bench_kv_write(n: int, hkv: int, d: int, *, iters: int) -> Row:
    from resultity_kernels import write_kv_cache

    dt, page = torch.bfloat16, 16
    nblk = n // page + 8
    k_cache = torch.zeros(nblk, page, hkv, d, dtype=dt, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(n, hkv, d, dtype=dt, device="cuda")
    v = torch.randn_like(k)
    slots = torch.randperm(nblk * page, device="cuda")[:n]
    write_kv_cache(k, v, k_cache, v_cache, slots)
    kr, vr = torch.zeros_like(k_cache), torch.zeros_like(v_cache)

    def torch_path() -> None:
        kr.view(-1, hkv, d).index_copy_(0, slots, k)
        vr.view(-1, hkv, d).index_copy_(0, slots, v)

    torch_path()
    ok = torch.equal(kr, k_cache) and torch.equal(vr, v_cache)
    t = bench(lambda: write_kv_cache(k, v, k_cache, v_cache, slots), iters=iters)
    t_ref = bench(torch_path, iters=iters)
    nbytes = 2 * 2 * k.numel() * 2  # read + write, K and V
    return {
        "kernel": "write_kv_cache", "shape": f"N{n} Hkv{hkv} D{d}", "baseline": "index_copy_",
        "ms": t, "ms_torch": t_ref, "gbps": nbytes / (t * 1e-3) / 1e9,
        "gbps_torch": nbytes / (t_ref * 1e-3) / 1e9, "rel_err": 0.0 if ok else 1.0, "ok": ok,
    }


# ---- RMSNorm + residual, rotary ------------------------------------------------------------------

def bench_rms_norm(n: int, hidden: int, *, iters: int) -> Row:
    from resultity_kernels import rms_norm, rms_norm_ref

    dt = torch.bfloat16
    x = torch.randn(n, hidden, dtype=dt, device="cuda")
    res = torch.randn_like(x)
    w = torch.rand(hidden, dtype=dt, device="cuda") + 0.5
    out, new_res = rms_norm(x, w, 1e-5, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-5, res)
    err = rel_err(out, ref)
    ok = err < 2e-2 and new_res is not None and torch.equal(new_res, ref_res)
    t = bench(lambda: rms_norm(x, w, 1e-5, res), iters=iters)
    t_ref = bench(lambda: rms_norm_ref(x, w, 1e-5, res), iters=iters)
    nbytes = 4 * x.numel() * 2  # read x and residual, write out and the new residual
    return {
        "kernel": "rms_norm(+residual)", "shape": f"N{n} H{hidden}", "baseline": "torch add+norm",
        "ms": t, "ms_torch": t_ref, "gbps": nbytes / (t * 1e-3) / 1e9,
        "gbps_torch": nbytes / (t_ref * 1e-3) / 1e9, "rel_err": err, "ok": ok,
    }


def bench_rotary(n: int, hq: int, hkv: int, d: int, *, iters: int) -> Row:
    from resultity_kernels import apply_rotary, apply_rotary_ref

    dt = torch.bfloat16
    qk = torch.randn(n, hq + hkv, d, dtype=dt, device="cuda")
    pos = torch.randint(0, 8192, (n,), device="cuda")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    a, b = qk.clone(), qk.clone()
    apply_rotary(a[:, :hq], a[:, hq:], pos, inv_freq)
    apply_rotary_ref(b[:, :hq], b[:, hq:], pos, inv_freq)
    err = rel_err(a, b)
    t = bench(lambda: apply_rotary(a[:, :hq], a[:, hq:], pos, inv_freq), iters=iters)
    t_ref = bench(lambda: apply_rotary_ref(b[:, :hq], b[:, hq:], pos, inv_freq), iters=iters)
    nbytes = 2 * qk.numel() * 2
    return {
        "kernel": "apply_rotary", "shape": f"N{n} Hq{hq} Hkv{hkv} D{d}", "baseline": "torch",
        "ms": t, "ms_torch": t_ref, "gbps": nbytes / (t * 1e-3) / 1e9,
        "gbps_torch": nbytes / (t_ref * 1e-3) / 1e9, "rel_err": err, "ok": err < 2e-2,
    }


# ---- sampling ----------------------------------------------------------------------------------

def _torch_sort_sampler(x: torch.Tensor, t: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                        mp: torch.Tensor) -> torch.Tensor:
    """Sort-based PyTorch top-k/top-p/min-p sampling (the usual GPU implementation)."""
    y = x / t[:, None]
    sorted_y, idx = y.sort(dim=-1, descending=True)
    kth = sorted_y.gather(1, (k.long() - 1)[:, None])
    sorted_y = sorted_y.masked_fill(sorted_y < kth, -math.inf)
    probs = sorted_y.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p[:, None]
    drop[:, 0] = False
    sorted_y = sorted_y.masked_fill(drop, -math.inf)
    sorted_y = sorted_y.masked_fill(sorted_y < sorted_y[:, :1] + torch.log(mp)[:, None], -math.inf)
    choice = torch.multinomial(sorted_y.softmax(-1), 1)
    return idx.gather(1, choice).squeeze(1)


def bench_sampling(
    m: int, vocab: int, top_k: int, top_p: float, min_p: float, *, iters: int
) -> Row:
    from resultity_kernels import sample, sampling_probs_ref

    x = torch.randn(m, vocab, device="cuda") * 3.0
    t = torch.full((m,), 0.8, device="cuda")
    k = torch.full((m,), top_k if top_k > 0 else vocab, dtype=torch.int32, device="cuda")
    p = torch.full((m,), top_p, device="cuda")
    mp = torch.full((m,), min_p, device="cuda")
    seeds = torch.arange(m, device="cuda")
    thr = torch.empty(m, device="cuda")
    ids = sample(x, t, k, p, mp, seeds=seeds, thresholds=thr)
    probs = sampling_probs_ref(x, t, k, p, mp)
    support = probs > 0
    mismatch = int(((x >= thr[:, None]) != support).sum())
    inside = bool(support[torch.arange(m, device="cuda"), ids].all())
    t_ours = bench(lambda: sample(x, t, k, p, mp, seeds=seeds), iters=iters)
    t_ref = bench(lambda: _torch_sort_sampler(x, t, k, p, mp), iters=iters)
    nbytes = x.numel() * 4  # one read of the logits
    return {
        "kernel": "sample", "shape": f"M{m} V{vocab} k{top_k} p{top_p} minp{min_p}",
        "baseline": "sort top-k/top-p", "ms": t_ours, "ms_torch": t_ref,
        "gbps": nbytes / (t_ours * 1e-3) / 1e9, "gbps_torch": nbytes / (t_ref * 1e-3) / 1e9,
        "rel_err": mismatch / x.numel(), "ok": inside and mismatch <= m,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer iterations")
    ap.add_argument("--no-sweep", action="store_true", help="skip the prefill tile sweep")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device; nothing to measure (run on a GPU machine)")
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, without a warning
    try:
        import triton
    except ImportError:
        print("kernels_gpu: triton is not installed; nothing to measure")
        return 0
    torch.manual_seed(0)
    iters = 10 if args.quick else 30
    name = torch.cuda.get_device_name()
    bw, peak = ceilings(args.quick)
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"ceilings: copy {bw:.0f} GB/s (read+write), bf16 matmul {peak:.0f} TFLOP/s")
    rows: list[Row] = []
    prefill_shapes = [(4, 4096, 32, 8, 128), (2, 8192, 32, 8, 128), (1, 16384, 32, 8, 128),
                      (2, 8192, 32, 8, 64)]
    if args.quick:
        prefill_shapes = prefill_shapes[:1]
    for shape in prefill_shapes:
        rows.append(bench_prefill(*shape, sweep=not args.no_sweep, iters=iters))
    decode_shapes = [(32, 4096, 32, 8, 128), (1, 16384, 32, 8, 128), (64, 1024, 32, 8, 128),
                     (32, 4096, 32, 8, 64)]
    if args.quick:
        decode_shapes = decode_shapes[:1]
    rows.extend(bench_decode(*shape, iters=iters) for shape in decode_shapes)
    rows.append(bench_kv_write(64, 8, 128, iters=iters))
    rows.append(bench_kv_write(16384, 8, 128, iters=iters))
    for n in (64, 16384):
        rows.append(bench_rms_norm(n, 4096, iters=iters))
        rows.append(bench_rotary(n, 32, 8, 128, iters=iters))
    for k, p, mp in [(50, 0.9, 0.0), (0, 0.95, 0.0), (0, 1.0, 0.05), (0, 1.0, 0.0)]:
        rows.append(bench_sampling(64, 131072, k, p, mp, iters=iters))

    head = (f"{'kernel':24} {'shape':36} {'ours ms':>9} {'torch ms':>9} {'speedup':>8} "
            f"{'achieved':>16} {'of ceiling':>10} {'check':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "tflops" in r:
            ach, frac = f"{r['tflops']:.0f} TFLOP/s", r["tflops"] / peak
        else:
            ach, frac = f"{r['gbps']:.0f} GB/s", r["gbps"] / bw
        r["speedup"] = r["ms_torch"] / r["ms"]
        r["fraction_of_ceiling"] = frac
        print(f"{r['kernel']:24} {r['shape']:36} {r['ms']:9.3f} {r['ms_torch']:9.3f} "
              f"{r['speedup']:7.2f}x {ach:>16} {frac:9.0%} {'ok' if r['ok'] else 'FAIL':>6}")
        if r.get("config") not in (None, "default"):
            print(f"{'':24} best tile config {r['config']} (default {r['ms_default']:.3f} ms)")
    out_dir = os.environ.get("OUT")
    if out_dir:
        payload = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
                   "copy_gbps": bw, "matmul_tflops": peak, "rows": rows}
        path = Path(out_dir) / "kernels_gpu.json"
        path.write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
