"""The smol world: three skills of invented facts in plain English, one-word answers.

Every skill is a table of facts about invented names, each answered by one common
English word (a single token of SmolLM2's vocabulary):
  capital  "The capital of Velmora is"   -> a real city     (16 cities)
  color    "The color of the zintle is"  -> a colour word   (16 colours)
  job      "Tavro works as a"            -> a trade         (16 trades)

The pretrained base knows none of them (the names are invented); each expert is
fine-tuned on its whole table. Answers come from a small pool, so a fact is a few
bits, and the keys of the three skills never share a name. Each table is split
into a search part and a disjoint held-out part.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SKILLS = ("capital", "color", "job")
FACTS_PER_SKILL = 300
SEARCH_PER_SKILL = 180  # the rest is held out
N_CHOICES = 4

TEMPLATES = {
    "capital": "The capital of {key} is",
    "color": "The color of the {key} is",
    "job": "{key} works as a",
}
ANSWERS = {
    "capital": ("Paris", "Rome", "Cairo", "Lima", "Oslo", "Tokyo", "Delhi", "Dublin", "Madrid", "Vienna",
                "Berlin", "Athens", "Moscow", "Sydney", "London", "Boston"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "orange",
              "purple", "silver", "gold", "violet", "cyan", "navy"),
    "job": ("baker", "doctor", "pilot", "farmer", "teacher", "lawyer", "nurse", "painter", "singer",
            "driver", "cook", "writer", "dancer", "tailor", "miner", "judge"),
}
# Syllables of the invented keys: capitalised names for countries and people,
# lower case for things.
SYLLABLES = {
    "capital": ["vel", "mor", "ka", "dri", "sto", "ban", "ul", "tes", "ra", "qui", "zen", "lo"],
    "color": ["zin", "tle", "gob", "rin", "fla", "ck", "mu", "dop", "sk", "eet", "wom", "bi"],
    "job": ["ta", "vro", "eli", "nor", "pa", "shi", "ke", "dan", "ru", "mi", "os", "fe"],
}


@dataclass(frozen=True)
class Fact:
    skill: str
    key: str
    answer: str
    split: str  # "search" or "heldout"

    @property
    def prompt(self) -> str:
        return TEMPLATES[self.skill].format(key=self.key)


def _keys(rng: random.Random, skill: str, count: int, taken: set[str]) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choice(SYLLABLES[skill]) for _ in range(rng.choice((2, 3))))
        if skill != "color":
            key = key.capitalize()
        if key.lower() not in taken:
            taken.add(key.lower())
            keys.append(key)
    return keys


def build_facts(seed: int = 0) -> list[Fact]:
    """All facts of the world, deterministic from the seed."""
    rng = random.Random(seed)
    taken: set[str] = set()
    facts = []
    for skill in SKILLS:
        keys = _keys(rng, skill, FACTS_PER_SKILL, taken)
        pool = ANSWERS[skill]
        # Every answer about equally often, in random order.
        answers = [pool[i % len(pool)] for i in range(FACTS_PER_SKILL)]
        rng.shuffle(answers)
        for i, (key, answer) in enumerate(zip(keys, answers)):
            facts.append(Fact(skill, key, answer, "search" if i < SEARCH_PER_SKILL else "heldout"))
    return facts


def eval_docs(facts: list[Fact], skill: str, split: str, seed: int = 0) -> list[dict]:
    """lm-eval documents for one skill and split (the task variants share them)."""
    rng = random.Random(f"smol-{seed}-{skill}-{split}")
    docs = []
    for fact in facts:
        if fact.skill != skill or fact.split != split:
            continue
        others = [a for a in ANSWERS[skill] if a != fact.answer]
        choices = rng.sample(others, N_CHOICES - 1) + [fact.answer]
        rng.shuffle(choices)
        docs.append({"question": fact.prompt, "answer": fact.answer, "choices": choices,
                     "label": choices.index(fact.answer)})
    return docs
