"""The demo model: its generated corpus, the training code, and the trained model that ships."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from resultity_runtime import Engine, SamplingParams
from resultity_runtime._attention import TorchAttentionBackend, build_metadata
from resultity_runtime._config import parse_config
from resultity_runtime._demo_corpus import (
    FACTS,
    corpus_words,
    demo_model_path,
    generate_dialogues,
    heldout_questions,
    training_questions,
)
from resultity_runtime._model import LlamaForCausalLM
from resultity_runtime._tokenizer import load_tokenizer
from resultity_runtime._train import TrainConfig, encode_dialogue, train_demo_model, train_forward

_ROOT = Path(__file__).resolve().parents[2]
_WORD = re.compile(r"[A-Za-z]+")
# a spread of facts: the demo's own question, roles, a CLI command, protocol details
_SAMPLE = ("resultity", "roles", "runtime", "credits", "node_config_hash", "keys_generate",
           "kv_cache", "demo")


# ---- corpus ------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_seeded() -> None:
    a = generate_dialogues(200, seed=3)
    assert a == generate_dialogues(200, seed=3)
    assert a != generate_dialogues(200, seed=4)
    answers = {f.answer for f in FACTS}
    for d in a:
        assert [m["role"] for m in d if m["role"] != "system"][::2] == ["user"] * (
            sum(m["role"] == "user" for m in d))
        assert all(m["content"] in answers for m in d if m["role"] == "assistant")


def test_heldout_questions_are_never_trained_on() -> None:
    trained = {q.lower().rstrip("?.!") for f in FACTS for q in training_questions(f)}
    held = heldout_questions()
    assert len(held) >= 40
    names = {f.name for f in FACTS}
    for h in held:
        assert h.question.lower().rstrip("?.!") not in trained
        assert h.fact in names
    # the wrapped questions of a large sample never contain a held-out phrasing either
    sample = " ".join(m["content"].lower() for d in generate_dialogues(3000) for m in d)
    assert not [h.question for h in held if h.question.lower().rstrip("?") in sample]


def test_every_keyword_is_in_its_answer_and_vocabulary() -> None:
    words = corpus_words()
    for f in FACTS:
        assert f.keyword in f.answer.lower()
        assert all(w.lower() in words for w in _WORD.findall(f.answer))
    assert len({f.name for f in FACTS}) == len(FACTS)


# ---- training code -----------------------------------------------------------------------


def test_encode_dialogue_matches_the_chat_template_tokenization() -> None:
    path = demo_model_path()
    tok = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_proto=(path / "tokenizer.model").read_bytes())
    for d in generate_dialogues(30, seed=5):
        ids, mask = encode_dialogue(sp, d)
        text = tok.apply_chat_template(d, add_generation_prompt=False)
        assert ids == tok.encode_with_special(text, add_bos=True)
        learned = tok.decode([i for i, m in zip(ids, mask, strict=True) if m],
                             skip_special_tokens=False)
        answers = "".join(m["content"] + "<|im_end|>" for m in d if m["role"] == "assistant")
        assert learned == answers
        # the prompt the engine builds is a prefix of the training sequence
        prompt = tok.encode_chat(d[:-1])
        assert ids[: len(prompt)] == prompt


def test_train_forward_matches_the_paged_forward() -> None:
    torch.manual_seed(0)
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 48,
           "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 6,
           "num_key_value_heads": 2, "tie_word_embeddings": True}
    model = LlamaForCausalLM(parse_config(raw)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    lens = [9, 21, 4]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.int64)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(1, 97, (n,))
    with torch.no_grad():
        batched = train_forward(model, ids)
        for i, n in enumerate(lens):
            caches = [(torch.zeros(4, 8, 2, 8), torch.zeros(4, 8, 2, 8)) for _ in range(2)]
            meta = build_metadata([n], [n], [[3, 1, 0]], 8)
            hidden = model(ids[i, :n], torch.arange(n), caches, meta, TorchAttentionBackend())
            torch.testing.assert_close(batched[i, :n], model.compute_logits(hidden),
                                       rtol=1e-5, atol=1e-5)


def _tiny(seed: int = 0, steps: int = 8) -> TrainConfig:
    return TrainConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                       num_dialogues=64, tokenizer_dialogues=64, steps=steps, batch_size=8,
                       lr=1e-2, warmup_steps=2, seed=seed, threads=1, save_dtype="float32")


def test_training_reduces_the_loss_and_is_reproducible(tmp_path: Path) -> None:
    a = train_demo_model(tmp_path / "a", _tiny(), progress=False)
    b = train_demo_model(tmp_path / "b", _tiny(), progress=False)
    assert len(a.losses) == 8
    assert sum(a.losses[-2:]) < sum(a.losses[:2]) - 0.5
    for name in ("model.safetensors", "tokenizer.model", "config.json", "tokenizer_config.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    c = train_demo_model(tmp_path / "c", _tiny(seed=1), progress=False)
    assert (a.path / "model.safetensors").read_bytes() != (c.path / "model.safetensors"
                                                             ).read_bytes()
    # the written directory is a valid model for our engine, with the fused weights split back
    engine = Engine.from_pretrained(a.path, kv_cache_bytes=1 << 20)
    out = engine.chat([{"role": "user", "content": "What is Resultity?"}],
                      SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out.outputs[0].token_ids) >= 1
    tensors = load_file(str(a.path / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (64, 32)
    assert "lm_head.weight" not in tensors


def test_training_refuses_a_directory_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not model files"):
        train_demo_model(tmp_path, _tiny(steps=1), progress=False)


def test_loss_curve_png_is_a_valid_image() -> None:
    spec = importlib.util.spec_from_file_location(
        "train_demo_model_example", _ROOT / "examples" / "train_demo_model.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = module.loss_curve_png([5.0 / (1 + i) for i in range(50)], width=200, height=120)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (200, 120)
    idat = png.index(b"IDAT")
    size = struct.unpack(">I", png[idat - 4:idat])[0]
    raw = zlib.decompress(png[idat + 4:idat + 4 + size])
    assert len(raw) == height * (1 + 3 * width)
    assert b"\x14\x3c\xa0" in raw  # the smoothed curve's colour was drawn
    with pytest.raises(ValueError, match="empty"):
        module.loss_curve_png([])


# ---- the shipped model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_engine() -> Engine:
    return Engine.from_pretrained(demo_model_path(), kv_cache_bytes=16 << 20)


def _check_readable(answer: str, token_ids: list[int], words: frozenset[str]) -> None:
    """Mostly corpus words, and no token 6-gram three times or more (a generation loop)."""
    found = [w.lower() for w in _WORD.findall(answer)]
    assert len(found) >= 5, answer
    known = sum(w in words for w in found) / len(found)
    assert known >= 0.9, (known, answer)
    grams = Counter(tuple(token_ids[i:i + 6]) for i in range(len(token_ids) - 5))
    assert not grams or max(grams.values()) <= 2, answer


def test_readability_check_rejects_loops_and_foreign_words(demo_engine: Engine) -> None:
    words = corpus_words()
    tok = demo_engine.tokenizer
    for f in FACTS:  # every canonical answer passes
        if len(_WORD.findall(f.answer)) >= 5:
            _check_readable(f.answer, tok.encode(f.answer), words)
    looped = "The Runtime executes models and the Runtime executes models and the Runtime " \
             "executes models and the Runtime executes models."
    with pytest.raises(AssertionError):
        _check_readable(looped, tok.encode(looped), words)
    foreign = "Zorbly quaxes the frindle wib glomp under snargle plinth."
    with pytest.raises(AssertionError):
        _check_readable(foreign, tok.encode(foreign), words)


def test_demo_model_answers_heldout_questions(demo_engine: Engine) -> None:
    held = [h for h in heldout_questions() if h.fact in _SAMPLE]
    held = [next(h for h in held if h.fact == name) for name in _SAMPLE]
    params = SamplingParams(max_tokens=96, temperature=0.0)
    outs = demo_engine.generate([[{"role": "user", "content": h.question}] for h in held],
                                params)
    words = corpus_words()
    for h, out in zip(held, outs, strict=True):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (h.question, o.text)
        _check_readable(o.text, list(o.token_ids), words)
        assert h.keyword in o.text.lower(), (h.question, o.text)


def test_demo_model_answers_the_demo_request(demo_engine: Engine) -> None:
    out = demo_engine.chat([{"role": "user", "content": "What is Resultity?"}],
                           SamplingParams(max_tokens=96, temperature=0.0)).outputs[0]
    assert out.text.startswith("Resultity is a public inference network.")
    assert out.finish_reason == "stop"


@pytest.mark.slow
def test_demo_model_answers_most_heldout_questions(demo_engine: Engine) -> None:
    held = heldout_questions()
    outs = demo_engine.generate([[{"role": "user", "content": h.question}] for h in held],
                                SamplingParams(max_tokens=96, temperature=0.0))
    words = corpus_words()
    hits = 0
    for h, out in zip(held, outs, strict=True):
        o = out.outputs[0]
        _check_readable(o.text, list(o.token_ids), words)
        hits += h.keyword in o.text.lower()
    assert hits >= 0.85 * len(held)


@pytest.mark.slow
def test_demo_model_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    path = demo_model_path()
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine.from_pretrained(path, kv_cache_bytes=4 << 20)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Could you describe the "
                                         "Runtime?"}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        mine = train_forward(engine.model, torch.tensor([ids]))[0]
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)
    out = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0.0))[0].outputs[0]
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                      eos_token_id=list(engine.eos_ids))[0, len(ids):].tolist()
    assert gen[: len(out.token_ids)] == list(out.token_ids)


def test_demo_model_directory_is_small_and_complete() -> None:
    path = demo_model_path()
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    assert set(files) >= {"config.json", "model.safetensors", "tokenizer.model",
                          "tokenizer_config.json", "generation_config.json"}
    assert sum(files.values()) < 10 * 1024 * 1024
    config = parse_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    assert config.tie_word_embeddings
    assert load_tokenizer(path, config).vocab_size == config.vocab_size


def test_model_init_demo_preset_writes_the_shipped_model(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from resultity_runtime._presets import PRESETS, init_model_dir, preset_num_params
    from resultity_servers.cli import main

    shipped = demo_model_path()
    out = init_model_dir(tmp_path / "lib", "demo")
    for src in shipped.iterdir():
        assert (out / src.name).read_bytes() == src.read_bytes(), src.name
    with pytest.raises(ValueError, match="seed"):
        init_model_dir(tmp_path / "seeded", "demo", seed=1)
    assert preset_num_params("demo") == sum(
        t.numel() for t in load_file(str(shipped / "model.safetensors")).values())
    p = PRESETS["demo"]  # the preset table describes the shipped model's shape
    config = parse_config(json.loads((shipped / "config.json").read_text(encoding="utf-8")))
    assert (p.vocab_size, p.hidden_size, p.intermediate_size, p.num_hidden_layers,
            p.num_attention_heads, p.num_key_value_heads, p.tie_word_embeddings,
            p.max_position_embeddings) == (
        config.vocab_size, config.hidden_size, config.intermediate_size,
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
        config.tie_word_embeddings, config.max_position_embeddings)
    assert main(["model", "init", str(tmp_path / "cli"), "--preset", "demo"]) == 0
    assert f"{tmp_path / 'cli'}: demo preset, seed 0, 1,869,504 parameters" in (
        capsys.readouterr().out)
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (
        shipped / "model.safetensors").read_bytes()
