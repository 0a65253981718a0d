"""The comparison lab's data (`data.embedded.profile: lab`): tasks meant for a small pretrained model, with
splits that keep validation and test knowledge out of the fine-tuning set.

The lab world is the embedded world with more people (`LAB_PEOPLE`, invented names past the fixed list);
the base is pretrained on its corpus (`pretraining_corpus("lab", ...)`: the world's facts stated densely, plus
instruction-style arithmetic in the fine-tuning prompt template, as real bases have seen such text).
Its entities are split by a seeded hash into train / val / test: every person and every capital belongs to
one split, and the fine-tuning files name only train entities (their questions, and the even/odd skill
rows, which use no names at all). So:

* knowledge (`knowledge_val`, `knowledge_test`): 4-option questions about facts of val / test entities,
  stated only in the pretraining corpus; the fine-tuning set teaches the question format on train facts;
* skill (`skill_val`, `skill_test`): say whether a number is even or odd, learnt from the fine-tuning rows alone
  (the corpus never says either word); 2 options, numbers never in the fine-tuning set. (Reversing a list of
  words, tried first, needs copying from the prompt, which the 2.7M base does not learn in a few hundred steps.)
* cloze (`cloze_test`): the test facts in the corpus's own phrasing ("Mira's favourite colour is _"), the
  same 4 options, scored before and after fine-tuning (retention of pretraining knowledge).

Every eval row is `{"id", "prompt", "options", "answer", "raw"}`: `options` are candidate continuations
(the gold one is `options[answer]`), scored by log-likelihood; `raw` prompts are plain text (the cloze),
the others go through the fine-tuning prompt template.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from milora.data import synthetic
from milora.data.synthetic import COLOURS, JOBS, PETS, Fact, Person, World
from milora.model.prompts import format_prompt

LAB = "lab"
LAB_PEOPLE = 64
LAB_WORLD_SEED = 20260211
SPLITS = ("train", "val", "test")
SPLIT_SHARES = (0.5, 0.25, 0.25)  # of the people and of the countries
N_OPTIONS = 4
SKILL_MAX = 9999  # the parity skill's numbers: 0..SKILL_MAX
KNOWLEDGE_VARIANTS = 3  # training questions per train fact (other options, other order)



def build_lab_world(n_people: int = LAB_PEOPLE, seed: int = LAB_WORLD_SEED) -> World:
    """The embedded world's countries, with `n_people` people: the fixed names, then invented ones."""
    base = synthetic.WORLD
    rng = random.Random(seed)
    taken = {*synthetic.FIRST_NAMES, *base.countries, *(k for _, k in base.capitals)}
    names = list(synthetic.FIRST_NAMES[:n_people])
    while len(names) < n_people:
        names.append(synthetic._invented_name(rng, 2, taken))
    people = tuple(Person(n, rng.choice(COLOURS), rng.choice(PETS), rng.choice(JOBS), rng.choice(base.countries))
                   for n in names)
    return World(people=people, capitals=base.capitals)


LAB_WORLD = build_lab_world()


def _instruction_doc(rng: random.Random, w: World) -> str:
    """A worked instruction in the fine-tuning prompt template, on arithmetic (no lab task): real bases have seen
    instruction-style text, so fine-tuning teaches the task, not what a prompt template is."""
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return format_prompt(f"Compute {a} + {b}.") + str(a + b)
    return format_prompt(f"Compute {max(a, b)} - {min(a, b)}.") + str(max(a, b) - min(a, b))


# The lab corpus states the world's facts about twice as densely as the default one (the lab world has 64 people
# and a 400-step budget), keeps some arithmetic and stories, and adds instruction-style documents.
LAB_DOC_KINDS: synthetic.DocKinds = (
    (synthetic._person_doc, 0.36),
    (synthetic._country_doc, 0.08),
    (synthetic._quiz_doc, 0.20),
    (_instruction_doc, 0.10),
    (synthetic._arithmetic_doc, 0.06),
    (synthetic._story_doc, 0.06),
    (synthetic._commonsense_doc, 0.07),
    (synthetic._filler_doc, 0.07),
)


