"""``resultity model``: create local model directories (``model init``) and run one
(``model run``: generate from a prompt in this process, streamed, with the speed)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from resultity_core import RUNTIME_DTYPES, RUNTIME_QUANTIZATIONS

from ._common import CLIError, add_command_group

__all__ = ["register"]

_PRESETS = ("tiny", "small", "demo")
_DESCRIPTION = """\
Model directories in the Hugging Face format the Runtime loads (config.json, model.safetensors,
tokenizer.model, tokenizer_config.json with a chat template). No weights can be downloaded, so
`init` writes a Llama-shaped model with random weights and a sentencepiece tokenizer trained on
text that ships with resultity: `tiny` (about 4M parameters) for tests, `small` (about 100M
parameters, vocab 32000) for benchmarks. `demo` is not random: it copies the small model
trained on questions about Resultity that ships with the runtime (what `resultity demo` serves).
`run` loads any such directory in this process and streams a reply: a quick check that a
model loads and answers, and of what dtype and quantization do to its speed.
"""


def register(subparsers: Any) -> None:
    """Add ``model init`` to the CLI."""
    sub = add_command_group(subparsers, "model", help="create local model directories",
                            description=_DESCRIPTION)
    init = sub.add_parser(
        "init",
        help="write a model directory with random weights",
        description="Write a complete model directory at DIR. The same preset and seed give "
        "byte-identical files. Progress goes to standard error; the directory and its "
        "parameter count are printed on standard output.",
    )
    init.add_argument("dir", metavar="DIR", help="the directory to write (created if needed)")
    init.add_argument("--preset", choices=_PRESETS, default="tiny",
                      help="model size (default: tiny)")
    init.add_argument("--seed", type=int, default=0,
                      help="seed of the random weights, a non-negative integer (default: 0)")
    init.add_argument("--force", action="store_true",
                      help="write into DIR even if it is not empty (model files are replaced)")
    init.set_defaults(handler=_init)

    run = sub.add_parser(
        "run",
        help="generate from a prompt with a local model directory",
        description="Load the model directory DIR in this process and stream the reply to "
        "PROMPT on standard output (through the model's chat template unless --raw). The "
        "load time, the time to the first token and the decode speed go to standard error.",
    )
    run.add_argument("dir", metavar="DIR", help="a Hugging Face style Llama-family directory")
    run.add_argument("prompt", metavar="PROMPT", help="the user message ('-': standard input)")
    run.add_argument("--raw", action="store_true",
                     help="complete PROMPT as plain text instead of a chat message")
    run.add_argument("--max-tokens", type=int, default=128,
                     help="most tokens to generate (default: 128)")
    run.add_argument("--temperature", type=float, default=0.0,
                     help="0 for greedy decoding (default: 0)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1)")
    run.add_argument("--seed", type=int, default=None, help="seed of a sampled reply")
    run.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    run.add_argument("--dtype", choices=RUNTIME_DTYPES, default="auto",
                     help="auto: float32 on CPU, the checkpoint's half type on CUDA; bfloat16 "
                     "is faster on CPUs with AVX512-BF16/AMX")
    run.add_argument("--quantization", choices=RUNTIME_QUANTIZATIONS, default="none",
                     help="int4: 4-bit weights (CPU, bfloat16), the fastest decode, outputs "
                     "close to but not exactly the checkpoint's")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (default: torch's choice)")
    run.set_defaults(handler=_run)


def _init(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise CLIError(f"--seed must be a non-negative integer, got {args.seed}", status=2)
    if args.preset == "demo" and args.seed != 0:
        raise CLIError("--seed: the demo preset is a trained model (seed 0); train another with "
                       "examples/train_demo_model.py --seed N", status=2)
    path = Path(args.dir)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not args.force:
        raise CLIError(f"{path}: directory is not empty (use --force to overwrite)")
    try:
        from resultity_runtime import _presets
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise CLIError(f"model init needs the runtime extra (pip install resultity[runtime]): "
                       f"{exc}") from None
    try:
        out = _presets.init_model_dir(path, args.preset, args.seed, force=True, progress=True)
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from None
    params = _presets.preset_num_params(args.preset)
    print(f"{out}: {args.preset} preset, seed {args.seed}, {params:,} parameters")
    sys.stdout.flush()
    return 0


def _run(args: argparse.Namespace) -> int:
    for name, value, low in (("--max-tokens", args.max_tokens, 1), ("--threads", args.threads, 0)):
        if value < low:
            raise CLIError(f"{name} must be at least {low}, got {value}", status=2)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CLIError("PROMPT is empty", status=2)
    try:
        import torch

        from resultity_runtime import Engine, SamplingParams
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise CLIError(f"model run needs the runtime extra (pip install resultity[runtime]): "
                       f"{exc}") from None
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise CLIError(f"{exc}", status=2) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        engine = Engine.from_pretrained(
            args.dir, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
            quantization=None if args.quantization == "none" else args.quantization,
            kv_cache_bytes=64 << 20, max_num_seqs=1)
    except ValueError as exc:  # device, dtype or quantization this machine cannot run
        raise CLIError(str(exc), status=2) from None
    loaded = time.perf_counter()
    quant = "no quantization" if args.quantization == "none" else args.quantization
    print(f"loaded {args.dir} in {loaded - started:.2f} s "
          f"({str(engine.dtype).removeprefix('torch.')}, {quant}, {engine.device.type}, "
          f"{torch.get_num_threads()} threads)", file=sys.stderr)
    request: object = prompt if args.raw else [{"role": "user", "content": prompt}]
    engine.add_request("run", request, params)  # type: ignore[arg-type]
    first: float | None = None
    tokens = 0
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.token_ids and first is None:
                first = time.perf_counter()
            tokens += len(delta.token_ids)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if delta.finished:
                sys.stdout.write("\n")
                reason = delta.finish_reason
    done = time.perf_counter()
    first = first or done
    decode = f", {(tokens - 1) / (done - first):.1f} tokens/s after the first" if tokens > 1 \
        else ""
    print(f"{tokens} tokens ({reason}); first token after {1000 * (first - loaded):.0f} ms"
          f"{decode}", file=sys.stderr)
    return 0
