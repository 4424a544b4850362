"""Weight-only int4 quantization: the packed kernel, the model wiring, the engine option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_runtime_model import PagedRunner, _prompts

from resultity_runtime import Engine, SamplingParams
from resultity_runtime._config import load_config
from resultity_runtime._demo_corpus import demo_model_path, heldout_questions
from resultity_runtime._loader import load_model, load_weights
from resultity_runtime._model import Linear
from resultity_runtime._quant import (
    INT4_MAX_ROWS,
    dequantize_int4,
    int4_available,
    int4_eligible,
    quantize_int4,
)

pytestmark = pytest.mark.skipif(not int4_available(), reason="torch has no CPU int4 kernel")


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # groups of very different ranges, an offset, never zeros
    scale = torch.rand(rows, cols // 32, 1, generator=gen).repeat_interleave(32, -1)
    w = torch.randn(rows, cols // 32, 32, generator=gen) * (0.01 + scale) + 0.003
    return w.reshape(rows, cols)


@pytest.mark.parametrize(("rows", "cols", "group"), [(48, 96, 32), (16, 256, 64),
                                                     (80, 256, 128), (32, 512, 256)])
def test_kernel_matches_the_dequantized_weight(rows: int, cols: int, group: int) -> None:
    w = _weight(rows, cols)
    q = quantize_int4(w, group)
    deq = dequantize_int4(w, group)
    # every weight is within half a level of its group's step from the original
    steps = (w.reshape(rows, -1, group).amax(-1) - w.reshape(rows, -1, group).amin(-1)) / 15
    err = (deq - w).abs().reshape(rows, -1, group).amax(-1)
    assert (err <= steps / 2 + 1e-6).all()
    assert (deq != w).any()  # it is a quantization, not a copy
    # 1-3 rows run the int4 kernel, more the bfloat16 copy of the same quantized values
    for n in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 17):
        x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
        got = q.matmul(x).float()
        want = x.float() @ deq.T
        assert got.shape == (n, rows)
        # bfloat16 output and bfloat16 scales: relative error of a few parts in a thousand
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-2, n
    assert q.nbytes < w.numel() * 2 / 3  # far fewer bytes than the bfloat16 weight


def test_constant_groups_are_exact() -> None:
    w = torch.full((16, 64), 0.25)
    w[:, 32:] = -1.5
    assert torch.equal(dequantize_int4(w, 32), w)
    x = torch.ones(1, 64, dtype=torch.bfloat16)
    assert quantize_int4(w, 32).matmul(x).float().allclose(torch.full((1, 16), 32 * -1.25))


def test_bad_shapes_and_group_sizes_are_refused() -> None:
    assert int4_eligible(32, 64, 32)
    assert not int4_eligible(24, 64, 32)
    assert not int4_eligible(32, 48, 32)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(_weight(16, 64), 48)
    with pytest.raises(ValueError, match=r"shape \(24, 64\)"):
        quantize_int4(_weight(24, 64), 32)


def test_quantized_model_runs_the_dequantized_weights(tiny_model_dir: Path) -> None:
    """The int4 model's logits equal a bfloat16 model holding the dequantized weights."""
    config = load_config(tiny_model_dir)
    q4 = load_weights(tiny_model_dir, config, dtype=torch.bfloat16, quantization="int4")
    ref = load_weights(tiny_model_dir, config, dtype=torch.bfloat16, prepack=False)
    quantized = [name for name, m in q4.named_modules() if isinstance(m, Linear) and m.int4]
    dense = [name for name, m in q4.named_modules() if isinstance(m, Linear) and not m.int4]
    # tiny: intermediate 688 is no multiple of 32, so down_proj stays dense
    assert dense == [f"layers.{i}.down_proj" for i in range(config.num_hidden_layers)]
    assert "lm_head" in quantized
    assert len(quantized) == 3 * config.num_hidden_layers + 1
    assert q4.layers[0].qkv_proj.weight.numel() == 0  # the dense copy is released
    assert q4.embed_tokens.weight.shape == (config.vocab_size, config.hidden_size)
    for name in quantized:
        m = ref.get_submodule(name)
        m.weight = torch.nn.Parameter(dequantize_int4(m.weight, 32).to(torch.bfloat16),
                                      requires_grad=False)
    prompt = _prompts(config.vocab_size, [37])[0]
    runners = [PagedRunner(q4), PagedRunner(ref)]
    a, b = (r.step([(0, prompt)])[0] for r in runners)  # prefill: the bfloat16 copies
    plain = PagedRunner(load_weights(tiny_model_dir, config, dtype=torch.bfloat16)).step(
        [(0, prompt)])[0]
    assert (a - b).abs().max().item() < 0.05
    assert (a - plain).abs().max().item() > 0.05  # the weights did change
    token = int(b[-1].argmax())
    a, b = (r.step([(0, [token])])[0] for r in runners)  # one row: the int4 kernel
    assert (a - b).abs().max().item() < 0.05


def test_quantization_options_are_checked(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="quantization: unknown 'int3'"):
        load_model(tiny_model_dir, quantization="int3")
    with pytest.raises(ValueError, match="quantization: int4 needs dtype bfloat16"):
        load_model(tiny_model_dir, dtype="float32", quantization="int4")
    with pytest.raises(ValueError, match="quantization: int4 runs on CPU only"):
        load_model(tiny_model_dir, device="cuda", quantization="int4")
    model, _, _ = load_model(tiny_model_dir, quantization="int4")  # bfloat16 by default
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(tiny_model_dir)[0].quantize_cpu_weights()


def test_int4_demo_model_still_answers() -> None:
    """On the trained demo model, int4 greedy answers equal float32's for sample questions."""
    held = heldout_questions()[::12]
    chats = [[{"role": "user", "content": h.question}] for h in held]
    params = SamplingParams(max_tokens=64, temperature=0.0)
    q4 = Engine.from_pretrained(demo_model_path(), quantization="int4", kv_cache_bytes=8 << 20)
    f32 = Engine.from_pretrained(demo_model_path(), kv_cache_bytes=8 << 20)
    got = q4.generate(chats, params)
    want = f32.generate(chats, params)
    for h, a, b in zip(held, got, want, strict=True):
        assert h.keyword in a.outputs[0].text.lower(), a.outputs[0].text
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, h.question
