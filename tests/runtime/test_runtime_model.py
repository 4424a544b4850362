"""The model forward against Hugging Face transformers, driven through a paged KV cache.

Tolerance: float32 everywhere, max abs logit difference 1e-4 (logits are of order 1-10 here),
and identical greedy tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file

from resultity_runtime._attention import TorchAttentionBackend, build_metadata
from resultity_runtime._config import load_config
from resultity_runtime._loader import hf_tensor_shapes, load_weights
from resultity_runtime._model import LlamaForCausalLM

TOL = 1e-4
BLOCK = 16

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

CONFIGS: dict[str, dict[str, Any]] = {
    "gqa1-untied": {"num_key_value_heads": 4},
    "gqa2-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "gqa4-headdim": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16},
    "llama3-rope": {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "qwen2-bias": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rope_theta": 1000000.0,
        "eos_token_id": [2, 3],
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": None,
        "num_key_value_heads": 1,
    },
    "llama-attn-bias": {"attention_bias": True},
}


def write_model_dir(path: Path, overrides: dict[str, Any], seed: int = 0) -> Path:
    """Write config.json and random (large enough to be decisive) weights in HF names."""
    path.mkdir(parents=True, exist_ok=True)
    raw = {**BASE, **overrides}
    (path / "config.json").write_text(json.dumps(raw))
    config = load_config(path)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            tensors[name] = 0.2 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


class PagedRunner:
    """Drives the model step by step over a small paged cache with scattered block tables.

    The cache starts full of finite garbage, so reading a slot that was never written, or
    failing to mask one, changes the logits.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int = 48) -> None:
        cfg = model.config
        self.model = model
        weight = model.embed_tokens.weight
        self.device = weight.device
        gen = torch.Generator().manual_seed(123)
        shape = (num_blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim)

        def garbage() -> torch.Tensor:
            return (torch.randn(shape, generator=gen) * 50).to(self.device, weight.dtype)

        self.kv = [(garbage(), garbage()) for _ in range(cfg.num_hidden_layers)]
        self.free = list(range(num_blocks))
        random.Random(7).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.backend = TorchAttentionBackend()

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Run one forward over (seq_id, new_tokens) chunks; return each chunk's logits."""
        q_lens, s_lens, tables, ids, pos = [], [], [], [], []
        for sid, toks in chunks:
            ctx = self.lens.get(sid, 0)
            total = ctx + len(toks)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < total:
                table.append(self.free.pop())
            self.lens[sid] = total
            q_lens.append(len(toks))
            s_lens.append(total)
            tables.append(table)
            ids += toks
            pos += range(ctx, total)
        meta = build_metadata(q_lens, s_lens, tables, BLOCK, device=self.device)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids, device=self.device),
                                torch.tensor(pos, device=self.device), self.kv, meta,
                                self.backend)
            logits = self.model.compute_logits(hidden).cpu()
        return list(logits.split(q_lens))


def _load_pair(path: Path) -> tuple[LlamaForCausalLM, Any]:
    config = load_config(path)
    ours = load_weights(path, config)
    hf_cls = getattr(transformers, config.architecture)
    hf, info = hf_cls.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    return ours, hf.eval()


def _hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(sum(lengths))
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = write_model_dir(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])
    return _load_pair(path)


