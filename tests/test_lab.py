"""The comparison lab: the new people are absent from the corpus and the corpus world from the fine-tuning files,
validation and test ask in forms never trained, learning rates are selected on learning validation only, the
statistics agree with known cases, and `milora compare --quick` runs end to end."""

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

from milora.cli.compare import default_grid, edge_extension, parse_grid, rate_scores, select_learning_rate
from milora.core.errors import InvalidInput
from milora.data import lab
from milora.evaluation.lab_report import NOTES_MARK, lab_statistics, validation_score, with_kept_notes
from milora.evaluation.stats import paired_t, t_interval, two_level_bootstrap, wilson
from milora.pipeline.config import load_config
from milora.stages.ingest import materialise

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- data: no leak of held-out facts


@pytest.fixture(scope="module")
def lab_files(tmp_path_factory):
    """The fine-tuning files the ingest stage writes for params.lab.yaml, as text."""
    out = tmp_path_factory.mktemp("raw")
    assert materialise(load_config(ROOT / "params.lab.yaml"), out) == 1
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(out.glob("*.jsonl"))}


def test_fine_tuning_never_names_the_corpus_world_and_never_asks_the_eval_forms(lab_files):
    assert set(lab_files) == {"facts.jsonl"}
    rows = [json.loads(line) for line in lab_files["facts.jsonl"].splitlines()]
    n_facts = lab.NEW_PEOPLE * len(lab.NEW_ATTRS)
    assert len(rows) == n_facts * len(lab.TRAIN_FORMS) * lab.TRAIN_ORDERS
    text = "\n".join(lab_files.values())
    words = set(re.findall(r"[A-Za-z]+", text))
    corpus_names = {p.name for p in lab.LAB_WORLD.people} | set(lab.LAB_WORLD.countries)
    corpus_names |= {k for _, k in lab.LAB_WORLD.capitals}
    assert not words & corpus_names  # retention is measured on what fine-tuning never touches
    for held in lab.held_out_strings():
        assert held not in text, held  # no corpus name, no validation or test question form
    # every new fact is taught, as its sentence
    assert all(f.stem.replace("_", f.answer) in text for f in lab.new_facts())


def test_new_people_are_absent_from_the_pretraining_corpus():
    docs, heldout = lab.pretraining_corpus("lab", 3000, 100)
    text = "\n".join(docs + heldout)
    corpus_names = tuple(p.name for p in lab.LAB_WORLD.people) + lab.LAB_WORLD.countries
    people = lab.new_people()
    assert len({p.name for p in people}) == lab.NEW_PEOPLE
    for p in people:
        assert p.name not in text and not p.name.startswith(corpus_names), p.name
    assert not re.search(r"\b(even|odd)\b", text) and "Answer the question:" not in text and "Choices:" not in text


def test_validation_and_test_ask_every_new_fact_in_their_own_form_with_fresh_option_orders():
    sets = lab.eval_sets()
    val, test = sets["facts_val"], sets["facts_test"]
    assert [r["fact"] for r in val] == [r["fact"] for r in test] == [f.key for f in lab.new_facts()]
    trained = {json.dumps(r["instruction"]) for r in lab.facts_train_rows()}
    same_order = 0
    for v, t, fact in zip(val, test, lab.new_facts(), strict=True):
        assert v["options"][v["answer"]] == t["options"][t["answer"]] == f" {fact.answer}."
        assert len(v["options"]) == lab.N_OPTIONS and len(set(v["options"])) == lab.N_OPTIONS
        assert v["prompt"].endswith("### Response:\n" + lab.stem_prefix(fact))
        question = v["prompt"].split("### Instruction:\n", 1)[1].split("\n\n### Response", 1)[0]
        assert json.dumps(question) not in trained
        same_order += v["options"] == t["options"]
    assert same_order < len(val) / 4  # option orders are drawn afresh
    # the gold answer sits in every position, about equally often: a position bias is worth nothing
    positions = [sum(r["answer"] == k for r in val + test) for k in range(lab.N_OPTIONS)]
    assert min(positions) > len(val + test) / lab.N_OPTIONS / 2


def test_retention_asks_the_corpus_facts_as_questions_and_as_cloze():
    sets = lab.eval_sets()
    recall, cloze = sets["recall_test"], sets["cloze_test"]
    assert len(recall) == len(lab.corpus_facts()) > 250
    for q, c in zip(recall, cloze, strict=True):
        assert c["raw"] and not q["raw"] and c["answer"] == q["answer"]
        assert c["options"] == q["options"] and q["prompt"].endswith("### Response:\n" + c["prompt"])
        assert "### Instruction" not in c["prompt"] and c["fact"].split(":", 1)[1] in c["prompt"]


def test_the_lab_corpus_states_the_corpus_facts_and_only_arithmetic_instructions():
    docs, heldout = lab.pretraining_corpus("lab", 3000, 100)
    text = "\n".join(docs)
    assert sum("### Instruction:" in d for d in docs) > 100  # the prompt template, on arithmetic only
    assert all(re.search(r"### Instruction:\nCompute \d+ [+-] \d+\.", d) for d in docs if "### Instruction" in d)
    assert all(p.name in text for p in lab.LAB_WORLD.people)  # what retention asks was taught by pretraining
    assert not set(heldout) & set(docs)


