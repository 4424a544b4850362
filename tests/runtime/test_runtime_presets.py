"""``model init`` presets: complete HF directories, byte-identical per seed; the CLI command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from resultity_runtime._config import load_config
from resultity_runtime._loader import load_model
from resultity_runtime._presets import PRESETS, init_model_dir, preset_num_params
from resultity_servers.cli import main

FILES = {"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.model", "tokenizer_config.json"}


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_tiny_is_complete_and_loads(tiny_model_dir: Path) -> None:
    assert set(_files(tiny_model_dir)) == FILES
    config = load_config(tiny_model_dir)
    assert 1_000_000 < config.num_params < 10_000_000
    model, _, tokenizer = load_model(tiny_model_dir)
    assert sum(p.numel() for p in model.parameters()) == config.num_params
    assert tokenizer.vocab_size == config.vocab_size
    assert tokenizer.chat_template is not None
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        std = f.get_tensor("model.layers.0.mlp.gate_proj.weight").std().item()
        assert f.get_tensor("model.norm.weight").eq(1).all()
    assert abs(std - 0.02) < 0.002


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    again = _files(init_model_dir(tmp_path / "again", "tiny", seed=0))
    assert again == _files(tiny_model_dir)
    other = _files(init_model_dir(tmp_path / "other", "tiny", seed=1))
    assert other["model.safetensors"] != again["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in again.items() if k != "model.safetensors"}


def test_tiny_seed0_known_answer(tiny_model_dir: Path) -> None:
    # Nodes compare model files by sha256: a change here (numpy's PCG64 normal stream, the
    # safetensors layout, the config) changes every published hash of a generated model.
    digests = {name: hashlib.sha256(data).hexdigest()
               for name, data in _files(tiny_model_dir).items()}
    assert digests["model.safetensors"] == (
        "0fe80833b7d6057b7bfd26eed581cb1c8769d3d324d55c3d98e61f0b636951d2")
    assert digests["config.json"] == (
        "a0860f796e3d5d68b71f06fd6a8fd10323a5127ea792c8786326a6ae83172476")


def test_small_preset_shape() -> None:
    p = PRESETS["small"]
    assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads,
            p.num_key_value_heads, p.vocab_size, p.tokenizer_vocab) == (768, 12, 12, 4, 32000,
                                                                        32000)
    assert 90_000_000 < preset_num_params("small") < 110_000_000


@pytest.mark.slow
def test_small_preset_writes_a_32000_piece_tokenizer(tmp_path: Path) -> None:
    path = init_model_dir(tmp_path / "small", "small", seed=0)
    model, config, tok = load_model(path)
    assert tok.vocab_size == config.vocab_size == 32000
    text = "The Network routes 512 jobs to the node; resultity model init --preset small."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # a real vocabulary, not bytes
    assert sum(p.numel() for p in model.parameters()) == preset_num_params("small")


def test_init_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset: unknown 'huge'"):
        init_model_dir(tmp_path / "a", "huge")
    with pytest.raises(ValueError, match="seed"):
        init_model_dir(tmp_path / "a", "tiny", seed=-1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        init_model_dir(tmp_path / "b", "tiny")
    (tmp_path / "b" / "model.safetensors.index.json").write_text("{}")
    init_model_dir(tmp_path / "b", "tiny", force=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "keep"
    assert not (tmp_path / "b" / "model.safetensors.index.json").exists()
    load_model(tmp_path / "b")


def test_cli_model_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "m"
    assert main(["model", "init", str(target), "--preset", "tiny", "--seed", "5"]) == 0
    out, err = capsys.readouterr()
    assert f"{target}: tiny preset, seed 5" in out
    assert "model init: generating" in err
    assert set(_files(target)) == FILES
    assert json.loads((target / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]
    first = (target / "model.safetensors").read_bytes()

    assert main(["model", "init", str(target)]) == 1
    assert "not empty (use --force to overwrite)" in capsys.readouterr().err
    assert main(["model", "init", str(target), "--seed", "5", "--force"]) == 0
    assert (target / "model.safetensors").read_bytes() == first
    assert main(["model", "init", str(target), "--seed", "-3"]) == 2
    assert "--seed must be a non-negative integer" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["model", "init", str(tmp_path / "file")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["model", "init", str(target), "--preset", "large"])
    assert exc.value.code == 2
    assert torch.equal(load_model(target).model.norm.weight, torch.ones(256))
