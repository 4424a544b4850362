"""Engine throughput and latency on CPU, on the ``small`` preset (about 100M parameters).

Run: ``python benchmarks/engine_cpu.py [--model DIR] [--tokens 64] [--threads N] [--clock cpu]
[--dtypes float32,bfloat16,int4] [--skip-hf] [--skip-quality]``

``int4`` is the engine in bfloat16 with ``quantization="int4"`` (4-bit weights in groups of
32, see resultity_runtime/_quant.py): not numerically the checkpoint, so the run also prints
its quality on the trained demo model (greedy answers to the 98 held-out questions identical
to float32's, and the answers holding the expected keyword) next to bfloat16's.

The model directory is created with ``init_model_dir`` (preset small, seed 0) under
``~/.cache/resultity/models/small-seed0`` unless it exists. Figures, per dtype, in one run:

- decode tokens/s at batch 1, engine against transformers ``generate`` (greedy, same weights,
  use_cache=True) in the same dtype, and every engine dtype against transformers float32 (the
  checkpoint's dtype, transformers' default). Both are measured the same way: (T(n tokens) -
  T(1 token)) / (n - 1), so prefill and the first token are excluded;
- aggregate tokens/s with 1, 16 and 64 concurrent requests (whole requests, prefill
  included), 16 against 1; and decode tokens/s of 16 concurrent requests against 1 measured
  like batch-1 decode (prefill excluded);
- time to first token of a 512-token prompt (engine.generate with max_tokens=1);
- peak RSS (VmHWM from /proc/self/status, reset between phases through
  /proc/self/clear_refs) while serving 1, 16 and 64 concurrent requests.

Each figure is printed with the 1-minute load average at the time it was taken: on a shared
machine use ``--threads 1 --clock cpu`` (process CPU time, best of ``--runs``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from resultity_runtime import Engine, SamplingParams, init_model_dir

DEFAULT_DIR = Path.home() / ".cache" / "resultity" / "models" / "small-seed0"
PROMPT = (
    "The Network publishes a signed config snapshot, every node verifies the signatures and "
    "the hash, then the Agent installs the approved models and leases jobs by long poll."
)


_clock = {"now": time.perf_counter}


def _now() -> float:
    return _clock["now"]()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        t0 = _now()
        fn()
        times.append(_now() - t0)
    return min(times)


def _prompt_ids(engine: Engine, length: int) -> list[int]:
    ids = engine.tokenizer.encode(PROMPT, add_bos=True)
    while len(ids) < length:
        ids += ids[1:]
    return ids[:length]


def bench_engine_decode(engine: Engine, prompt: list[int], n: int, runs: int,
                        count: int = 1) -> float:
    """Returns decode tokens/s (all sequences together) of ``count`` concurrent requests:
    (T(n tokens) - T(1 token)) / (count * (n - 1)), so their prefill step is excluded."""
    prompts = [[prompt[0], 3000 + i, *prompt[2:]] for i in range(count)]

    def gen(k: int) -> Callable[[], object]:
        p = SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
        return lambda: engine.generate(prompts if count > 1 else [prompt], p)

    t1 = _best_of(runs, gen(1))
    tn = _best_of(runs, gen(n))
    return count * (n - 1) / (tn - t1)


def bench_hf_decode(model_dir: Path, prompt: list[int], n: int, runs: int,
                    dtype: torch.dtype) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()  # type: ignore[no-untyped-call]
    ids = torch.tensor([prompt])
    eos = model.config.eos_token_id

    def gen(k: int) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                    min_new_tokens=k, do_sample=False, use_cache=True,
                    pad_token_id=eos[0] if isinstance(eos, list) else eos,
                )
        return run

    gen(4)()  # warm up
    t1 = _best_of(runs, gen(1))
    tn = _best_of(runs, gen(n))
    return (n - 1) / (tn - t1)


def bench_concurrent(
    engine: Engine, prompt: list[int], count: int, n: int, runs: int
) -> tuple[float, int]:
    """Returns (best aggregate generated tokens/s over ``runs``, peak RSS KiB) for ``count``
    concurrent requests."""
    p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    best, peak = 0.0, 0
    for r in range(runs):
        # distinct prompts (no prefix sharing beyond the first block): vary the second token
        prompts = [[prompt[0], 1000 + 100 * r + i, *prompt[2:]] for i in range(count)]
        _reset_peak_rss()
        t0 = _now()
        outs = engine.generate(prompts, p)
        dt = _now() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        assert tokens == count * n
        best = max(best, tokens / dt)
        peak = max(peak, _status_kib("VmHWM"))
    return best, peak


def bench_ttft(engine: Engine, length: int, runs: int) -> float:
    base = _prompt_ids(engine, length)
    p = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for i in range(runs):
        prompt = [base[0], 200 + i, *base[2:]]  # a fresh prompt: no prefix cache hit
        t0 = _now()
        engine.generate([prompt], p)
        times.append(_now() - t0)
    return statistics.median(times)


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def measure_engine(
    model: Path, variant: str, tokens: int, prompt_len: int, runs: int
) -> tuple[dict[str, tuple[float, str]], list[int]]:
    """Returns ({measure: (value, load average when taken)}, the prompt's token ids)."""
    t0 = _now()
    # the step budget (512 tokens) bounds activation memory whatever the number of requests
    engine = Engine.from_pretrained(model, device="cpu", **_VARIANTS[variant],
                                    kv_cache_bytes=256 << 20, max_num_seqs=64,
                                    max_num_batched_tokens=512)
    res = {"load_s": (_now() - t0, _load()), "kv_mib": (engine.kv_cache.nbytes / 2**20, "")}
    prompt = _prompt_ids(engine, prompt_len)
    engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))  # warm up
    res["decode"] = (bench_engine_decode(engine, prompt, tokens, runs), _load())
    res["decode16"] = (bench_engine_decode(engine, prompt, tokens, runs, 16), _load())
    for count in (1, 16, 64):
        agg, rss = bench_concurrent(engine, prompt, count, tokens, runs if count < 64 else 1)
        res[f"agg{count}"], res[f"rss{count}"] = (agg, _load()), (rss / 1024, "")
    res["ttft"] = (bench_ttft(engine, 512, runs) * 1e3, _load())
    return res, prompt


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "int4": "int4"}
_VARIANTS: dict[str, dict[str, str]] = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int4": {"dtype": "bfloat16", "quantization": "int4"},
}