# ----------------------------------------------------------------------------- selection on validation only


def _trial(lr, val, test, seed=0):
    return {"learning_rate": lr, "seed": seed, "val": {"facts_val": val},
            "test": {"facts": test, "recall": test, "cloze": test}}


def test_learning_rate_selection_follows_validation_not_test():
    trials = [_trial(1e-3, 0.9, 0.2), _trial(3e-3, 0.5, 0.95), _trial(1e-2, 0.6, 0.9)]
    assert select_learning_rate(trials) == 1e-3  # the test split would pick 3e-3
    # and flipping the test numbers (learning and retention alike) changes nothing
    flipped = [{**t, "test": {k: 1 - v for k, v in t["test"].items()}} for t in trials]
    assert select_learning_rate(flipped) == 1e-3


def test_selection_averages_each_rate_over_the_grid_seeds_and_breaks_ties_low():
    # seed 0 alone would pick 1e-3; over both seeds 3e-3 is better (0.75 vs 0.6)
    trials = [_trial(1e-3, 0.9, 0, 0), _trial(1e-3, 0.3, 0, 1), _trial(3e-3, 0.8, 0, 0), _trial(3e-3, 0.7, 0, 1)]
    assert validation_score(trials[0]) == 0.9
    assert rate_scores(trials) == {1e-3: pytest.approx(0.6), 3e-3: pytest.approx(0.75)}
    assert select_learning_rate(trials) == 3e-3
    assert select_learning_rate([_trial(3e-2, 0.5, 0), _trial(1e-3, 0.5, 0)]) == 1e-3


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
    def trial(seed, k, r, f):
        return {"seed": seed, "test": {"facts": sum(k) / len(k), "recall": sum(r) / len(r), "cloze": 0.5},
                "forgetting": f,
                "hits": {"facts_test": k, "recall_test": r, "cloze_test": [1, 0]}}

    final = {"lora": [trial(1, [1, 1], [1, 0], 0.3), trial(0, [1, 1], [1, 0], 0.2)],
             "milora": [trial(0, [0, 0], [1, 0], 0.1), trial(1, [0, 0], [1, 0], 0.2)]}
    out = lab_statistics(final, "milora", n_boot=200)
    d = out["differences"]["lora"]
    assert d["facts"]["estimate"] == 1.0 and d["facts"]["significant"]
    assert d["recall"] == {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0, "significant": False,
                           "method": "two-level bootstrap"}
    assert d["forgetting"]["estimate"] == pytest.approx(0.1)  # seed 0: 0.2 - 0.1, seed 1: 0.3 - 0.2
    assert d["forgetting"]["ci_low"] == pytest.approx(0.1) and d["forgetting"]["ci_high"] == pytest.approx(0.1)
    assert d["forgetting"]["method"] == "paired t over seeds"  # one value per seed: never a bootstrap's min-max
    assert out["summary"]["lora"]["forgetting"]["mean"] == pytest.approx(0.25)
    facts = out["summary"]["lora"]["facts"]  # 2 of 2 on both seeds: sd 0, but 2 items say little
    assert facts["std"] == 0 and facts["items"] == 2
    assert facts["wilson_high"] == pytest.approx(1.0) and facts["wilson_low"] == pytest.approx(wilson(2, 2)[0])
    assert facts["wilson_low"] < 0.4
    with pytest.raises(ValueError, match="different seeds"):
        lab_statistics({**final, "pissa": [trial(5, [1, 1], [1, 1], 0.0), trial(1, [1, 1], [1, 1], 0.0)]}, "milora")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_compare_end_to_end_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "milora.cli", "compare", "--params", str(ROOT / "params.lab.yaml"),
           "--root", str(tmp_path / "shared"), "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "results"),
           "--quick", "--seeds", "0", "1", "--grid-seeds", "1", "--max-parallel", "2", "--threads", "1"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"trials done 9/9 .*ETA", first.stderr)
    assert first.stdout.startswith("# Does MiLoRA learn as much") and "'loss'" not in first.stdout  # the report alone
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["trials_total"] == result["trials_run"] == 9  # 3 methods x (2 rates + 1 more seed)
    block = result["by_rank"]["8"]
    for method in ("lora", "pissa", "milora"):
        sel = block["selection"][method]
        assert sel["learning_rate"] in sel["grid"] and len(sel["scores"]) == 2
        assert block["summary"][method]["facts"]["n"] == 2
    assert set(block["differences"]) == {"lora", "pissa"}
    assert set(block["frontier"]) == {"accuracy", "nll"} and block["frontier"]["accuracy"]["seeds"] == [0]
    assert result["chance"]["facts_test"] == 0.25 and result["grid_seeds"] == [0]
    assert {"facts_val", "facts_test", "recall_test", "cloze_test", "val_nll"} <= set(result["base"])
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "results.md").read_text()
    assert "chance 0.25" in report and "The answer:" in report and "Forgetting at matched validation accuracy" in report
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
