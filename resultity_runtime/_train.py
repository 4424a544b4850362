"""Train the demo model: a small Llama on the generated Resultity dialogues, with our model code.

Training runs ``LlamaForCausalLM``'s own modules (embedding, fused projections, RMSNorm, RoPE,
lm_head) over padded ``[B, T]`` batches with plain causal attention instead of the paged
cache; ``train_forward`` computes exactly what the paged forward computes. The result is a
Hugging Face directory (the same files ``init_model_dir`` writes) that our Engine and
transformers load alike. Loss is taken on the assistant answers only (the prompt is masked).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import attrs
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from . import _presets
from ._config import ModelConfig, parse_config
from ._demo_corpus import Dialogue, generate_dialogues
from ._model import DecoderLayer, LlamaForCausalLM, _rotate

__all__ = ["DEMO_TRAIN_CONFIG", "TrainConfig", "TrainResult", "encode_dialogue",
           "train_demo_model", "train_forward"]


@attrs.frozen
class TrainConfig:
    """Model shape, corpus size and optimiser settings of a training run."""

    vocab_size: int = 1536
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    num_dialogues: int = 9_600  # steps * batch_size: every dialogue is seen once
    tokenizer_dialogues: int = 4_000
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    save_dtype: str = "float32"


DEMO_TRAIN_CONFIG = TrainConfig()


@attrs.frozen
class TrainResult:
    """What a run produced: the model directory, the loss of every step, the wall time."""

    path: Path
    losses: tuple[float, ...]
    seconds: float
    num_params: int


def _train_tokenizer(dialogues: Sequence[Dialogue], vocab_size: int) -> bytes:
    lines = [m["role"] + "\n" + m["content"] for d in dialogues for m in d]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=list(_presets.SPECIAL_TOKENS), unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    return buf.getvalue()


def encode_dialogue(sp: spm.SentencePieceProcessor, dialogue: Dialogue) -> tuple[list[int],
                                                                                list[bool]]:
    """Return the token ids of ``dialogue`` rendered by the chat template, and the loss mask.

    The ids equal what the Tokenizer makes of the rendered template (``<s>``, then
    ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message); the mask is true on assistant
    content and its ``<|im_end|>``, the tokens the model learns to produce.
    """
    im_start, im_end = (sp.piece_to_id(t) for t in _presets.SPECIAL_TOKENS)
    newline = sp.encode("\n")
    ids, mask = [sp.bos_id()], [False]
    for m in dialogue:
        if m["role"] == "assistant":
            head = [im_start, *sp.encode("assistant\n")]
            body = [*sp.encode(m["content"]), im_end]
            ids += head + body + newline
            mask += [False] * len(head) + [True] * len(body) + [False] * len(newline)
        else:
            part = [im_start, *sp.encode(m["role"] + "\n" + m["content"]), im_end, *newline]
            ids += part
            mask += [False] * len(part)
    return ids, mask


def _layers(model: LlamaForCausalLM) -> list[DecoderLayer]:
    return [cast("DecoderLayer", layer) for layer in model.layers]


def train_forward(model: LlamaForCausalLM, ids: Tensor) -> Tensor:
    """Return logits ``[B, T, vocab]`` of a right-padded batch ``ids`` ``[B, T]``.

    Same modules and arithmetic as ``LlamaForCausalLM.forward`` followed by
    ``compute_logits`` for each row, with causal attention over the row instead of the
    paged cache; padding on the right never affects earlier positions.
    """
    b, t = ids.shape
    x = model.embed_tokens(ids)  # [B, T, H]
    cos, sin = model.rope(torch.arange(t, device=ids.device), x.dtype)  # [T, 1, D]
    for layer in _layers(model):
        hq, hkv, d = layer.hq, layer.hkv, layer.d
        qkv = layer.qkv_proj(layer.input_layernorm(x)).view(b, t, hq + 2 * hkv, d)
        qk = _rotate(qkv[:, :, : hq + hkv], cos, sin)  # [B, T, Hq + Hkv, D]
        q = qk[:, :, :hq].transpose(1, 2)  # [B, Hq, T, D]
        k = qk[:, :, hq:].transpose(1, 2)  # [B, Hkv, T, D]
        v = qkv[:, :, hq + hkv :].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scale,
                                           enable_gqa=True)  # [B, Hq, T, D]
        x = x + layer.o_proj(o.transpose(1, 2).reshape(b, t, hq * d))
        gate, up = layer.gate_up_proj(layer.post_attention_layernorm(x)).chunk(2, dim=-1)
        x = x + layer.down_proj(F.silu(gate) * up)
    return model.compute_logits(model.norm(x))


def _model_config(cfg: TrainConfig, im_end: int) -> dict[str, object]:
    preset = _presets.Preset(
        "demo", cfg.vocab_size, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size,
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, True, 0, 0,
        cfg.max_position_embeddings)
    raw = _presets._config_json(preset, im_end)
    raw["torch_dtype"] = cfg.save_dtype
    return raw


def _init_weights(model: LlamaForCausalLM, cfg: TrainConfig) -> None:
    gen = torch.Generator().manual_seed(cfg.seed)
    # residual outputs scaled down with depth (GPT-2), norms at one
    out_std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _hf_state(model: LlamaForCausalLM, config: ModelConfig, dtype: torch.dtype
              ) -> dict[str, Tensor]:
    """Split the fused projections back into Hugging Face tensors (lm_head is tied)."""
    d = config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    out = {"model.embed_tokens.weight": model.embed_tokens.weight,
           "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(_layers(model)):
        p = f"model.layers.{i}."
        wq, wk, wv = torch.split(layer.qkv_proj.weight, [q, kv, kv])
        gate, up = layer.gate_up_proj.weight.chunk(2)
        out |= {
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": layer.o_proj.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.down_proj.weight,
        }
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(
        math.pi * frac)))


def _fmt(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def _progress_printer(total: int) -> Callable[[int, float, float], None]:
    tty = sys.stderr.isatty()
    every = max(1, total // 40)

    def show(step: int, loss: float, elapsed: float) -> None:
        if not tty and step % every and step != total:
            return
        width = 30
        done = width * step // total
        eta = elapsed / step * (total - step)
        line = (f"train [{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f} "
                f"elapsed {_fmt(elapsed)} eta {_fmt(eta)}")
        print(("\r" + line) if tty else line, end="" if tty and step != total else "\n",
              file=sys.stderr, flush=True)

    return show


def _batches(examples: list[tuple[list[int], list[bool]]], cfg: TrainConfig
             ) -> list[list[int]]:
    """Return the example indexes of every step: shuffled epochs, seeded."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    order: list[int] = []
    while len(order) < cfg.steps * cfg.batch_size:
        order += torch.randperm(len(examples), generator=gen).tolist()
    return [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.steps)]