def demo_quality(variants: list[str]) -> list[tuple[str, str, str]]:
    """Return table rows: on the trained demo model, each variant against float32 on the
    held-out questions: greedy answers (with the keyword, identical to float32's), and,
    teacher-forced over question + canonical answer, top-1 agreement and max logit gap."""
    from resultity_runtime._demo_corpus import FACTS, demo_model_path, heldout_questions
    from resultity_runtime._train import train_forward

    held = heldout_questions()
    chats = [[{"role": "user", "content": h.question}] for h in held]
    answer = {f.name: f.answer for f in FACTS}
    params = SamplingParams(max_tokens=96, temperature=0.0)
    answers: dict[str, list[tuple[int, ...]]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    rows = []
    for variant in ["float32", *[v for v in variants if v != "float32"]]:
        engine = Engine.from_pretrained(demo_model_path(), **_VARIANTS[variant],
                                        kv_cache_bytes=32 << 20)
        outs = [o.outputs[0] for o in engine.generate(chats, params)]
        answers[variant] = [tuple(o.token_ids) for o in outs]
        tok = engine.tokenizer
        with torch.inference_mode():
            logits[variant] = [train_forward(engine.model, torch.tensor([tok.encode_with_special(
                tok.apply_chat_template([*c, {"role": "assistant", "content": answer[h.fact]}],
                                        add_generation_prompt=False), add_bos=True)]))[0]
                for h, c in zip(held, chats, strict=True)]
        hits = sum(h.keyword in o.text.lower() for h, o in zip(held, outs, strict=True))
        same = sum(a == b for a, b in zip(answers[variant], answers["float32"], strict=True))
        pairs = list(zip(logits[variant], logits["float32"], strict=True))
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in pairs)
        gap = max(float((a - b).abs().max()) for a, b in pairs)
        short = _SHORT[variant]
        rows.append((f"demo model {short}: answers with the keyword / identical to fp32",
                     f"{hits} / {same} of {len(held)}", ""))
        if variant != "float32":
            total = sum(a.shape[0] for a, _ in pairs)
            rows.append((f"demo model {short}: teacher-forced top-1 = fp32's / max logit gap",
                         f"{agree / total:.2%} / {gap:.2f}", ""))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16,int4",
                    help="comma-separated engine variants: float32, bfloat16, int4 (bfloat16 "
                         "with 4-bit weights)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-quality", action="store_true",
                    help="skip the demo-model quality rows of bfloat16 and int4")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time with process CPU time (robust on a loaded machine, exact "
                         "with --threads 1; 'tok/s' then means tokens per CPU-second)")
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in _SHORT for d in dtypes):
        ap.error("--dtypes: use float32, bfloat16 and/or int4")
    if args.threads:
        torch.set_num_threads(args.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if args.clock == "cpu":
        _clock["now"] = time.process_time

    if not (args.model / "model.safetensors").is_file():
        print(f"creating the small preset in {args.model}", file=sys.stderr)
        init_model_dir(args.model, "small", seed=0, progress=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, loadavg before {' '.join(load)}")
    if not _reset_peak_rss():
        print("# /proc/self/clear_refs not writable: peak RSS is cumulative")

    rows: list[tuple[str, str, str]] = []
    hf: dict[str, float] = {}
    summary: dict[str, tuple[float, float]] = {}  # variant: (batch-1 decode tok/s, 16 vs 1)
    prompt: list[int] = []
    for dtype in dtypes:
        short = _SHORT[dtype]
        res, prompt = measure_engine(args.model, dtype, args.tokens, args.prompt_len, args.runs)
        dec, dec_load = res["decode"]
        summary[dtype] = (dec, res["agg16"][0] / res["agg1"][0])
        rows += [(f"engine {short} load (s)", f"{res['load_s'][0]:.2f}", res["load_s"][1]),
                 (f"engine {short} decode tok/s, batch 1", f"{dec:.1f}", dec_load)]
        if not args.skip_hf and dtype != "int4":
            hf[dtype] = bench_hf_decode(args.model, prompt, args.tokens, args.runs,
                                        getattr(torch, dtype))
            rows += [(f"transformers {short} generate decode tok/s, batch 1",
                      f"{hf[dtype]:.1f}", _load()),
                     (f"engine {short} / transformers {short}"
                      + (" (target >= 2x)" if dtype == "float32" else ""),
                      f"{dec / hf[dtype]:.2f}x", "")]
        if not args.skip_hf:
            if "bfloat16" in hf and dtype == "int4":
                rows += [(f"engine {short} / transformers bf16", f"{dec / hf['bfloat16']:.2f}x",
                          "")]
            if "float32" in hf and dtype != "float32":
                rows += [(f"engine {short} / transformers fp32 (target >= 2x)",
                          f"{dec / hf['float32']:.2f}x", "")]
        agg1, agg16, agg64 = res["agg1"], res["agg16"], res["agg64"]
        rows += [
            (f"engine {short} aggregate tok/s, 1 request", f"{agg1[0]:.1f}", agg1[1]),
            (f"engine {short} aggregate tok/s, 16 concurrent", f"{agg16[0]:.1f}", agg16[1]),
            (f"engine {short} 16 vs 1 (target >= 8x)", f"{agg16[0] / agg1[0]:.2f}x", ""),
            (f"engine {short} aggregate tok/s, 64 concurrent", f"{agg64[0]:.1f}", agg64[1]),
            (f"engine {short} decode tok/s, 16 concurrent (prefill excluded)",
             f"{res['decode16'][0]:.1f}", res["decode16"][1]),
            (f"engine {short} decode 16 vs 1 (prefill excluded)",
             f"{res['decode16'][0] / dec:.2f}x", ""),
            (f"engine {short} time to first token, 512-token prompt (ms)",
             f"{res['ttft'][0]:.0f}", res["ttft"][1]),
            (f"engine {short} peak RSS, 1 / 16 / 64 requests (MiB)",
             " / ".join(f"{res[f'rss{c}'][0]:.0f}" for c in (1, 16, 64)), ""),
        ]
    if not args.skip_quality and any(d != "float32" for d in dtypes):
        rows += demo_quality(dtypes)
    width = max(len(k) for k, _, _ in rows)
    print(f"# model {args.model}, prompt {args.prompt_len} tokens, "
          f"{args.tokens} generated per request, greedy, clock {args.clock}")
    print(f"| {'measure'.ljust(width)} | value | loadavg |")
    print(f"|{'-' * (width + 2)}|-------|---------|")
    for k, v, lo in rows:
        print(f"| {k.ljust(width)} | {v} | {lo} |")
    best_hf = max(hf.values(), default=0.0)
    for dtype, (dec, ratio) in summary.items():
        vs = (f"{dec / best_hf:.2f}x transformers' best ({max(hf, key=hf.__getitem__)})"
              if best_hf else "transformers skipped")
        print(f"# {dtype}: batch-1 decode {vs} (target 2x: "
              f"{'met' if best_hf and dec >= 2 * best_hf else 'not met'}); 16 vs 1 "
              f"{ratio:.2f}x (target 8x: {'met' if ratio >= 8 else 'not met'})")
    load = Path("/proc/loadavg").read_text().split()[:3]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(f"# loadavg after {' '.join(load)}; this process used {cpu:.0f} CPU-s in {wall:.0f} s "
          f"({cpu / wall / torch.get_num_threads():.0%} of its {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
