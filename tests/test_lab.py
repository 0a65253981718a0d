"""The comparison lab: held-out facts stay out of the fine-tuning files, learning rates are selected on
validation only, the statistics agree with known cases, and `milora compare --quick` runs end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from milora.cli.compare import (
    NOTES_MARK,
    default_grid,
    edge_extension,
    lab_statistics,
    parse_grid,
    select_learning_rate,
    validation_score,
    with_kept_notes,
)
from milora.core.errors import InvalidInput
from milora.data import lab
from milora.evaluation.stats import paired_t, t_interval, two_level_bootstrap, wilson
from milora.pipeline.config import load_config
from milora.stages.ingest import materialise

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- data: no leak of held-out facts


@pytest.fixture(scope="module")
def lab_files(tmp_path_factory):
    """The fine-tuning files the ingest stage writes for params.lab.yaml, as text."""
    out = tmp_path_factory.mktemp("raw")
    assert materialise(load_config(ROOT / "params.lab.yaml"), out) == 2
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(out.glob("*.jsonl"))}


def test_held_out_facts_never_appear_in_the_fine_tuning_files(lab_files):
    text = "\n".join(lab_files.values())
    splits = lab.entity_splits()
    facts = {f.key: f for f in lab._held_facts("val", 0, lab.LAB_WORLD) + lab._held_facts("test", 0, lab.LAB_WORLD)}
    asked = [r["fact"] for name in ("knowledge_val", "knowledge_test") for r in lab.eval_sets()[name]]
    assert len(asked) == len(set(asked)) > 100  # every held-out person and capital fact is asked once
    for key in asked:
        kind, entity = key.split(":", 1)
        assert splits[entity] in ("val", "test")
        fact = facts[key]
        # the entity, the question and the fact sentence never occur in any form
        if kind == "capital":  # the country is also a value of train facts (a home); its capital is the secret
            assert not re.search(rf"\b{re.escape(fact.answer)}\b", text), key
        else:
            assert not re.search(rf"\b{re.escape(entity)}\b", text), key
        assert fact.question not in text and fact.stem.replace("_", fact.answer) not in text, key
    # the files do teach the question format, on train facts
    train_people = [p.name for p in lab.LAB_WORLD.people if splits[p.name] == "train"]
    assert all(re.search(rf"\b{name}\b", lab_files["knowledge.jsonl"]) for name in train_people)


def test_skill_eval_numbers_are_not_in_the_fine_tuning_files(lab_files):
    rows = [json.loads(line) for line in lab_files["skill.jsonl"].splitlines()]
    assert len(rows) == 1000 and all(re.fullmatch(r"(\d+) is (even|odd)\.", r["output"]) for r in rows)
    trained = {int(re.search(r"\d+", r["instruction"]).group()) for r in rows}
    assert len(trained) == 1000
    held = []
    for name in ("skill_val", "skill_test"):
        for r in lab.eval_sets()[name]:
            n = int(re.search(r"Is (\d+) an even", r["prompt"]).group(1))
            assert r["options"][r["answer"]] == (" even." if n % 2 == 0 else " odd.")
            assert r["prompt"].endswith(f"### Response:\n{n} is")
            held.append(n)
    assert len(set(held)) == len(held) == 2 * lab.N_SKILL_EVAL and not set(held) & trained


def test_the_lab_corpus_states_the_facts_but_never_the_lab_tasks():
    docs, heldout = lab.pretraining_corpus("lab", 3000, 100)
    text = "\n".join(docs)
    assert not re.search(r"\b(even|odd)\b", text) and "Answer the question:" not in text and "Choices:" not in text
    assert sum("### Instruction:" in d for d in docs) > 100  # the prompt template, on arithmetic only
    assert all(re.search(r"### Instruction:\nCompute \d+ [+-] \d+\.", d) for d in docs if "### Instruction" in d)
    test_people = [n for n, part in lab.entity_splits().items() if part == "test" and n not in lab.LAB_WORLD.countries]
    assert all(name in text for name in test_people)  # held-out facts are stated in pretraining
    assert not set(heldout) & set(docs)


def test_cloze_asks_the_test_facts_in_corpus_phrasing():
    sets = lab.eval_sets()
    for q, c in zip(sets["knowledge_test"], sets["cloze_test"], strict=True):
        assert c["raw"] and not q["raw"] and c["answer"] == q["answer"]
        assert c["options"] == q["options"] and q["prompt"].endswith("### Response:\n" + c["prompt"])
        assert "### Instruction" not in c["prompt"] and c["fact"].split(":", 1)[1] in c["prompt"]


# ----------------------------------------------------------------------------- selection on validation only


def _trial(lr, val, test):
    return {"learning_rate": lr, "val": {"knowledge_val": val, "skill_val": val},
            "test": {"knowledge": test, "skill": test, "cloze": test}}


def test_learning_rate_selection_follows_validation_not_test():
    trials = [_trial(1e-3, 0.9, 0.2), _trial(3e-3, 0.5, 0.95), _trial(1e-2, 0.6, 0.9)]
    assert select_learning_rate(trials) == 1e-3  # the test split would pick 3e-3
    # and flipping the test numbers changes nothing
    flipped = [{**t, "test": {k: 1 - v for k, v in t["test"].items()}} for t in trials]
    assert select_learning_rate(flipped) == 1e-3


def test_selection_uses_the_mean_of_both_validation_sets_and_breaks_ties_low():
    a = {"learning_rate": 1e-3, "val": {"knowledge_val": 1.0, "skill_val": 0.2}}
    b = {"learning_rate": 3e-3, "val": {"knowledge_val": 0.5, "skill_val": 0.6}}
    assert validation_score(a) == pytest.approx(0.6) and validation_score(b) == pytest.approx(0.55)
    assert select_learning_rate([b, a]) == 1e-3
    assert select_learning_rate([{**a, "learning_rate": 3e-2}, a]) == 1e-3


def test_a_best_rate_at_the_grids_edge_extends_the_grid_one_step_beyond_it():
    grid = [_trial(3e-4, 0.9, 0.1), _trial(9e-4, 0.8, 0.9), _trial(3e-3, 0.5, 0.9)]
    assert edge_extension(grid, 1e-6, 1.0) == 1e-4  # lowest rate best on validation: one step (x1/3) below
    top = [_trial(3e-4, 0.5, 0.9), _trial(9e-4, 0.8, 0.9), _trial(3e-3, 0.9, 0.1)]
    assert edge_extension(top, 1e-6, 1.0) == 1e-2  # x(3e-3 / 9e-4)
    inside = [_trial(3e-4, 0.5, 0.9), _trial(9e-4, 0.9, 0.1), _trial(3e-3, 0.5, 0.9)]
    assert edge_extension(inside, 1e-6, 1.0) is None  # bracketed: tuned (whatever the test split says)
    assert edge_extension(grid, 2e-4, 1.0) is None  # beyond the bounds
    assert edge_extension(grid[:1], 1e-6, 1.0) is None
    # after one extension the new low rate is the best: one more step down; the test numbers never matter
    extended = [*grid, _trial(1e-4, 0.95, 0.0)]
    assert edge_extension(extended, 1e-6, 1.0) == 3.3e-5


def test_a_rewritten_report_keeps_the_reading_written_below_the_mark(tmp_path):
    path = tmp_path / "results.md"
    assert with_kept_notes("# numbers v1\n", path) == "# numbers v1\n"  # no file yet
    path.write_text("# numbers v1\n")
    assert with_kept_notes("# numbers v2\n", path) == "# numbers v2\n"  # no mark: nothing to keep
    path.write_text(f"# numbers v1\n\n{NOTES_MARK}\n## Reading\nMiLoRA forgets least.\n")
    assert with_kept_notes("# numbers v2\n", path) == f"# numbers v2\n\n{NOTES_MARK}\n## Reading\nMiLoRA forgets least.\n"


def test_default_grid_is_five_log_spaced_rates_around_the_default():
    assert default_grid(3e-3) == [3e-4, 9e-4, 3e-3, 9e-3, 3e-2]
    grid = parse_grid(["pissa=1e-4,3e-5"], ["lora", "pissa", "milora"], 3e-3)
    assert grid["pissa"] == [3e-5, 1e-4] and grid["lora"] == grid["milora"] == default_grid(3e-3)
    for bad in ("dora=1e-3", "lora=", "lora=fast", "lora=-1e-3"):
        with pytest.raises(InvalidInput):
            parse_grid([bad], ["lora", "milora"], 3e-3)


# ----------------------------------------------------------------------------- statistics


def test_t_interval_known_mean_std_and_width():
    s = t_interval([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2} = 4.302653
    s = t_interval([0.5] * 4)
    assert s.std == 0 and s.ci_low == s.ci_high == 0.5
    assert math.isnan(t_interval([0.7]).ci_low)


def test_two_level_bootstrap_constant_difference_has_a_zero_width_interval():
    """The examples vary a lot, their differences not at all: only a paired resampling gives zero width."""
    b = [[0.1, 0.4, 0.2, 0.9], [0.3, 0.3, 0.8, 0.0], [0.5, 0.6, 0.1, 0.2]]
    a = [[x + 0.25 for x in row] for row in b]
    d = two_level_bootstrap(a, b, n_boot=500)
    assert d.estimate == pytest.approx(0.25) and d.ci_low == pytest.approx(0.25) and d.ci_high == pytest.approx(0.25)
    assert d.significant
    same = two_level_bootstrap(b, b, n_boot=500)
    assert (same.estimate, same.ci_low, same.ci_high, same.significant) == (0.0, 0.0, 0.0, False)


def test_two_level_bootstrap_is_seeded():
    a = [[1, 0, 1, 1, 0, 1, 0, 1] * 5] * 3
    b = [[1, 1, 0, 1, 0, 0, 1, 1] * 5] * 3
    d1 = two_level_bootstrap(a, b, seed=7)
    assert d1 == two_level_bootstrap(a, b, seed=7)
    assert d1.estimate == 0.0 and d1.ci_low < 0 < d1.ci_high and not d1.significant
    x = [[(7 * i + 3 * j) % 11 / 10 for j in range(30)] for i in range(3)]
    y = [[(5 * i + 2 * j) % 13 / 10 for j in range(30)] for i in range(3)]
    assert two_level_bootstrap(x, y, n_boot=300, seed=1) != two_level_bootstrap(x, y, n_boot=300, seed=2)
    with pytest.raises(ValueError):
        two_level_bootstrap([[1, 0]], [[1, 0, 1]])


def test_wilson_interval_of_a_proportion():
    low, high = wilson(61, 68)  # the example: 61/68 is not "0.897 ± 0"
    assert (round(low, 2), round(high, 2)) == (0.80, 0.95)
    assert wilson(0, 48)[0] == pytest.approx(0.0, abs=1e-12) and round(wilson(0, 48)[1], 3) == 0.074  # the README's base: 0/48
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(10, 10)[0] < 0.75
    with pytest.raises(ValueError):
        wilson(0, 0)


def test_a_95_interval_over_3_seeds_covers_95_percent_and_min_max_would_not():
    """Three seeds, 4,000 simulated experiments with a known mean difference: the paired-t interval covers it
    ~95 % of the time. The min-max of the three differences (what a percentile bootstrap of a 3 x 1 table is)
    covers it ~75 % of the time: an interval passed off as 95 % that this test would catch."""
    rng = np.random.default_rng(0)
    true_diff, sims = 0.05, 4000
    a = rng.normal(0.60 + true_diff, 0.04, (sims, 3))
    b = rng.normal(0.60, 0.04, (sims, 3))
    covered = [paired_t(x, y).ci_low <= true_diff <= paired_t(x, y).ci_high for x, y in zip(a, b, strict=True)]
    assert 0.935 <= np.mean(covered) <= 0.965
    d = a - b
    min_max = (d.min(axis=1) <= true_diff) & (true_diff <= d.max(axis=1))
    assert 0.70 <= min_max.mean() <= 0.80  # 1 - 2 / 2^3
    bootstrap = two_level_bootstrap(a[:1].T, b[:1].T, n_boot=2000)  # 3 seeds x 1 value: the min-max
    assert (bootstrap.ci_low, bootstrap.ci_high) == pytest.approx((d[0].min(), d[0].max()))
    one = paired_t([0.7], [0.6])
    assert one.estimate == pytest.approx(0.1) and math.isnan(one.ci_low) and not one.significant


def test_two_level_bootstrap_keeps_the_item_sampling_when_the_seeds_agree():
    """Three seeds that score the same 40 items alike: a t over seeds says ± 0, the bootstrap over the items
    gives about the Wilson-sized interval of 20/40."""
    a = [[1, 0] * 20] * 3
    b = [[0] * 40] * 3
    assert t_interval([0.5, 0.5, 0.5]).half_width == 0
    d = two_level_bootstrap(a, b, n_boot=2000)
    assert d.estimate == 0.5 and d.method == "two-level bootstrap"
    assert 0.3 < d.ci_low < 0.4 and 0.6 < d.ci_high < 0.7
    with pytest.raises(ValueError):
        paired_t([0.1, 0.2], [0.1])


def test_lab_statistics_pairs_methods_by_seed():
    def trial(seed, k, s, f):
        return {"seed": seed, "test": {"knowledge": sum(k) / len(k), "skill": sum(s) / len(s), "cloze": 0.5},
                "forgetting": f,
                "hits": {"knowledge_test": k, "skill_test": s, "cloze_test": [1, 0]}}

    final = {"lora": [trial(1, [1, 1], [1, 0], 0.3), trial(0, [1, 1], [1, 0], 0.2)],
             "milora": [trial(0, [0, 0], [1, 0], 0.1), trial(1, [0, 0], [1, 0], 0.2)]}
    out = lab_statistics(final, "milora", n_boot=200)
    d = out["differences"]["lora"]
    assert d["knowledge"]["estimate"] == 1.0 and d["knowledge"]["significant"]
    assert d["skill"] == {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "significant": False,
                          "method": "two-level bootstrap"}
    assert d["forgetting"]["estimate"] == pytest.approx(0.1)  # seed 0: 0.2 - 0.1, seed 1: 0.3 - 0.2
    assert d["forgetting"]["ci_low"] == pytest.approx(0.1) and d["forgetting"]["ci_high"] == pytest.approx(0.1)
    assert d["forgetting"]["method"] == "paired t over seeds"  # one value per seed: never a bootstrap's min-max
    assert out["summary"]["lora"]["forgetting"]["mean"] == pytest.approx(0.25)
    knowledge = out["summary"]["lora"]["knowledge"]  # 2 of 2 on both seeds: sd 0, but 2 items say little
    assert knowledge["std"] == 0 and knowledge["items"] == 2
    assert knowledge["wilson_high"] == pytest.approx(1.0) and knowledge["wilson_low"] == pytest.approx(wilson(2, 2)[0])
    assert knowledge["wilson_low"] < 0.4
    with pytest.raises(ValueError, match="different seeds"):
        lab_statistics({**final, "pissa": [trial(5, [1, 1], [1, 1], 0.0), trial(1, [1, 1], [1, 1], 0.0)]}, "milora")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_compare_end_to_end_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "milora.cli", "compare", "--params", str(ROOT / "params.lab.yaml"),
           "--root", str(tmp_path / "shared"), "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "results"),
           "--quick", "--seeds", "0", "1", "--max-parallel", "2", "--threads", "1"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"trials done 9/9 .*ETA", first.stderr)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["trials_total"] == result["trials_run"] == 9  # 3 methods x (2 rates + 1 more seed)
    block = result["by_rank"]["8"]
    for method in ("lora", "pissa", "milora"):
        sel = block["selection"][method]
        assert sel["learning_rate"] in sel["grid"] and len(sel["scores"]) == 2
        assert block["summary"][method]["knowledge"]["n"] == 2
    assert set(block["differences"]) == {"lora", "pissa"}
    assert result["chance"]["knowledge_test"] == 0.25
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "chance 0.25" in (tmp_path / "results.md").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("milora-compare").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 10
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r not in parents} == {parents[0].info.run_id}
    # resumable: a second run reuses every trial
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["trials_run"] == 0
