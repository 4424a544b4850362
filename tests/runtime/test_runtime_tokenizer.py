"""The sentencepiece tokenizer: round trips, special tokens, chat templates (no double BOS)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given
from hypothesis import strategies as st
from transformers.utils.chat_template_utils import render_jinja_template

from resultity_runtime._errors import ChatTemplateError
from resultity_runtime._presets import CHAT_TEMPLATE
from resultity_runtime._tokenizer import Tokenizer, load_tokenizer, render_chat_template

LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, Résultity! 🚀"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Count: 1 2 3"},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return load_tokenizer(tiny_model_dir)


def _with_template(tiny_model_dir: Path, tmp_path: Path, template: str) -> Tokenizer:
    path = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(path)


@given(st.text())
def test_round_trip_of_any_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=True)) == text


@pytest.mark.parametrize("text", ["\u2581", "a \u2581 b", "<|im_end|>", "x<|im_start|>y", "<s>",
                                  "</s>", "\x00\r\n\t", "  two  spaces  ", "\U0010ffff"])
def test_round_trip_edge_cases(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & tok.special_ids  # plain text never becomes a special token


def test_special_ids_and_pieces(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.bos_token == "<s>"
    assert tok.eos_token == "</s>"
    im_start, im_end = tok.encode_with_special("<|im_start|><|im_end|>")
    assert tok.id_to_piece(im_end) == "<|im_end|>"
    assert tok.eos_ids == (2, im_end)
    assert {0, 1, 2, im_start, im_end} <= tok.special_ids
    assert tok.encode("hi", add_bos=True)[0] == 1
    assert tok.encode("hi")[0] != 1
    ids = tok.encode_with_special("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.vocab_size == 2048
    assert all(tok.id_to_piece(i) for i in range(tok.vocab_size))


def test_chat_template_matches_transformers_rendering(tok: Tokenizer) -> None:
    for template in (CHAT_TEMPLATE, LLAMA2_TEMPLATE, PLAIN_TEMPLATE):
        for gen in (True, False):
            ours = render_chat_template(template, MESSAGES, add_generation_prompt=gen,
                                        special_tokens=tok.special_tokens)
            (ref,), _ = render_jinja_template(
                conversations=[MESSAGES], chat_template=template, add_generation_prompt=gen,
                **tok.special_tokens)
            assert ours == ref


def test_chat_encoding_has_exactly_one_bos(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(MESSAGES)
    assert text.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == tok.bos_id
    assert ids.count(tok.bos_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == text
    no_prompt = tok.encode_chat(MESSAGES, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt


def test_template_without_bos_gets_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = _with_template(tiny_model_dir, tmp_path, PLAIN_TEMPLATE)
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == tok.bos_id
    assert ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == tok.apply_chat_template(MESSAGES)


def test_llama2_template_parses_bos_and_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = _with_template(tiny_model_dir, tmp_path, LLAMA2_TEMPLATE)
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == tok.bos_id
    assert ids.count(tok.bos_id) == 2  # one per user turn, none added on top
    assert ids.count(tok.eos_id) == 1  # after the assistant turn
    assert tok.decode(ids) == "[INST] Hello, Résultity! 🚀 [/INST] Hi. [INST] Count: 1 2 3 [/INST]"


def test_template_errors(tok: Tokenizer, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="chat template"):
        render_chat_template("{% for %}", MESSAGES)
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute access to internals
        render_chat_template("{{ messages.__class__.__mro__ }}", MESSAGES)
    no_template = _with_template(tiny_model_dir, tmp_path, "")
    no_template.chat_template = None
    with pytest.raises(ChatTemplateError, match="chat_template: missing"):
        no_template.encode_chat(MESSAGES)


def test_llama2_style_model_with_dummy_prefix(tmp_path: Path) -> None:
    # the sentencepiece options of Llama 2 / Mistral tokenizers: a dummy "▁" prefix
    buf = io.BytesIO()
    lines = [f"the node {i} streams tokens to the cloud and the network" for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=300,
        byte_fallback=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("the node streams")
    assert tok.id_to_piece(ids[0]).startswith("\u2581")
    assert tok.decode(ids) == "the node streams"
    assert tok.decode(tok.encode("a\u2581b")) in {"a\u2581b", "a b"}  # sentencepiece's own rule
    chat = tok.encode_chat([{"role": "user", "content": "the cloud"}])
    assert chat[0] == tok.bos_id
    assert chat.count(tok.bos_id) == 1
    assert tok.decode(chat) == "[INST] the cloud [/INST]"
