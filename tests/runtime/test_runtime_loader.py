"""Loading model directories: config parsing, safetensors (single and sharded), and every error
naming the file and the field or tensor at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from resultity_runtime._config import parse_config
from resultity_runtime._errors import ModelLoadError
from resultity_runtime._loader import LoadedModel, load_model, resolve_dtype
from resultity_runtime._model import LlamaForCausalLM
from resultity_runtime._tokenizer import Tokenizer


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _config(path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((path / "config.json").read_text())
    return raw


def _set_config(path: Path, **changes: Any) -> None:
    raw = _config(path)
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (path / "config.json").write_text(json.dumps(raw))


def _load_error(path: Path) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    return info.value


def test_load_tiny_returns_model_config_tokenizer(tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir)
    assert isinstance(loaded, LoadedModel)
    model, config, tokenizer = loaded
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(tokenizer, Tokenizer)
    assert config.architecture == "LlamaForCausalLM"
    assert model.embed_tokens.weight.dtype == torch.float32
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert config.eos_token_ids == tokenizer.eos_ids
    # the fused projections hold q, k, v in order: q rows equal the checkpoint's q_proj
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    v = tensors["model.layers.1.self_attn.v_proj.weight"]
    fused = model.layers[1].qkv_proj.weight
    assert torch.equal(fused[: q.shape[0]], q)
    assert torch.equal(fused[-v.shape[0]:], v)


def test_dtypes(tiny_model_dir: Path) -> None:
    model, _, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert model.layers[0].qkv_proj.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        load_model(tiny_model_dir, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype: unknown"):
        load_model(tiny_model_dir, dtype="float64")
    cfg = parse_config(_config(tiny_model_dir))
    assert resolve_dtype("cuda", None, cfg) == torch.bfloat16
    with pytest.raises(ValueError, match="float32 is not supported on CUDA"):
        resolve_dtype("cuda", torch.float32, cfg)


def test_sharded_checkpoint_loads_the_same_weights(tiny_model_dir: Path, model_copy: Path) -> None:
    tensors = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(model_copy / file))
        weight_map.update(dict.fromkeys(part, file))
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = load_model(tiny_model_dir).model.state_dict()
    b = load_model(model_copy).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    missing = names[0]
    index = {"weight_map": {k: v for k, v in weight_map.items() if k != missing}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _load_error(model_copy)
    assert (err.file, err.field) == ("model.safetensors.index.json", missing)

    (model_copy / "model-00002-of-00002.safetensors").unlink()
    err = _load_error(model_copy)
    assert err.file == "model-00002-of-00002.safetensors"
    assert "no such file" in str(err)


def test_missing_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    err = _load_error(model_copy)
    assert err.file == "config.json"
    assert "no such file" in str(err)


def test_config_not_json(model_copy: Path) -> None:
    (model_copy / "config.json").write_text("{not json")
    assert "config.json: invalid JSON" in str(_load_error(model_copy))


def test_unknown_architecture(model_copy: Path) -> None:
    _set_config(model_copy, architectures=["GPT2LMHeadModel"])
    err = _load_error(model_copy)
    assert (err.file, err.field) == ("config.json", "architectures")
    assert "GPT2LMHeadModel" in str(err)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": "256"}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"rms_norm_eps": -1}, "rms_norm_eps"),
        ({"eos_token_id": "2"}, "eos_token_id"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0}},
         "rope_scaling.original_max_position_embeddings"),
    ],
)
def test_invalid_config_field_is_named(model_copy: Path, changes: dict[str, Any],
                                       field: str) -> None:
    _set_config(model_copy, **changes)
    err = _load_error(model_copy)
    assert (err.file, err.field) == ("config.json", field)
    assert str(err).startswith(f"config.json: {field}: ")


def test_config_spellings() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = parse_config(base)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rope_theta) == (2, 4, 10000.0)
    nulls = parse_config({**base, "head_dim": None, "num_key_value_heads": None,
                          "rope_scaling": None, "torch_dtype": None, "bos_token_id": None})
    assert (nulls.head_dim, nulls.num_key_value_heads, nulls.torch_dtype) == (4, 2, "float32")
    assert nulls.rope_scaling is None
    assert cfg.eos_token_ids == ()
    assert parse_config({**base, "eos_token_id": 3}).eos_token_ids == (3,)
    assert parse_config({**base, "eos_token_id": [3, 5]}).eos_token_ids == (3, 5)
    v5 = parse_config({**base, "dtype": "bfloat16", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert v5.torch_dtype == "bfloat16"
    assert v5.rope_theta == 500000.0
    assert v5.rope_scaling is not None
    assert v5.rope_scaling.factor == 8.0
    qwen = parse_config({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert (qwen.qkv_bias, qwen.o_bias) == (True, False)
    llama_bias = parse_config({**base, "attention_bias": True})
    assert (llama_bias.qkv_bias, llama_bias.o_bias) == (True, True)


def test_missing_weights_file(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    err = _load_error(model_copy)
    assert err.file == "model.safetensors"
    assert "no such file" in str(err)


def test_missing_tensor(model_copy: Path) -> None:
    tensors = load_file(str(model_copy / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(model_copy / "model.safetensors"))
    err = _load_error(model_copy)
    assert (err.file, err.field) == ("model.safetensors", "model.layers.2.mlp.up_proj.weight")
    assert "missing tensor" in str(err)


def test_wrong_shape(model_copy: Path) -> None:
    tensors = load_file(str(model_copy / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    rows, cols = tensors[name].shape
    tensors[name] = torch.zeros(rows + 1, cols)
    save_file(tensors, str(model_copy / "model.safetensors"))
    err = _load_error(model_copy)
    assert (err.file, err.field) == ("model.safetensors", name)
    assert f"expected [{rows}, {cols}], got [{rows + 1}, {cols}]" in str(err)


def test_lm_head_required_when_untied(model_copy: Path) -> None:
    tensors = load_file(str(model_copy / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(model_copy / "model.safetensors"))
    assert _load_error(model_copy).field == "lm_head.weight"
    _set_config(model_copy, tie_word_embeddings=True)  # tied: the embedding serves as lm_head
    model = load_model(model_copy).model
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(model_copy: Path, damage: str) -> None:
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\xff" * 64 + data[64:], "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    err = _load_error(model_copy)
    assert err.file == "model.safetensors"
    assert "corrupt or truncated" in str(err)


def test_missing_tokenizer(model_copy: Path) -> None:
    (model_copy / "tokenizer.model").unlink()
    err = _load_error(model_copy)
    assert err.file == "tokenizer.model"


def test_not_a_directory(tmp_path: Path) -> None:
    assert "not a directory" in str(_load_error(tmp_path / "nope"))
