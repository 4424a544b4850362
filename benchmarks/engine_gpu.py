"""Engine decode speed on a CUDA GPU: tokens/s at batch 1 and 64, torch vs triton backends.

Needs the whole project installed (``pip install -e .[gpu]``: resultity_runtime with torch,
sentencepiece, safetensors, jinja2, plus triton), unlike kernels_gpu.py. Run from the
repository root:

    python benchmarks/engine_gpu.py [--tokens 128] [--prompt 64] [--models small,1b]

Models, both with random weights: the ``small`` preset (written with ``init_model_dir`` into a
temporary directory; the tokenizer training takes a minute on the CPU) and a ~1B-parameter
Llama-shaped model (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192, vocabulary
32000, tied embeddings: about 1.0e9 parameters) built in memory on the GPU, sharing the small
model's tokenizer. All in bfloat16.

Decode tokens/s is measured as in engine_cpu.py: (T(n tokens) - T(1 token)) / (n - 1) per
request (greedy, ignore_eos), so prefill and the first token are excluded; batch B counts
B * (n - 1) tokens. The batch-1 roofline is the measured copy bandwidth (a large device copy,
read + write bytes) divided by the weight bytes each token must read. The torch and triton
backends are also compared on greedy tokens. With OUT set, results go to
$OUT/engine_gpu.json. Without a CUDA device it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ONE_B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "tie_word_embeddings": True, "max_position_embeddings": 4096,
}


def copy_bandwidth() -> float:
    """Copy bandwidth in GB/s: a 1 GiB device-to-device copy, (read + write bytes) / time."""
    n = 1 << 29
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n * 2 / statistics.median(times) / 1e9


def _best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_tps(engine: Any, batch: int, prompt_len: int, n: int, runs: int) -> float:
    """Aggregate decode tokens/s of ``batch`` concurrent greedy requests."""
    from resultity_runtime import SamplingParams

    vocab = engine.config.vocab_size
    prompts = [[(7 + 31 * i + 17 * j) % (vocab - 10) + 5 for j in range(prompt_len)]
               for i in range(batch)]

    def gen(k: int) -> Callable[[], object]:
        p = SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
        return lambda: engine.generate(prompts, p)

    gen(4)()  # warm-up: kernel compilation, allocator
    t1 = _best_of(runs, gen(1))
    tn = _best_of(runs, gen(n))
    return batch * (n - 1) / (tn - t1)


def greedy_tokens(engine: Any, n: int) -> list[list[int]]:
    from resultity_runtime import SamplingParams

    vocab = engine.config.vocab_size
    prompts = [[(11 * i + 3 * j) % (vocab - 10) + 5 for j in range(20 + 7 * i)] for i in range(4)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0,
                                                   ignore_eos=True))
    return [list(o.token_ids) for o in outs]


def make_engine(name: str, small_dir: Path, backend: str) -> Any:
    from resultity_runtime import Engine
    from resultity_runtime._config import parse_config
    from resultity_runtime._model import LlamaForCausalLM
    from resultity_runtime._tokenizer import load_tokenizer

    kwargs: dict[str, Any] = {"backend": backend, "max_num_seqs": 64, "kv_cache_bytes": 8 << 30,
              "max_num_batched_tokens": 8192}
    if name == "small":
        return Engine.from_pretrained(small_dir, device="cuda", dtype="bfloat16", **kwargs)
    raw = json.loads((small_dir / "config.json").read_text())
    raw.update(ONE_B)
    config = parse_config(raw)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    model.eval()
    tokenizer = load_tokenizer(small_dir, config)
    return Engine(model, config, tokenizer, device="cuda", **kwargs)


def weight_bytes(engine: Any) -> int:
    """Bytes of weights a decode step reads: every distinct parameter once (a tied embedding
    table counts once, as lm_head reads it in full)."""
    seen: set[int] = set()
    total = 0
    for p in engine.model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--models", default="small,1b", help="comma-separated: small, 1b")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_gpu: no CUDA device; nothing to measure (run on a GPU machine)")
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from resultity_runtime import init_model_dir

    device = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {device}; torch {torch.__version__}; copy {bw:.0f} GB/s (read+write)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        small_dir = init_model_dir(Path(tmp) / "small", "small", seed=0, progress=True)
        for name in args.models.split(","):
            greedy: dict[str, list[list[int]]] = {}
            for backend in ("torch", "triton"):
                engine = make_engine(name, small_dir, backend)
                params = engine.config.num_params
                wbytes = weight_bytes(engine)
                # batch 1 reads every weight once per token: tokens/s at the copy bandwidth
                roofline = bw * 1e9 / wbytes
                greedy[backend] = greedy_tokens(engine, 32)
                for batch in (1, 64):
                    tps = decode_tps(engine, batch, args.prompt, args.tokens, args.runs)
                    row = {"model": name, "params": params, "backend": backend, "batch": batch,
                           "tokens_per_s": tps,
                           "roofline_tokens_per_s": roofline if batch == 1 else None,
                           "fraction_of_roofline": tps / roofline if batch == 1 else None}
                    rows.append(row)
                    frac = f"{tps / roofline:6.1%} of roofline" if batch == 1 else ""
                    print(f"{name:6} {params / 1e9:5.2f}B {backend:7} batch {batch:3}: "
                          f"{tps:9.1f} tokens/s {frac}", flush=True)
                del engine
                torch.cuda.empty_cache()
            same = sum(a == b for a, b in zip(greedy["torch"], greedy["triton"], strict=True))
            print(f"{name}: greedy tokens identical for {same}/{len(greedy['torch'])} prompts "
                  "(torch vs triton backend)")
            rows.append({"model": name, "greedy_identical": same,
                         "greedy_prompts": len(greedy["torch"])})
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "engine_gpu.json"
        path.write_text(json.dumps({"device": device, "copy_gbps": bw, "rows": rows}, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