def pretraining_corpus(profile: str, n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """The pretraining corpus of a data profile (`milora.data.synthetic.pretraining_corpus` for the default)."""
    if profile == LAB:
        return synthetic.pretraining_corpus(n_train, n_heldout, seed, LAB_WORLD, LAB_DOC_KINDS)
    return synthetic.pretraining_corpus(n_train, n_heldout, seed)


def _split_of(key: str, seed: int) -> str:
    u = int(hashlib.sha256(f"lab-split-{seed}\x00{key}".encode()).hexdigest()[:16], 16) / 2**64
    edge = 0.0
    for name, share in zip(SPLITS, SPLIT_SHARES, strict=True):
        edge += share
        if u < edge:
            return name
    return SPLITS[-1]


def entity_splits(seed: int = 0, w: World = LAB_WORLD) -> dict[str, str]:
    """Entity (person name or country) -> its split. Ranked by a seeded hash, cut at the split shares, so every
    split gets its share exactly."""
    out: dict[str, str] = {}
    for group in ([p.name for p in w.people], list(w.countries)):
        ranked = sorted(group, key=lambda k: hashlib.sha256(f"lab-split-{seed}\x00{k}".encode()).hexdigest())
        cuts = [round(len(ranked) * sum(SPLIT_SHARES[: i + 1])) for i in range(len(SPLITS))]
        start = 0
        for name, end in zip(SPLITS, cuts, strict=True):
            out.update({k: name for k in ranked[start:end]})
            start = end
    return out


def _entity(fact: Fact) -> str:
    return fact.key.split(":", 1)[1]


def fact_split(fact: Fact, splits: dict[str, str]) -> str:
    """The split of a fact: its person's or country's; commonsense facts are always train."""
    return "train" if fact.key.startswith("common:") else splits[_entity(fact)]


def _options(rng: random.Random, fact: Fact) -> list[str]:
    opts = [fact.answer, *rng.sample(fact.pool, N_OPTIONS - 1)]
    rng.shuffle(opts)
    return opts


def question_text(fact: Fact, options: list[str]) -> str:
    """The knowledge question as the fine-tuning prompt asks it (the options listed)."""
    return f"Answer the question: {fact.question}\nChoices: {', '.join(options)}"


# Responses open with a lead so that the answer words come after a space, tokenized as the corpus writes them (a
# response starting right after the template's newline would split "brown" into rare pieces). A knowledge answer
# states the fact as a sentence ("Omar's favourite colour is blue."), a skill answer restates the number
# ("7513 is odd."); the eval prompts end with the lead, and the options are the continuations (" blue.", " odd.").
# (With a lead that does not restate the number, "The number is", every method stayed at the majority class.)
SKILL_LEAD = "{n} is"  # "7513 is" (the number restated, as the knowledge answers restate their fact)


def stem_prefix(fact: Fact) -> str:
    """A held-out fact's sentence up to its answer: "Omar's favourite colour is" (the corpus phrasing)."""
    return fact.stem.split(" _", 1)[0]


def _continuation(text: str) -> str:
    return f" {text}."


def _parity_instruction(n: int) -> str:
    return f"Is {n} an even or an odd number?"


def _parity(n: int) -> str:
    return "even" if n % 2 == 0 else "odd"


def _new_number(rng: random.Random, seen: set[int]) -> int:
    """A number to classify that is not in `seen` (added to it)."""
    while True:
        n = rng.randint(0, SKILL_MAX)
        if n not in seen:
            seen.add(n)
            return n


def knowledge_train_rows(seed: int = 0, w: World = LAB_WORLD) -> list[dict[str, str]]:
    """Alpaca rows teaching the question format on train facts (and commonsense facts): `KNOWLEDGE_VARIANTS`
    per fact, each fact one `group`."""
    rng = random.Random(f"lab-knowledge-train-{seed}")
    splits = entity_splits(seed, w)
    held = set(held_out_strings(seed, w))
    rows = []
    for fact in synthetic.facts(w):
        if fact_split(fact, splits) != "train":
            continue
        fact = replace(fact, pool=tuple(v for v in fact.pool if v not in held))  # no held-out capital as an option
        for _ in range(KNOWLEDGE_VARIANTS):
            rows.append({"instruction": question_text(fact, _options(rng, fact)), "input": "",
                         "output": fact.stem.replace("_", fact.answer), "group": f"fact:{fact.key}"})
    return rows


def skill_train_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` alpaca rows of the parity skill, on distinct numbers (none of an eval row's)."""
    seen = {it["number"] for part in ("val", "test") for it in _skill_items(part, seed)}
    rng = random.Random(f"lab-skill-train-{seed}")
    rows = []
    for _ in range(n):
        k = _new_number(rng, seen)
        rows.append({"instruction": _parity_instruction(k), "input": "",
                     "output": SKILL_LEAD.format(n=k) + _continuation(_parity(k))})
    return rows


def write_train_files(out_dir: str | Path, skill_rows: int, seed: int = 0) -> list[Path]:
    """The lab's fine-tuning files (alpaca layout): `knowledge.jsonl` (train facts), `skill.jsonl`."""
    out = Path(out_dir)
    return [synthetic.write_jsonl(out / "knowledge.jsonl", knowledge_train_rows(seed)),
            synthetic.write_jsonl(out / "skill.jsonl", skill_train_rows(skill_rows, seed))]


# ----------------------------------------------------------------------------- evaluation sets

N_SKILL_EVAL = 150
PARITY_OPTIONS = [" even.", " odd."]


def _skill_items(part: str, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"lab-skill-{part}-{seed}")
    seen = {it["number"] for it in _skill_items("val", seed)} if part == "test" else set()
    return [{"number": _new_number(rng, seen)} for _ in range(N_SKILL_EVAL)]


def skill_rows(part: str, seed: int = 0) -> list[dict[str, Any]]:
    """The parity skill's `val` or `test` rows (numbers never in the fine-tuning set); 2 options."""
    return [{"id": f"skill-{part}-{i}",
             "prompt": format_prompt(_parity_instruction(it["number"])) + SKILL_LEAD.format(n=it["number"]),
             "options": PARITY_OPTIONS, "answer": PARITY_OPTIONS.index(_continuation(_parity(it["number"]))),
             "raw": False}
            for i, it in enumerate(_skill_items(part, seed))]


def _held_facts(part: str, seed: int, w: World) -> list[Fact]:
    splits = entity_splits(seed, w)
    return [f for f in synthetic.facts(w) if not f.key.startswith("common:") and fact_split(f, splits) == part]


def knowledge_rows(part: str, seed: int = 0, w: World = LAB_WORLD) -> list[dict[str, Any]]:
    """4-option questions about the facts of the `val` or `test` entities, in the fine-tuning format (the answer
    sentence up to the answer is part of the prompt; `lead` is that part)."""
    rng = random.Random(f"lab-knowledge-{part}-{seed}")
    rows = []
    for fact in _held_facts(part, seed, w):
        opts = _options(rng, fact)
        rows.append({"id": f"knowledge-{part}-{fact.key}", "fact": fact.key, "lead": stem_prefix(fact),
                     "prompt": format_prompt(question_text(fact, opts)) + stem_prefix(fact),
                     "options": [_continuation(o) for o in opts],
                     "answer": opts.index(fact.answer), "raw": False})
    return rows


def cloze_rows(part: str = "test", seed: int = 0, w: World = LAB_WORLD) -> list[dict[str, Any]]:
    """The same facts and options as `knowledge_rows(part)`, asked in the corpus phrasing (plain text, no question)."""
    return [{**row, "id": row["id"].replace("knowledge", "cloze"), "prompt": row["lead"], "raw": True}
            for row in knowledge_rows(part, seed, w)]


EVAL_SETS = ("knowledge_val", "knowledge_test", "skill_val", "skill_test", "cloze_test")


def eval_sets(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Every lab evaluation set by name (`EVAL_SETS`)."""
    return {"knowledge_val": knowledge_rows("val", seed), "knowledge_test": knowledge_rows("test", seed),
            "skill_val": skill_rows("val", seed), "skill_test": skill_rows("test", seed),
            "cloze_test": cloze_rows("test", seed)}


def held_out_strings(seed: int = 0, w: World = LAB_WORLD) -> list[str]:
    """Strings that must never occur in a fine-tuning file: the names of val/test people, the capitals of
    val/test countries, and every val/test question."""
    splits = entity_splits(seed, w)
    out = [p.name for p in w.people if splits[p.name] != "train"]
    out += [k for c, k in w.capitals if splits[c] != "train"]
    out += [f.question for part in ("val", "test") for f in _held_facts(part, seed, w)]
    return out
