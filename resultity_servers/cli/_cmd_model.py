"""``resultity model``: create local model directories (``model init``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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