def _collate(examples: list[tuple[list[int], list[bool]]], rows: list[int]
             ) -> tuple[Tensor, Tensor]:
    """Return (inputs ``[B, T]``, targets ``[B, T]`` with -100 where no loss is taken)."""
    width = max(len(examples[r][0]) for r in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.int64)
    targets = torch.full((len(rows), width), -100, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids, mask = examples[r]
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        targets[i, :n] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:],
                                                                          strict=True)])
    return inputs, targets


def train_demo_model(
    out_dir: str | Path, config: TrainConfig = DEMO_TRAIN_CONFIG, *, progress: bool = True,
) -> TrainResult:
    """Train the demo model and write its Hugging Face directory at ``out_dir``; return it.

    Deterministic for a given config on a given machine and torch build (seeded data order
    and weights, ``config.threads`` threads). ``progress``: a progress bar on stderr.
    Raises FileExistsError when ``out_dir`` holds files other than model files.
    """
    start = time.monotonic()
    out = Path(out_dir)
    known = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json"}
    if out.is_dir() and any(p.name not in known for p in out.iterdir()):
        raise FileExistsError(f"{out}: holds files that are not model files")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        dialogues = generate_dialogues(config.num_dialogues, config.seed)
        proto = _train_tokenizer(dialogues[: config.tokenizer_dialogues], config.vocab_size)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        im_start, im_end = (sp.piece_to_id(t) for t in _presets.SPECIAL_TOKENS)
        raw_config = _model_config(config, im_end)
        model_config = parse_config(raw_config)
        examples = [encode_dialogue(sp, d) for d in dialogues]
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config)
        _init_weights(model, config)
        decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2
                                                                   and "embed" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        show = _progress_printer(config.steps) if progress else None
        losses: list[float] = []
        t0 = time.monotonic()
        for step, rows in enumerate(_batches(examples, config)):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, config)
            inputs, targets = _collate(examples, rows)
            logits = train_forward(model, inputs)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            losses.append(loss.item())
            if show is not None:
                show(step + 1, losses[-1], time.monotonic() - t0)
        _write_model_dir(out, model, model_config, raw_config, proto, im_start, im_end,
                         getattr(torch, config.save_dtype))
    finally:
        torch.set_num_threads(threads)
    return TrainResult(out, tuple(losses), time.monotonic() - start, model_config.num_params)


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_model_dir(  # noqa: PLR0917
    out: Path, model: LlamaForCausalLM, config: ModelConfig, raw_config: dict[str, object],
    proto: bytes, im_start: int, im_end: int, dtype: torch.dtype,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto)
    _write_json(out / "config.json", raw_config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": 1, "eos_token_id": [2, im_end], "do_sample": False})
    _write_json(out / "tokenizer_config.json", _presets._tokenizer_config(im_start, im_end))
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": list(_presets.SPECIAL_TOKENS), "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"})
    save_file(_hf_state(model, config, dtype), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
