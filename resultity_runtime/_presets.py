"""``model init``: write a complete Hugging Face model directory with random weights.

The tokenizer is trained with sentencepiece on text this package ships (data/corpus.txt)
expanded by a deterministic generator (sentences about the network, numbers, punctuation,
pseudo-words for lexical variety), so the ``small`` preset reaches a real 32000-piece vocab.
The tokenizer does not depend on the seed; the weights do. Same preset and seed, same bytes.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from ._config import load_config, parse_config
from ._demo_corpus import demo_model_path
from ._loader import hf_tensor_shapes

__all__ = ["DEMO_PRESET", "PRESETS", "Preset", "generate_corpus", "init_model_dir",
           "preset_num_params"]

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML turns; the BOS string comes first, so encode_chat must not add a second BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@attrs.frozen
class Preset:
    """The shape of a generated model and the size of its tokenizer training text."""

    name: str
    tokenizer_vocab: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    corpus_lines: int
    lexicon_size: int
    max_position_embeddings: int = 4096


# the trained model of _train.py (this is its shape): copied from data/demo_model, not generated
DEMO_PRESET = "demo"
PRESETS = {
    "tiny": Preset("tiny", 2048, 2048, 256, 688, 4, 4, 2, False, 4_000, 1_500),
    "small": Preset("small", 32000, 32000, 768, 2048, 12, 12, 4, True, 120_000, 60_000),
    DEMO_PRESET: Preset(DEMO_PRESET, 1536, 1536, 192, 512, 4, 6, 2, True, 0, 0, 1024),
}

_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "ch", "cl", "dr", "fl", "gr", "kr", "pl", "qu", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "ea", "io", "ou", "ee", "oa")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "x", "nd", "rk", "st", "ng", "ck")
_ROLES = ("Account", "Agent", "Runtime", "Network", "Cloud", "node", "client", "engine")
_VERBS = ("signs", "routes", "streams", "verifies", "leases", "settles", "caches", "schedules",
          "rejects", "publishes", "installs", "cancels", "reserves", "counts", "encodes")
_OBJECTS = ("a snapshot", "the receipt", "every job", "the credits", "a config", "tokens",
            "the model", "its key", "the blocks", "a request", "the release", "one command")
_COMMANDS = ("demo", "cloud", "network", "node", "keys", "snapshot", "account", "model init")


def _pseudo_word(rng: random.Random) -> str:
    n = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(n))


def generate_corpus(lines: int, lexicon_size: int) -> Iterator[str]:
    """Yield the deterministic tokenizer training text: shipped lines, then generated ones."""
    shipped = resources.files("resultity_runtime").joinpath("data/corpus.txt")
    base = [ln for ln in shipped.read_text(encoding="utf-8").splitlines() if ln.strip()]
    yield from base
    rng = random.Random(20260314)
    lexicon = sorted({_pseudo_word(rng) for _ in range(lexicon_size)})
    rng.shuffle(lexicon)
    for i in range(lines):
        kind = i % 5
        if kind == 0:
            yield rng.choice(base)
        elif kind == 1:
            yield (f"The {rng.choice(_ROLES)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                   f"{rng.randint(0, 99999)} times, at {rng.randint(0, 23):02d}:"
                   f"{rng.randint(0, 59):02d}; cost: {rng.random() * 100:.3f} credits.")
        elif kind == 2:
            yield (f"$ resultity {rng.choice(_COMMANDS)} --seed {rng.randint(0, 9999)} "
                   f"--port {rng.randint(1024, 65535)} # job-{rng.getrandbits(32):08x}")
        else:
            # Zipf-like choice: low lexicon indexes are far more frequent than high ones
            words = [lexicon[int(len(lexicon) * rng.random() ** 2.5)]
                     for _ in range(rng.randint(4, 14))]
            punct = rng.choice((".", "!", "?", ",", ";", ":", " -", "..."))
            words[0] = words[0].capitalize()
            yield " ".join(words) + punct


def _train_tokenizer(preset: Preset) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=generate_corpus(preset.corpus_lines, preset.lexicon_size),
        model_writer=buf,
        model_type="bpe",
        vocab_size=preset.tokenizer_vocab,
        character_coverage=1.0,
        byte_fallback=True,
        num_threads=1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(SPECIAL_TOKENS),
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def _config_json(p: Preset, im_end: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": [2, im_end],
        "head_dim": p.hidden_size // p.num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": p.vocab_size,
    }


def _tokenizer_config(im_start: int, im_end: int) -> dict[str, Any]:
    def added(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": added("<unk>"), "1": added("<s>"), "2": added("</s>"),
            str(im_start): added("<|im_start|>"), str(im_end): added("<|im_end|>"),
        },
        "additional_special_tokens": list(SPECIAL_TOKENS),
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }


def preset_num_params(preset: str) -> int:
    """Return the parameter count of a preset's model; raise ValueError for an unknown one."""
    if preset == DEMO_PRESET:
        return load_config(demo_model_path()).num_params
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r} (use one of {', '.join(PRESETS)})")
    return parse_config(_config_json(PRESETS[preset], 4)).num_params


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _progress(message: str) -> None:
    print(f"model init: {message}", file=sys.stderr, flush=True)


def init_model_dir(
    path: str | Path, preset: str = "tiny", seed: int = 0, *, force: bool = False,
    progress: bool = False,
) -> Path:
    """Write a complete Hugging Face Llama model directory at ``path`` and return it.

    Files: config.json, generation_config.json, model.safetensors (normal(0, 0.02) weights
    from ``seed``, norms at 1), tokenizer.model, tokenizer_config.json (with a chat template),
    special_tokens_map.json. The ``demo`` preset copies the trained demo model that ships in
    the package (seed 0 only; examples/train_demo_model.py retrains it). Raises ValueError for
    an unknown preset or a bad seed, and FileExistsError when ``path`` holds files and
    ``force`` is false.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r} (use one of {', '.join(PRESETS)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    if preset == DEMO_PRESET and seed != 0:
        raise ValueError(f"seed: the demo preset is the trained model of seed 0, got {seed} "
                         f"(train another with examples/train_demo_model.py --seed {seed})")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: directory is not empty (use force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    # a stale index or shards from an earlier model would take precedence over ours
    for stale in [out / "model.safetensors.index.json", *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    if preset == DEMO_PRESET:
        if progress:
            _progress("copying the trained demo model")
        for src in sorted(demo_model_path().iterdir()):
            shutil.copyfile(src, out / src.name)
        return out

    p = PRESETS[preset]
    if progress:
        _progress(f"training a {p.tokenizer_vocab}-piece sentencepiece tokenizer")
    proto = _train_tokenizer(p)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    im_start, im_end = (sp.piece_to_id(t) for t in SPECIAL_TOKENS)
    (out / "tokenizer.model").write_bytes(proto)
    config = _config_json(p, im_end)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": 1, "eos_token_id": [2, im_end], "do_sample": False})
    _write_json(out / "tokenizer_config.json", _tokenizer_config(im_start, im_end))
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": list(SPECIAL_TOKENS), "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"})

    shapes = hf_tensor_shapes(parse_config(config))
    if progress:
        n = sum(int(torch.Size(s).numel()) for s in shapes.values())
        _progress(f"generating {n / 1e6:.1f}M random parameters (seed {seed})")
    # numpy's PCG64 stream and ziggurat normal are the same on every platform; torch's CPU
    # randn takes a vectorised path whose last bits differ between CPU types
    rng = np.random.Generator(np.random.PCG64(seed))
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            tensors[name] = torch.from_numpy(values)
    if progress:
        _progress("writing model.safetensors")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    return out