def test_packed_mixed_batch_matches_transformers(pair: Any) -> None:
    ours, hf = pair
    lengths = [37, 5, 16, 1, 17]  # longer than one block, exactly one block, single token
    prompts = _prompts(ours.config.vocab_size, lengths)
    runner = PagedRunner(ours)
    got = runner.step(list(enumerate(prompts)))
    for prompt, logits in zip(prompts, got, strict=True):
        ref = _hf_logits(hf, prompt)
        assert (logits - ref).abs().max().item() < TOL
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_chunked_prefill_and_batched_decode_match_transformers(pair: Any) -> None:
    ours, hf = pair
    prompts = _prompts(ours.config.vocab_size, [37, 9, 20])
    runner = PagedRunner(ours)
    # seq 0 prefilled in two chunks (20 + 17, the second with a cached prefix) alongside seq 1
    first = runner.step([(0, prompts[0][:20]), (1, prompts[1])])
    second = runner.step([(0, prompts[0][20:])])
    ref0 = _hf_logits(hf, prompts[0])
    assert (torch.cat([first[0], second[0]]) - ref0).abs().max().item() < TOL
    # a mixed step: seq 0 and 1 decode one token while seq 2 prefills 20 tokens
    seqs = {0: list(prompts[0]), 1: list(prompts[1])}
    nxt = {0: int(second[0][-1].argmax()), 1: int(first[1][-1].argmax())}
    mixed = runner.step([(0, [nxt[0]]), (2, prompts[2]), (1, [nxt[1]])])
    assert (mixed[1] - _hf_logits(hf, prompts[2])).abs().max().item() < TOL
    seqs[2] = list(prompts[2])
    nxt[2] = int(mixed[1][-1].argmax())
    last = {0: mixed[0][-1], 1: mixed[2][-1]}
    for sid in (0, 1):
        seqs[sid].append(nxt[sid])
        nxt[sid] = int(last[sid].argmax())
    # pure decode steps at batch 3 (max_query_len == 1 path)
    for _ in range(6):
        out = runner.step([(sid, [nxt[sid]]) for sid in (0, 1, 2)])
        for sid, logits in zip((0, 1, 2), out, strict=True):
            seqs[sid].append(nxt[sid])
            ref = _hf_logits(hf, seqs[sid])[-1]
            assert (logits[-1] - ref).abs().max().item() < TOL
            nxt[sid] = int(logits[-1].argmax())


def test_greedy_tokens_match_transformers_generate(tmp_path: Path) -> None:
    ours, hf = _load_pair(write_model_dir(tmp_path / "m", CONFIGS["gqa4-headdim"], seed=3))
    prompt = _prompts(ours.config.vocab_size, [21])[0]
    with torch.inference_mode():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    runner = PagedRunner(ours)
    tokens = [int(runner.step([(0, prompt)])[0][-1].argmax())]
    while len(tokens) < 24:
        tokens.append(int(runner.step([(0, [tokens[-1]])])[0][-1].argmax()))
    assert tokens == ref
    assert len(set(tokens)) > 3  # a degenerate model would make this comparison weak


def test_tiny_preset_matches_transformers(tiny_model_dir: Path) -> None:
    ours, hf = _load_pair(tiny_model_dir)
    prompt = _prompts(ours.config.vocab_size, [40])[0]
    logits = PagedRunner(ours).step([(0, prompt)])[0]
    assert (logits - _hf_logits(hf, prompt)).abs().max().item() < TOL


def test_bfloat16_close_to_float32(tiny_model_dir: Path) -> None:
    config = load_config(tiny_model_dir)
    f32 = load_weights(tiny_model_dir, config, dtype=torch.float32)
    b16 = load_weights(tiny_model_dir, config, dtype=torch.bfloat16, prepack=False)
    assert b16.embed_tokens.weight.dtype == torch.bfloat16
    assert not f32.prepack_cpu_weights()  # only bfloat16 models are packed
    prompt = _prompts(config.vocab_size, [30])[0]
    a = PagedRunner(f32).step([(0, prompt)])[0]
    b = PagedRunner(b16).step([(0, prompt)])[0]
    assert b.dtype == torch.float32  # compute_logits always returns float32
    assert (a - b).abs().max().item() < 0.1
    if b16.prepack_cpu_weights():  # oneDNN available: the packed matmuls agree
        assert b16.layers[0].qkv_proj.packed is not None
        runner = PagedRunner(b16)
        c = runner.step([(0, prompt)])[0]
        assert (b - c).abs().max().item() < 0.05
        assert (a - c).abs().max().item() < 0.1
        decode = runner.step([(0, [int(c[-1].argmax())])])[0]
        assert torch.isfinite(decode).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_close_to_cpu_float32(tiny_model_dir: Path,
                                                  dtype: torch.dtype) -> None:
    config = load_config(tiny_model_dir)
    ref_model = load_weights(tiny_model_dir, config)
    cuda_model = load_weights(tiny_model_dir, config, device="cuda", dtype=dtype)
    assert cuda_model.embed_tokens.weight.device.type == "cuda"
    prompts = _prompts(config.vocab_size, [37, 3])
    ref = PagedRunner(ref_model).step(list(enumerate(prompts)))
    runner = PagedRunner(cuda_model)
    got = runner.step([(0, prompts[0]), (1, prompts[1])])
    decode = runner.step([(0, [5]), (1, [6])])
    for a, b in zip(ref, got, strict=True):
        assert b.dtype == torch.float32
        assert (a - b).abs().max().item() < 0.1
    assert all(torch.isfinite(t).all() for t in decode)
