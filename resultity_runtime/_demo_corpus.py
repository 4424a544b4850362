"""The demo model's training text: generated question-and-answer dialogues about Resultity.

Every fact has one canonical answer and many question forms: entity templates ("What is
{s}?") over the fact's subject phrases, task templates ("How do I {t}?") over its tasks, and
hand-written questions, each wrapped in optional greetings, suffixes and case changes. A few
templates are never used for training (``HELDOUT_*``): ``heldout_questions`` builds test
questions from them. All text is written for this project (license-clean); torch-free.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

import attrs

__all__ = [
    "ENTITY_TEMPLATES",
    "FACTS",
    "HELDOUT_ENTITY_TEMPLATES",
    "HELDOUT_TASK_TEMPLATES",
    "TASK_TEMPLATES",
    "Dialogue",
    "Fact",
    "HeldOut",
    "corpus_words",
    "demo_model_path",
    "generate_dialogues",
    "heldout_questions",
    "training_questions",
]



@attrs.frozen
class Fact:
    """One thing the demo model knows: its answer and the ways to ask for it.

    ``keyword`` is a lower-case substring of ``answer`` that a correct reply must contain;
    ``wrap`` is false for short social turns (greetings) that take no prefixes or suffixes.
    """

    name: str
    keyword: str
    answer: str
    subjects: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    questions: tuple[str, ...] = ()
    wrap: bool = True


def _load_facts() -> tuple[Fact, ...]:
    raw = json.loads(resources.files("resultity_runtime").joinpath("data/demo_facts.json")
                     .read_text(encoding="utf-8"))
    facts = tuple(
        Fact(name=f["name"], keyword=f["keyword"], answer=f["answer"],
             subjects=tuple(f.get("subjects", ())), tasks=tuple(f.get("tasks", ())),
             questions=tuple(f.get("questions", ())), wrap=f.get("wrap", True))
        for f in raw["facts"])
    for fact in facts:
        assert fact.keyword in fact.answer.lower(), fact.name
    return facts


FACTS = _load_facts()

ENTITY_TEMPLATES = (
    "What is {s}?", "What is {s} in Resultity?", "Explain {s}.", "Tell me about {s}.",
    "Describe {s}.", "What do you know about {s}?", "Can you explain {s}?",
    "Give me an overview of {s}.", "I want to learn about {s}.", "What should I know about {s}?",
    "Explain {s} to me.", "What does {s} mean?", "Please explain {s}.",
    "Help me understand {s}.", "What's {s}?", "Tell me more about {s}.", "Define {s}.",
    "How does {s} work?", "Could you explain {s}?", "Can you describe {s}?",
    "Would you tell me about {s}?", "Can you tell me what {s} is?",
)
TASK_TEMPLATES = (
    "How do I {t}?", "How can I {t}?", "What is the command to {t}?",
    "Which command do I use to {t}?", "Show me how to {t}.", "I need to {t}. What do I run?",
    "How to {t}?", "What do I do to {t}?", "Tell me how to {t}.", "Is there a way to {t}?",
    "Explain how to {t}.", "I want to {t}.", "How should I {t}?", "Could you show me how to {t}?",
    "What do I run to {t}?",
)
# never used for training: held-out paraphrases for the test of the trained model
HELDOUT_ENTITY_TEMPLATES = ("Could you describe {s}?", "What can you tell me about {s}?")
HELDOUT_TASK_TEMPLATES = ("How would I {t}?", "What should I run to {t}?")

_PREFIXES = ("", "", "", "", "Hi! ", "Hello. ", "Hey, ", "Quick question: ",
             "I am new to Resultity. ", "Please answer briefly. ", "One more thing: ")
_SUFFIXES = ("", "", "", "", " Thanks!", " Thank you.", " Please keep it short.")
# inserted at a random word boundary now and then, so answers key on the content words
_FILLERS = ("please", "actually", "exactly", "again", "here", "now", "really", "today")
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.", "You are the Resultity demo model.",
    "Answer the user's question.", "You are a helpful assistant. Answer briefly.",
    "You answer questions about Resultity.",
)

Dialogue = list[dict[str, str]]  # chat messages: {"role": ..., "content": ...}


def _fill(templates: tuple[str, ...], key: str, values: tuple[str, ...]) -> list[str]:
    return [t.replace("{" + key + "}", v) for t in templates for v in values]


def _sentence_start(text: str) -> str:
    return text[:1].upper() + text[1:]


def training_questions(fact: Fact) -> list[str]:
    """Return the core question forms of ``fact`` used for training (no wrappers)."""
    forms = [*fact.questions]
    forms += [_sentence_start(q) for q in _fill(ENTITY_TEMPLATES, "s", fact.subjects)]
    forms += _fill(TASK_TEMPLATES, "t", fact.tasks)
    return list(dict.fromkeys(forms))


def _wrap(rng: random.Random, question: str, fact: Fact) -> str:
    if not fact.wrap:
        return question.lower() if rng.random() < 0.15 else question
    prefix, suffix = rng.choice(_PREFIXES), rng.choice(_SUFFIXES)
    if prefix.endswith((": ", ", ")) and not question.startswith("I "):
        question = question[:1].lower() + question[1:]
    if rng.random() < 0.15:
        words = question.split(" ")
        words.insert(rng.randrange(1, len(words) + 1), rng.choice(_FILLERS))
        question = " ".join(words)
    text = prefix + question + suffix
    roll = rng.random()
    if roll < 0.10:
        text = text.lower()
    elif roll < 0.18:
        text = text.rstrip("?.!")
    return text


def generate_dialogues(count: int, seed: int = 0) -> list[Dialogue]:
    """Return ``count`` chat dialogues, the same for the same ``(count, seed)``.

    Each has an optional system message and one or (sometimes) two user/assistant turns;
    every assistant message is a fact's canonical answer. Facts are drawn uniformly.
    """
    rng = random.Random(seed)
    pools = [training_questions(f) for f in FACTS]
    dialogues: list[Dialogue] = []
    for _ in range(count):
        messages: Dialogue = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        for _turn in range(2 if rng.random() < 0.15 else 1):
            k = rng.randrange(len(FACTS))
            question = _wrap(rng, rng.choice(pools[k]), FACTS[k])
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": FACTS[k].answer})
        dialogues.append(messages)
    return dialogues


@attrs.frozen
class HeldOut:
    """A test question built from a held-out template, and the fact it asks about."""

    question: str
    fact: str
    keyword: str


def heldout_questions() -> list[HeldOut]:
    """Return the held-out questions: held-out templates over each fact's first subject/task.

    None of them is a training question form (the templates are not used for training).
    """
    out: list[HeldOut] = []
    for fact in FACTS:
        if fact.subjects:
            for t in HELDOUT_ENTITY_TEMPLATES:
                out.append(HeldOut(t.replace("{s}", fact.subjects[0]), fact.name, fact.keyword))
        if fact.tasks:
            for t in HELDOUT_TASK_TEMPLATES:
                out.append(HeldOut(t.replace("{t}", fact.tasks[0]), fact.name, fact.keyword))
    return out


_WORD = re.compile(r"[A-Za-z]+")


def corpus_words() -> frozenset[str]:
    """Return the lower-cased words (letter runs) of every question form and answer."""
    words: set[str] = set()
    texts = [f.answer for f in FACTS] + [q for f in FACTS for q in training_questions(f)]
    texts += list(_PREFIXES + _SUFFIXES + _SYSTEM_PROMPTS + _FILLERS)
    for text in texts:
        words.update(w.lower() for w in _WORD.findall(text))
    return frozenset(words)


def demo_model_path() -> Path:
    """Return the directory of the trained demo model shipped in this package.

    Raises FileNotFoundError when the package was installed without it.
    """
    path = Path(str(resources.files("resultity_runtime").joinpath("data/demo_model")))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the demo model is not installed")
    return path
