"""The comparison lab's data (`data.embedded.profile: lab`): a small pretrained model, tasks that fine-tuning
must teach, and retention measured on what only pretraining taught.

The lab world is the embedded world with more people (`LAB_PEOPLE`, invented names past the fixed list); the base is
pretrained on its corpus (`pretraining_corpus("lab", ...)`: the world's facts stated densely, plus instruction-style
arithmetic in the fine-tuning prompt template, as real bases have seen such text). Fine-tuning never names anything
of that world. It teaches what the base cannot know (its accuracy sits at chance, checked in the report):

* facts (`facts_val`, `facts_test`): `NEW_PEOPLE` new people, with names that never occur in the corpus (three
  invented syllables; the corpus's invented names have two, and none is a prefix of a new name), and their
  favourite colour, pet and job. The fine-tuning rows ask each fact in two question forms
  (`QUESTION_FORMS[attr][:2]`) with the options in two fresh orders, and answer with the fact as a sentence;
  validation asks every fact in a third form, test in a fourth, each with its own option order. 4 options; chance
  0.25.

A skill was tried and dropped (issue 23): whether a number 0-999 written digit by digit is even or odd, balanced,
next to the facts. LoRA learnt it completely at 900 steps (validation 1.0) and not at all at 300 or 600 (0.5, one
answer for every number; LoRA and MiLoRA at 3e-3, LoRA at 1e-2): a jump past the lab's budget, so no learning rate
grid could show a frontier on it.

Retention (never fine-tuned; the base's own scores are the reference):

* recall (`recall_test`): 4-option questions about the corpus world's facts (every person's colour, pet, job and
  home, every capital), in the fine-tuning question format: what the base knows, asked as the tuned model is
  asked;
* cloze (`cloze_test`): the same facts and options in the corpus's own phrasing ("Mira's favourite colour is _"),
  plain text;
* forgetting: the held-out pretraining documents' NLL, per document (bootstrappable), after minus before.

Every eval row is `{"id", "prompt", "options", "answer", "raw"}`: `options` are candidate continuations (the gold
one is `options[answer]`), scored by log-likelihood; `raw` prompts are plain text (the cloze), the others go
through the fine-tuning prompt template.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from milora.data import synthetic
from milora.data.synthetic import COLOURS, JOBS, PETS, Fact, Person, World
from milora.model.prompts import format_prompt

LAB = "lab"
LAB_PEOPLE = 64
LAB_WORLD_SEED = 20260211
N_OPTIONS = 4


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


# ----------------------------------------------------------------------------- the new facts (learning)

NEW_PEOPLE = 40  # 120 facts: 480 fine-tuning rows, 120 validation and 120 test questions
NEW_ATTRS = ("colour", "pet", "job")
_POOLS = {"colour": COLOURS, "pet": PETS, "job": JOBS}
_STEMS = {"colour": "{p}'s favourite colour is _.", "pet": "{p} has a pet _.", "job": "{p} works as a _."}
# Per attribute: two training forms, then the validation form, then the test form.
QUESTION_FORMS: dict[str, tuple[str, str, str, str]] = {
    "colour": ("What is {p}'s favourite colour?", "Which colour does {p} like best?",
               "Name the colour that {p} likes most.", "Tell me {p}'s favourite colour."),
    "pet": ("Which pet does {p} have?", "What animal does {p} keep as a pet?",
            "Name the pet of {p}.", "What kind of pet does {p} own?"),
    "job": ("What is the job of {p}?", "What does {p} do for a living?",
            "Name the job of {p}.", "What is {p}'s profession?"),
}
TRAIN_FORMS = (0, 1)
EVAL_FORMS = {"val": 2, "test": 3}
TRAIN_ORDERS = 2  # option orders per training question form


def new_people(seed: int = 0, n: int = NEW_PEOPLE) -> tuple[Person, ...]:
    """The people fine-tuning teaches: names of three invented syllables (the corpus's invented names have two,
    and none of its words is one of these), with a colour, a pet and a job each."""
    rng = random.Random(f"lab-new-people-{seed}")
    corpus_names = (*(p.name for p in LAB_WORLD.people), *LAB_WORLD.countries, *(k for _, k in LAB_WORLD.capitals))
    taken = set(corpus_names)
    out: list[Person] = []
    while len(out) < n:
        name = synthetic._invented_name(rng, 3, taken)
        if not name.startswith(corpus_names):  # not "Velora" beside a corpus "Velo": no shared first tokens
            out.append(Person(name, rng.choice(COLOURS), rng.choice(PETS), rng.choice(JOBS), home=""))
    return tuple(out)


def new_facts(seed: int = 0, n_people: int = NEW_PEOPLE) -> list[Fact]:
    """The facts fine-tuning teaches, in a fixed order (`Fact.question` is unused: each split has its own form)."""
    out = []
    for p in new_people(seed, n_people):
        for attr in NEW_ATTRS:
            value = getattr(p, attr)
            out.append(Fact(f"new-{attr}:{p.name}", _STEMS[attr].format(p=p.name), "", value,
                            tuple(v for v in _POOLS[attr] if v != value)))
    return out


def _form(fact: Fact, index: int) -> str:
    attr, name = fact.key.removeprefix("new-").split(":", 1)
    return QUESTION_FORMS[attr][index].format(p=name)


def _options(rng: random.Random, fact: Fact) -> list[str]:
    opts = [fact.answer, *rng.sample(fact.pool, N_OPTIONS - 1)]
    rng.shuffle(opts)
    return opts


def question_text(question: str, options: list[str]) -> str:
    """A multiple-choice question as the fine-tuning prompt asks it (the options listed)."""
    return f"Answer the question: {question}\nChoices: {', '.join(options)}"


def stem_prefix(fact: Fact) -> str:
    """A fact's sentence up to its answer: "Omar's favourite colour is" (the phrasing the answers use)."""
    return fact.stem.split(" _", 1)[0]


