"""The real-model profile's learning task (`data.embedded.profile: smol`): facts a pretrained model cannot
know, so that fine-tuning has something to teach and the learning can be measured on base and tuned model.

The world is `N_COUNTRIES` invented countries (syllable names no language uses), each with an invented
capital and an invented currency: 2 facts per country. Every name is unique and none is a word of another.

* training rows (`write_train_files`, `data/raw/smol.jsonl`, the `chat` format): every fact asked in the 3
  `TRAIN_PHRASINGS` of its attribute, each answered by one sentence restating the fact. The row's `group` is
  a *slot*: fact `i`'s phrasing `k` is in slot `(i + k) % 3`, so each slot holds one phrasing of every fact.
  `prepare` keeps groups whole and never sends every group to the eval split, so every fact keeps at least
  one training phrasing (with the default eval fraction, two: one slot, a third of the rows, is the
  validation loss on phrasings of facts trained in other words);
* the learning suite (`suite_rows`, an `eval.suites` entry `{source: embedded, format: qa}`): every fact
  asked in its `HELD_OUT_PHRASINGS`, a wording no training row uses, in the `qa` layout (`question`, `answer`
  aliases) with 4 `options` (the true value and 3 other countries' values of the same attribute) for the
  log-likelihood accuracy (chance 0.25).

`seed` (`data.embedded.seed`) draws the world's names, the option sets and the row order; the same seed
gives byte-identical files (canonical JSON lines).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.core.io import atomic_write_text, dump_jsonl

SMOL = "smol"
N_COUNTRIES = 40
N_OPTIONS = 4
TRAIN_FILE = "smol.jsonl"
MIN_NAME = 6  # letters: short syllable pairs are too often real words or places ("Bello")

# Syllables chosen to make names that are no English word and no real place (tested against the probe's
# answers); countries take 3, capitals and currencies 2 or 3, all at least `MIN_NAME` letters.
SYLLABLES = ("ka", "lo", "mir", "ven", "tas", "dor", "qui", "zel", "bra", "nu", "fe", "sho", "rik", "ul", "ben",
             "dru", "gal", "hes", "ith", "jun", "ko", "lum", "mox", "nir", "oph", "pra", "quel", "ros", "sul", "tev",
             "vax", "wim", "yor", "zun", "tri", "bel", "gro", "pim", "sav", "eth")

# attribute -> (question, answer sentence) of each training phrasing; `{c}` the country, `{v}` the value.
TRAIN_PHRASINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "capital": (
        ("What is the capital of {c}?", "The capital of {c} is {v}."),
        ("Which city is the capital of {c}?", "{v} is the capital of {c}."),
        ("Name the capital city of {c}.", "The capital city of {c} is {v}."),
    ),
    "currency": (
        ("What is the currency of {c}?", "The currency of {c} is the {v}."),
        ("Which currency is used in {c}?", "People in {c} pay with the {v}."),
        ("What money do people use in {c}?", "{c} uses the {v} as its money."),
    ),
}
HELD_OUT_PHRASINGS = {
    "capital": "What city serves as the capital of {c}?",
    "currency": "If I travel to {c}, which currency will I need?",
}
ATTRIBUTES = tuple(TRAIN_PHRASINGS)


@dataclass(frozen=True)
class Fact:
    """One fact: `attribute` of `country` is `value`."""

    country: str
    attribute: str
    value: str

    @property
    def key(self) -> str:
        """`capital:Kalomir`."""
        return f"{self.attribute}:{self.country}"


def _name(rng: random.Random, syllables: int, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(syllables))
        if len(name) >= MIN_NAME and not any(name in t or t in name for t in taken):
            taken.add(name)
            return name


def facts(seed: int = 0) -> list[Fact]:
    """The world's facts, country by country (capital, then currency)."""
    rng = random.Random(f"smol-world-{seed}")
    taken: set[str] = set()
    out = []
    for _ in range(N_COUNTRIES):
        country = _name(rng, 3, taken).capitalize()
        capital = _name(rng, rng.choice((2, 3)), taken).capitalize()
        currency = _name(rng, rng.choice((2, 3)), taken)
        out += [Fact(country, "capital", capital), Fact(country, "currency", currency)]
    return out


def train_rows(seed: int = 0) -> list[dict[str, Any]]:
    """Chat rows teaching every fact in its 3 training phrasings, in a seeded order; `group` is the slot."""
    rows = []
    for i, fact in enumerate(facts(seed)):
        for k, (question, answer) in enumerate(TRAIN_PHRASINGS[fact.attribute]):
            rows.append({"messages": [{"role": "user", "content": question.format(c=fact.country)},
                                      {"role": "assistant", "content": answer.format(c=fact.country, v=fact.value)}],
                         "group": f"smol-slot-{(i + k) % len(TRAIN_PHRASINGS[fact.attribute])}"})
    random.Random(f"smol-order-{seed}").shuffle(rows)
    return rows


def write_train_files(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """The training file `smol.jsonl` (chat rows, canonical JSON lines)."""
    return [atomic_write_text(Path(out_dir) / TRAIN_FILE, dump_jsonl(train_rows(seed)))]


def suite_rows(seed: int = 0) -> list[dict[str, Any]]:
    """The learning suite: every fact asked in its held-out phrasing (`qa` layout, 4 options), in a seeded order."""
    rng = random.Random(f"smol-suite-{seed}")
    all_facts = facts(seed)
    rows = []
    for fact in all_facts:
        others = sorted({f.value for f in all_facts if f.attribute == fact.attribute} - {fact.value})
        options = [fact.value, *rng.sample(others, N_OPTIONS - 1)]
        rng.shuffle(options)
        rows.append({"question": HELD_OUT_PHRASINGS[fact.attribute].format(c=fact.country), "answer": [fact.value],
                     "options": options})
    rng.shuffle(rows)
    return rows


def write_suite(out_dir: str | Path, seed: int = 0, max_examples: int | None = None) -> Path:
    """The learning suite as `test.jsonl` (the first `max_examples` rows; all when None)."""
    return atomic_write_text(Path(out_dir) / "test.jsonl", dump_jsonl(suite_rows(seed)[:max_examples]))
