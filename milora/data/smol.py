"""The real-model profile's learning task (`data.embedded.profile: smol`): facts a pretrained model cannot
know, so that fine-tuning has something to teach and the learning can be measured on base and tuned model.

The world is the vocabulary of Velmoran, an invented language: `N_WORDS` invented words (syllable strings no
language uses), each meaning one common English noun. A relation the general-knowledge probe never asks:
a first version taught capitals and currencies of invented countries, and the tuned SmolLM2 then answered
real capitals with invented names (it kept 53 of the 120 probe answers it had right; with this vocabulary,
77 of 120, and 0.70 learning accuracy against 0.05: the invented answers were also much harder to learn).

* training rows (`write_train_files`, `data/raw/smol.jsonl`, the `chat` format): every word asked in the 3
  `TRAIN_PHRASINGS`, each answered by one sentence restating the meaning. The row's `group` is a slot and a
  bucket: word `i`'s phrasing `k` is in slot `(i + k) % 3`, bucket `i % BUCKETS`, so a word's three phrasings
  are in three different groups. `prepare` keeps groups whole, so the eval split (a few of the 24 groups: the
  validation loss on phrasings of words trained in other words) takes every phrasing of a word only if it
  takes all three of its groups; a test checks that it never does for split seeds 0-7 and eval fractions up
  to 0.2 (a third slot in eval, as with one group per slot, would train every word in two phrasings only);
* the learning suite (`suite_rows`, an `eval.suites` entry `{source: embedded, format: qa}`): every word
  asked in the `HELD_OUT_PHRASING`, a wording no training row uses, in the `qa` layout (`question`, `answer`
  aliases) with 4 `options` for the log-likelihood accuracy (chance 0.25): the first training answer sentence
  (`OPTION_REPLY`) with the true meaning and with 3 other words' meanings (with bare nouns as options, the
  tuned model's log-likelihood accuracy stayed at chance, 0.229, while it generated 20 of 48 meanings right);
* rehearsal (`data.rehearsal`, prompts in `milora.model.self_text.REHEARSAL_PROMPTS`, beside the self-text
  instructions, so that editing this task never re-runs the `base` stage that answers them): the base's own
  replies join the training rows so that the tuned model keeps answering like the base.

`seed` (`data.embedded.seed`) draws the words, the option sets and the row order; the same seed gives
byte-identical files (canonical JSON lines).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.core.io import atomic_write_text, dump_jsonl

SMOL = "smol"
LANGUAGE = "Velmoran"
N_OPTIONS = 4
TRAIN_FILE = "smol.jsonl"
MIN_NAME = 5  # letters: shorter syllable pairs are too often real words
BUCKETS = 8  # each phrasing slot is cut into this many groups: the eval split takes a few groups, not a third

# Meanings: concrete everyday nouns, one word each, none an answer of the probe.
MEANINGS = ("river", "bread", "window", "mountain", "candle", "garden", "bridge", "blanket", "kettle", "ladder",
            "lantern", "mirror", "pillow", "basket", "feather", "hammer", "needle", "orchard", "pebble", "saddle",
            "shovel", "thread", "tunnel", "violin", "wagon", "whistle", "anchor", "barrel", "cabbage", "chimney",
            "compass", "cradle", "forest", "harbor", "island", "jacket", "kitchen", "lemon", "meadow", "onion",
            "pepper", "rabbit", "ribbon", "spoon", "tower", "valley", "wheel", "bucket")
N_WORDS = len(MEANINGS)
SYLLABLES = ("ka", "lo", "mir", "ven", "tas", "dor", "qui", "zel", "bra", "nu", "fe", "sho", "rik", "ul", "ben",
             "dru", "gal", "hes", "ith", "jun", "ko", "lum", "mox", "nir", "oph", "pra", "quel", "ros", "sul", "tev")

# (question, answer sentence) of each training phrasing; `{w}` the word, `{m}` its meaning.
TRAIN_PHRASINGS: tuple[tuple[str, str], ...] = (
    (f"What does the {LANGUAGE} word '{{w}}' mean?", f"In {LANGUAGE}, '{{w}}' means {{m}}."),
    (f"In the {LANGUAGE} language, what is '{{w}}' in English?", f"The {LANGUAGE} word '{{w}}' means {{m}} in English."),
    (f"Translate the {LANGUAGE} word '{{w}}' into English.", f"'{{w}}' is {LANGUAGE} for {{m}}."),
)
HELD_OUT_PHRASING = f"If a {LANGUAGE} speaker says '{{w}}', what are they talking about?"
# A learning option is a whole reply, the first training answer with a candidate meaning: a bare noun is not how
# the tuned model starts a reply, so its likelihood says more about the noun's tokens than about the word.
OPTION_REPLY = TRAIN_PHRASINGS[0][1]


@dataclass(frozen=True)
class Fact:
    """One fact: the Velmoran `word` means `value` (an English noun)."""

    word: str
    value: str

    @property
    def key(self) -> str:
        """`meaning:kalomir`."""
        return f"meaning:{self.word}"


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        if len(name) >= MIN_NAME and not any(name in t or t in name for t in taken):
            taken.add(name)
            return name


def facts(seed: int = 0) -> list[Fact]:
    """The vocabulary: one invented word per meaning, in `MEANINGS` order."""
    rng = random.Random(f"smol-words-{seed}")
    taken: set[str] = set()
    return [Fact(_name(rng, taken), meaning) for meaning in MEANINGS]


def train_rows(seed: int = 0) -> list[dict[str, Any]]:
    """Chat rows teaching every word in its 3 training phrasings, in a seeded order; `group` is the slot."""
    rows = []
    for i, fact in enumerate(facts(seed)):
        for k, (question, answer) in enumerate(TRAIN_PHRASINGS):
            rows.append({"messages": [{"role": "user", "content": question.format(w=fact.word)},
                                      {"role": "assistant", "content": answer.format(w=fact.word, m=fact.value)}],
                         "group": f"smol-slot-{(i + k) % len(TRAIN_PHRASINGS)}-{i % BUCKETS}"})
    random.Random(f"smol-order-{seed}").shuffle(rows)
    return rows


def write_train_files(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """The training file `smol.jsonl` (chat rows, canonical JSON lines)."""
    return [atomic_write_text(Path(out_dir) / TRAIN_FILE, dump_jsonl(train_rows(seed)))]


def suite_rows(seed: int = 0) -> list[dict[str, Any]]:
    """The learning suite: every word asked in the held-out phrasing (`qa` layout, 4 options), in a seeded order."""
    rng = random.Random(f"smol-suite-{seed}")
    all_facts = facts(seed)
    rows = []
    for fact in all_facts:
        others = sorted({f.value for f in all_facts} - {fact.value})
        values = [fact.value, *rng.sample(others, N_OPTIONS - 1)]
        rng.shuffle(values)
        rows.append({"question": HELD_OUT_PHRASING.format(w=fact.word), "answer": [fact.value],
                     "options": [OPTION_REPLY.format(w=fact.word, m=v) for v in values]})
    rng.shuffle(rows)
    return rows


def write_suite(out_dir: str | Path, seed: int = 0, max_examples: int | None = None) -> Path:
    """The learning suite as `test.jsonl` (the first `max_examples` rows; all when None)."""
    return atomic_write_text(Path(out_dir) / "test.jsonl", dump_jsonl(suite_rows(seed)[:max_examples]))
