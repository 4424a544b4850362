"""TritonAttentionBackend against TorchAttentionBackend over whole engine-shaped steps."""

from __future__ import annotations

import pytest
import torch
from kernels_testutil import randn, rel_err

from resultity_runtime._attention import TorchAttentionBackend, build_metadata

triton_backend = pytest.importorskip("resultity_runtime._triton_backend")


def _step(target, query_lens, seq_lens, hq=4, hkv=2, page=16, seed=0, python_lens=True):
    """Run one step through both backends on identical caches; return both outputs, caches."""
    device, dtype, tol = target
    d = 32 if device.type == "cpu" else 128
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // page) for s in seq_lens]
    order = torch.randperm(sum(need) + 2, generator=gen).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n])
        used += n
    meta = build_metadata(query_lens, seq_lens, tables, page, device)
    if not python_lens:  # without the python copies the backend cannot split a mixed step
        meta.query_lens = meta.seq_lens_list = None
    num_blocks = sum(need) + 2
    # earlier tokens of every sequence are already cached; new tokens' slots start as NaN
    k_cache = randn(num_blocks, page, hkv, d, device=device, dtype=dtype, gen=gen)
    v_cache = randn(num_blocks, page, hkv, d, device=device, dtype=dtype, gen=gen)
    k_cache.view(-1, hkv, d)[meta.slot_mapping] = float("nan")
    v_cache.view(-1, hkv, d)[meta.slot_mapping] = float("nan")
    n = sum(query_lens)
    qkv = randn(n, (hq + 2 * hkv) * d, device=device, dtype=dtype, gen=gen)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    caches = (k_cache.clone(), v_cache.clone())
    out = triton_backend.TritonAttentionBackend().forward(q, k, v, *caches, meta, 0.25)
    ref = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.25)
    assert torch.equal(caches[0], k_cache)
    assert torch.equal(caches[1], v_cache)
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err}"


def test_decode_step_matches_torch_backend(target):
    _step(target, [1, 1, 1, 1], [1, 16, 17, 90])


@pytest.mark.parametrize("python_lens", [True, False])
def test_mixed_prefill_step_matches_torch_backend(target, python_lens):
    # a fresh prompt, a chunk over a cached prefix, and two decode rows in one step
    _step(target, [17, 9, 1, 1], [17, 40, 33, 1], python_lens=python_lens)


def test_backend_name():
    assert triton_backend.TritonAttentionBackend.name == "triton"


def _tiny_model(device, dtype):
    from resultity_runtime._config import parse_config
    from resultity_runtime._model import LlamaForCausalLM

    config = parse_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    })
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.to(device=device, dtype=dtype).eval(), config


def test_model_steps_give_the_same_logits_on_both_backends(target):
    """Prefill (one chunk over a cached prefix), then decode steps, teacher-forced."""
    device, dtype, tol = target
    model, config = _tiny_model(device, dtype)
    page, hkv, d = 16, config.num_key_value_heads, config.head_dim
    tables = [[3, 0, 5], [1, 4]]
    backends = {"triton": triton_backend.TritonAttentionBackend(),
                "torch": TorchAttentionBackend()}
    caches = {name: [(torch.zeros(6, page, hkv, d, device=device, dtype=dtype),
                      torch.zeros(6, page, hkv, d, device=device, dtype=dtype))
                     for _ in range(config.num_hidden_layers)] for name in backends}
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=gen) for n in (33, 17)]
    # steps: (query_lens, seq_lens); sequence 0 is prefilled in two chunks (20 + 13)
    steps = [([20, 17], [20, 17]), ([13, 1], [33, 18]), ([1, 1], [34, 19]), ([1, 1], [35, 20])]
    tokens = [list(prompts[0]), [*prompts[1].tolist(), 50]]
    for step, (q_lens, s_lens) in enumerate(steps):
        ids, pos = [], []
        for i, (q, s) in enumerate(zip(q_lens, s_lens, strict=True)):
            while len(tokens[i]) < s:
                tokens[i].append(int(7 + 11 * step + i))
            ids += [int(t) for t in tokens[i][s - q:s]]
            pos += list(range(s - q, s))
        meta = build_metadata(q_lens, s_lens, tables, page, device)
        logits = {}
        for name, backend in backends.items():
            with torch.inference_mode():
                hidden = model(torch.tensor(ids, device=device), torch.tensor(pos, device=device),
                               caches[name], meta, backend)
                logits[name] = model.compute_logits(hidden)
        err = rel_err(logits["triton"], logits["torch"])
        assert err < tol * 4, f"step {step}: relative error {err}"