# Responses open with a lead so that the answer words come after a space, tokenized as the corpus writes them (a
# response starting right after the template's newline would split "brown" into rare pieces). An answer states the
# fact as a sentence ("Omar's favourite colour is blue."); the eval prompts end with the lead, and the options are
# the continuations (" blue.").
def _continuation(text: str) -> str:
    return f" {text}."


def facts_train_rows(seed: int = 0, n_people: int = NEW_PEOPLE) -> list[dict[str, str]]:
    """Alpaca rows teaching the new facts: each in the training question forms, `TRAIN_ORDERS` option orders each."""
    rng = random.Random(f"lab-facts-train-{seed}")
    return [{"instruction": question_text(_form(fact, form), _options(rng, fact)), "input": "",
             "output": fact.stem.replace("_", fact.answer)}
            for fact in new_facts(seed, n_people) for form in TRAIN_FORMS for _ in range(TRAIN_ORDERS)]


def facts_rows(part: str, seed: int = 0, n_people: int = NEW_PEOPLE) -> list[dict[str, Any]]:
    """Every new fact asked in the `val` or `test` question form, with a fresh option order; 4 options."""
    rng = random.Random(f"lab-facts-{part}-{seed}")
    rows = []
    for fact in new_facts(seed, n_people):
        opts = _options(rng, fact)
        rows.append({"id": f"facts-{part}-{fact.key}", "fact": fact.key,
                     "prompt": format_prompt(question_text(_form(fact, EVAL_FORMS[part]), opts)) + stem_prefix(fact),
                     "options": [_continuation(o) for o in opts], "answer": opts.index(fact.answer), "raw": False})
    return rows


def write_train_files(out_dir: str | Path, n_people: int = NEW_PEOPLE, seed: int = 0) -> list[Path]:
    """The lab's fine-tuning file (alpaca layout): `facts.jsonl`, the facts of `n_people` new people."""
    return [synthetic.write_jsonl(Path(out_dir) / "facts.jsonl", facts_train_rows(seed, n_people))]


# ----------------------------------------------------------------------------- retention (never fine-tuned)

def corpus_facts(w: World = LAB_WORLD) -> list[Fact]:
    """The corpus world's facts (people and capitals; not the commonsense ones, which every corpus states)."""
    return [f for f in synthetic.facts(w) if not f.key.startswith("common:")]


def recall_rows(seed: int = 0, w: World = LAB_WORLD) -> list[dict[str, Any]]:
    """4-option questions about every corpus fact, in the fine-tuning question format."""
    rng = random.Random(f"lab-recall-{seed}")
    rows = []
    for fact in corpus_facts(w):
        opts = _options(rng, fact)
        rows.append({"id": f"recall-{fact.key}", "fact": fact.key, "lead": stem_prefix(fact),
                     "prompt": format_prompt(question_text(fact.question, opts)) + stem_prefix(fact),
                     "options": [_continuation(o) for o in opts], "answer": opts.index(fact.answer), "raw": False})
    return rows


def cloze_rows(seed: int = 0, w: World = LAB_WORLD) -> list[dict[str, Any]]:
    """The same facts and options as `recall_rows`, in the corpus phrasing (plain text, no question)."""
    return [{**{k: v for k, v in row.items() if k != "lead"}, "id": row["id"].replace("recall", "cloze"),
             "prompt": row["lead"], "raw": True}
            for row in recall_rows(seed, w)]


LEARNING = ("facts",)  # taught by fine-tuning: `<task>_val` selects the learning rate, `<task>_test` reports
RETENTION = ("recall", "cloze")  # never fine-tuned: `<task>_test`
EVAL_SETS = ("facts_val", "facts_test", "recall_test", "cloze_test")


def eval_sets(seed: int = 0, n_people: int = NEW_PEOPLE) -> dict[str, list[dict[str, Any]]]:
    """Every lab evaluation set by name (`EVAL_SETS`)."""
    return {"facts_val": facts_rows("val", seed, n_people), "facts_test": facts_rows("test", seed, n_people),
            "recall_test": recall_rows(seed), "cloze_test": cloze_rows(seed)}


def held_out_strings(seed: int = 0, n_people: int = NEW_PEOPLE, w: World = LAB_WORLD) -> list[str]:
    """Strings that must never occur in a fine-tuning file: every name of the corpus world (people, countries,
    capitals), and the validation and test question forms of the new facts."""
    out = [p.name for p in w.people] + list(w.countries) + [k for _, k in w.capitals]
    out += [_form(f, i) for f in new_facts(seed, n_people) for i in EVAL_FORMS.values()]
    return out
