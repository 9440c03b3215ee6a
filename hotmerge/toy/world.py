"""The toy world: three skills over disjoint parts of one small vocabulary.

Every skill is a table of facts with one-word answers:
  capital  "capital of <country> is" -> <city>      (48 countries, a bijection)
  color    "color of <thing> is"     -> <color>     (48 things, 8 colours)
  sum      "<a> plus <b> is"          -> <a+b>       (digits 0-9, 100 pairs)

The base model is taught a fixed fraction of every table (partial competence in
every skill); each expert continues from the base on its whole table. Experts
refine instead of learning from scratch, which keeps task vectors small and
compatible, and each skill reads and writes its own tokens, so merged task
vectors interfere little. Items are split into a search half and a disjoint
held-out half, each with base-known and base-unknown facts in proportion.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SKILLS = ("capital", "color", "sum")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
TEMPLATE_WORDS = ["capital", "color", "of", "is", "plus"]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
BASE_KNOWN_FRACTION = 0.4
N_CHOICES = 4


@dataclass(frozen=True)
class Fact:
    skill: str
    prompt: str
    answer: str
    answer_pool: tuple[str, ...]  # the answers of this skill, for distractors
    known_by_base: bool
    split: str  # "search" or "heldout"


def _names(rng: random.Random, count: int, syllables: list[str], parts: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(syllables) for _ in range(parts)))
    return sorted(names)


def build_facts(seed: int = 0) -> list[Fact]:
    """All facts of the world, deterministic from the seed."""
    rng = random.Random(seed)
    countries = _names(rng, 48, ["ba", "ko", "ri", "zan", "tu", "mel", "dor", "vi"], 3)
    cities = _names(rng, 48, ["la", "pe", "sho", "gri", "fen", "mu", "tas", "ol"], 3)
    things = _names(rng, 48, ["ap", "ru", "kin", "bo", "sel", "ta", "wim", "eg"], 3)
    rng.shuffle(cities)

    raw: dict[str, list[tuple[str, str]]] = {
        "capital": [(f"capital of {c} is", city) for c, city in zip(countries, cities)],
        "color": [(f"color of {t} is", rng.choice(COLORS)) for t in things],
        "sum": [(f"{a} plus {b} is", str(a + b)) for a in range(10) for b in range(10)],
    }
    facts = []
    for skill in SKILLS:
        items = raw[skill]
        pool = tuple(sorted({answer for _, answer in items}))
        order = list(range(len(items)))
        rng.shuffle(order)
        n_known = round(BASE_KNOWN_FRACTION * len(items))
        known = set(order[:n_known])
        # Alternate splits within the known and unknown halves, so both splits
        # hold the same share of facts the base already knows.
        known_order = [i for i in order if i in known]
        unknown_order = [i for i in order if i not in known]
        split_of = {}
        for group in (known_order, unknown_order):
            for rank, i in enumerate(group):
                split_of[i] = "search" if rank % 2 == 0 else "heldout"
        for i, (prompt, answer) in enumerate(items):
            facts.append(Fact(skill, prompt, answer, pool, i in known, split_of[i]))
    return facts


def vocabulary(facts: list[Fact]) -> list[str]:
    words = set(TEMPLATE_WORDS)
    for fact in facts:
        words.update(fact.prompt.split())
        words.update(fact.answer_pool)
    return SPECIAL_TOKENS + sorted(words)


def choices_for(fact: Fact, rng: random.Random) -> tuple[list[str], int]:
    """Multiple-choice options: the answer and N_CHOICES-1 distractors of its skill."""
    others = [a for a in fact.answer_pool if a != fact.answer]
    options = rng.sample(others, N_CHOICES - 1) + [fact.answer]
    rng.shuffle(options)
    return options, options.index(fact.answer)


def eval_docs(facts: list[Fact], skill: str, split: str, seed: int = 0) -> list[dict]:
    """lm-eval documents for one skill and split (both task variants share them)."""
    rng = random.Random(f"{seed}-{skill}-{split}")
    docs = []
    for fact in facts:
        if fact.skill != skill or fact.split != split:
            continue
        options, label = choices_for(fact, rng)
        docs.append(
            {"question": fact.prompt, "answer": fact.answer, "choices": options, "label": label}
        )
    return docs
