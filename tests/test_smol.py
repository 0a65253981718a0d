"""The real-model profile's data (`data.embedded.profile: smol`): the invented-fact generator, its learning suite
and the committed general-knowledge probe; and (slow) the whole pipeline on the tiny base with that profile,
the suites scored on base and tuned model."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from milora.core.errors import InvalidInput
from milora.data import smol
from milora.data.formats import read_records
from milora.model.scoring import gold_option, normalize_answer
from milora.pipeline.config import SuiteConfig, validate
from milora.stages.ingest import materialise, materialise_suite
from milora.stages.prepare import split_rows

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "data" / "probes" / "general_knowledge.jsonl"


def _canonical(path: Path) -> bool:
    return all(line == json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False)
               for line in path.read_text(encoding="utf-8").splitlines())


# ----------------------------------------------------------------------------- the generator


def test_training_rows_are_seeded_deterministic_canonical_chat_rows(tmp_path):
    assert smol.train_rows(0) == smol.train_rows(0) != smol.train_rows(1)
    a, b = tmp_path / "a", tmp_path / "b"
    [fa], [fb] = smol.write_train_files(a, 0), smol.write_train_files(b, 0)
    assert fa.name == fb.name == smol.TRAIN_FILE and fa.read_bytes() == fb.read_bytes() and _canonical(fa)
    rows = read_records(fa).rows  # auto-detected as chat
    facts = smol.facts(0)
    assert len(rows) == 3 * len(facts) == 3 * smol.N_WORDS
    assert all(r["task"] == "generic" and r["group"].startswith("smol-slot-") for r in rows)


def test_words_are_invented_unique_and_unknown_to_the_probe():
    facts = smol.facts(0)
    names = sorted({f.word for f in facts})
    assert len(names) == smol.N_WORDS == len(set(smol.MEANINGS))  # every word its own name and meaning
    lower = [n.lower() for n in names]
    assert all(len(n) >= smol.MIN_NAME and n.isalpha() for n in lower)
    assert not [(a, b) for a in lower for b in lower if a != b and a in b]  # no name inside another
    probe_words = set(normalize_answer(PROBE.read_text(encoding="utf-8")).split())
    assert not set(lower) & probe_words
    assert {f.word for f in smol.facts(1)} != {f.word for f in facts}
    probe_answers = {normalize_answer(a) for r in map(json.loads, PROBE.read_text().splitlines()) for a in r["answer"]}
    assert not {normalize_answer(m) for m in smol.MEANINGS} & probe_answers  # the task never answers a probe question


def test_rehearsal_prompts_ask_nothing_the_probe_asks_nor_the_self_text():
    from milora.model.self_text import INSTRUCTIONS, REHEARSAL_PROMPTS

    probe = [set(normalize_answer(json.loads(x)["question"]).split()) for x in PROBE.read_text().splitlines()]
    for prompt in REHEARSAL_PROMPTS:  # "capital of Nepal" is fine, "capital of France" (a probe question) is not
        words = set(normalize_answer(prompt).split())
        assert not [q for q in probe if words <= q], prompt
    assert not set(REHEARSAL_PROMPTS) & set(INSTRUCTIONS)
    assert len(set(REHEARSAL_PROMPTS)) == len(REHEARSAL_PROMPTS) >= 100


def test_every_fact_is_trained_in_three_phrasings_one_per_slot():
    rows = smol.train_rows(0)
    by_fact: dict[str, list[str]] = {}
    for fact in smol.facts(0):
        for r in rows:
            question, answer = (m["content"] for m in r["messages"])
            if re.search(rf"\b{fact.word}\b", question) and re.search(rf"\b{fact.value}\b", answer):
                by_fact.setdefault(fact.key, []).append(r["group"])
    assert len(by_fact) == len(smol.facts(0))
    assert all(sorted(g.rsplit("-", 1)[0] for g in groups) == ["smol-slot-0", "smol-slot-1", "smol-slot-2"]
               and len(set(groups)) == 3 for groups in by_fact.values())


@pytest.mark.parametrize("eval_fraction", [0.05, 0.1, 0.2])
def test_prepare_split_never_takes_a_fact_out_of_training(tmp_path, eval_fraction):
    smol.write_train_files(tmp_path, 0)
    rows = read_records(tmp_path / smol.TRAIN_FILE).rows
    values = {f.value for f in smol.facts(0)}
    for seed in range(8):
        for cap in (10, 200):
            split = split_rows(rows, eval_fraction, cap, seed)
            trained = {v for r in split.train for v in values if re.search(rf"\b{v}\b", r["response"])}
            assert trained == values, (seed, cap)
            assert split.eval  # a validation loss always has rows


def test_learning_suite_asks_every_fact_in_a_held_out_phrasing(tmp_path):
    suite = smol.suite_rows(0)
    assert suite == smol.suite_rows(0) and len(suite) == len(smol.facts(0))
    assert sorted(r["answer"][0] for r in suite) == sorted(f.value for f in smol.facts(0))
    train_questions = {r["messages"][0]["content"] for r in smol.train_rows(0)}
    train_text = json.dumps(smol.train_rows(0))
    assert not {r["question"] for r in suite} & train_questions
    assert smol.HELD_OUT_PHRASING.split("{w}")[0] not in train_text  # the held-out wording is never trained
    for r in suite:
        assert len(r["options"]) == smol.N_OPTIONS == len(set(r["options"]))
        gold = gold_option(r["options"], r["answer"])  # whole replies: the trained sentence with each meaning
        assert gold is not None and r["options"][gold] in train_text
        assert all(o.startswith(smol.OPTION_REPLY.split("{w}")[0]) for o in r["options"])
    path = smol.write_suite(tmp_path, 0, max_examples=7)
    assert _canonical(path)
    rows = read_records(path, require_response=False).rows  # auto-detected as qa (list answers)
    assert len(rows) == 7 and {r["task"] for r in rows} == {"qa"} and all(r["n_options"] == 4 for r in rows)


def test_ingest_writes_the_smol_profile_and_its_learning_suite(tmp_path):
    cfg = validate({"data": {"embedded": {"profile": "smol"}},
                    "eval": {"suites": [{"name": "learning", "source": "embedded", "format": "qa"}]}})
    (tmp_path / "raw").mkdir()
    (tmp_path / "suite").mkdir()
    assert materialise(cfg, tmp_path / "raw") == 1
    assert (tmp_path / "raw" / smol.TRAIN_FILE).read_bytes() == (
        smol.write_train_files(tmp_path / "again", 0)[0].read_bytes())
    assert materialise_suite(cfg, 0, cfg.eval.suites[0], tmp_path / "suite") == 1
    assert len((tmp_path / "suite" / "test.jsonl").read_text().splitlines()) == smol.N_WORDS
    default = validate({})
    with pytest.raises(InvalidInput, match=r"eval\.suites\[0\] \(learning\): an embedded qa suite is the smol profile"):
        materialise_suite(default, 0, SuiteConfig(name="learning", source="embedded", format="qa"), tmp_path)


# ----------------------------------------------------------------------------- the general-knowledge probe


def test_probe_is_a_tracked_small_valid_qa_file_without_duplicates():
    raw = [json.loads(line) for line in PROBE.read_text(encoding="utf-8").splitlines()]
    assert len(raw) >= 170 and PROBE.stat().st_size < 64_000 and _canonical(PROBE)
    assert all(set(r) == {"question", "answer"} and isinstance(r["answer"], list) for r in raw)
    questions = [normalize_answer(r["question"]) for r in raw]
    assert len(set(questions)) == len(questions)
    for r in raw:  # an alias the question already says would be judged right when the model echoes it
        q = f" {normalize_answer(r['question'])} "
        assert not [a for a in r["answer"] if f" {normalize_answer(a)} " in q], r
    rows = read_records(PROBE, require_response=False).rows  # every row valid, detected as qa
    assert len(rows) == len(raw) and {r["task"] for r in rows} == {"qa"}
    ignored = subprocess.run(["git", "check-ignore", "-q", str(PROBE)], cwd=ROOT).returncode
    assert ignored == 1  # not ignored: committed with the code


# ----------------------------------------------------------------------------- the pipeline with the smol profile


@pytest.mark.slow
def test_pipeline_with_the_smol_profile_scores_base_and_tuned(tmp_path):
    """ingest -> base -> prepare -> svd -> train -> evaluate on the tiny embedded base, profile smol: the learning
    suite and the probe are scored on the base and on the tuned model, and the probe's `retained` is `retention`."""
    from milora.pipeline.paths import Paths
    from milora.stages import run_stage
    from tests.project import write_params

    suites = [{"name": "learning", "source": "embedded", "format": "qa", "max_examples": 12},
              {"name": "general", "source": str(PROBE), "format": "qa", "max_examples": 12}]
    write_params(tmp_path, {"data.embedded.profile": "smol", "eval.suites": suites, "eval.score_base": True,
                            "eval.retention_suite": "general", "train.max_steps": 6, "eval.max_new_tokens": 6})
    for stage in ("ingest", "base", "prepare", "svd", "train", "evaluate"):
        run_stage(stage, tmp_path / "params.yaml", tmp_path)
    paths = Paths(tmp_path)
    assert (paths.raw_dir / smol.TRAIN_FILE).is_file()
    data = json.loads(paths.report("data").read_text())
    assert data["rows"]["train"] > data["rows"]["eval"] > 0
    report = json.loads(paths.report("eval").read_text())
    for name in ("learning", "general"):
        m = report["suites"][name]
        assert m["n"] == 12 and 0 <= m["accuracy"] <= 1 and 0 <= m["base_accuracy"] <= 1
        assert 0 <= m["retained"] <= 1 and 0 <= m["n_base_correct"] <= 12
        preds = [json.loads(x) for x in (paths.suite_predictions_dir / f"{name}.jsonl").read_text().splitlines()]
        assert len(preds) == 12 and all({"base_prediction", "base_correct", "prediction", "correct"} <= set(p)
                                        for p in preds)
        assert m["n_base_correct"] == sum(p["base_correct"] for p in preds)
    learning = report["suites"]["learning"]
    assert learning["n_loglik"] == 12 and 0 <= learning["loglik_accuracy"] <= 1 and "base_loglik_accuracy" in learning
    assert report["retention"] == report["suites"]["general"]["retained"]
    summary = json.loads(paths.metrics("eval").read_text())
    assert summary["retention"] == report["retention"]
    assert set(summary["suites"]["learning"]) == {"accuracy", "loglik_accuracy", "base_accuracy", "retained"}
    timings = json.loads(paths.timings("eval").read_text())
    assert timings["suites"]["general"]["base_seconds"] >= 0
