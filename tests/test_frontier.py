"""The forgetting-learning frontier: interpolation at matched learning on known curves, the levels every curve
brackets, the lab's frontier statistics and its plain answer, and per-document forgetting."""

from __future__ import annotations

import math

import pytest

from milora.evaluation.frontier import forgetting_at, matched_levels, matched_range
from milora.evaluation.lab_report import answer, frontier_statistics, lab_statistics
from milora.model.nll import document_nll, heldout_nll

CURVE = [(1e-4, 0.3, 0.01), (3e-4, 0.5, 0.03), (1e-3, 0.9, 0.1), (3e-3, 0.6, 0.5)]  # (lr, learning, forgetting)


def test_forgetting_is_interpolated_where_the_curve_first_reaches_the_level():
    assert forgetting_at(CURVE, 0.7) == pytest.approx(0.03 + 0.07 * 0.5)
    # learning falls again past 1e-3 (too high a rate): the first crossing counts, not the one coming down
    assert forgetting_at(CURVE, 0.55) == pytest.approx(0.03 + 0.07 * 0.05 / 0.4)
    assert forgetting_at(list(reversed(CURVE)), 0.7) == pytest.approx(0.065)  # sorted by rate whatever the order
    assert forgetting_at(CURVE, 0.9) == pytest.approx(0.1) and forgetting_at(CURVE, 0.5) == pytest.approx(0.03)
    assert forgetting_at(CURVE, 0.3) == pytest.approx(0.01)  # exactly the smallest rate's learning


def test_a_level_the_curve_does_not_bracket_has_no_forgetting():
    assert math.isnan(forgetting_at(CURVE, 0.95))  # never reached
    assert math.isnan(forgetting_at(CURVE, 0.2))  # passed already at the smallest rate: a smaller one is unknown
    assert math.isnan(forgetting_at([], 0.5))


def test_matched_levels_lie_where_every_curve_brackets_them():
    a = [(1e-4, 0.3, 0.0), (1e-3, 0.9, 0.1)]
    b = [(1e-4, 0.4, 0.0), (1e-3, 0.8, 0.2)]
    assert matched_range([a, b]) == (0.4, 0.8)
    levels = matched_levels([a, b], n=3)
    assert levels == pytest.approx([0.4 + 0.4 / 3, 0.4 + 0.8 / 3, 0.8]) and levels[-1] == 0.8
    assert all(not math.isnan(forgetting_at(c, lv)) for c in (a, b) for lv in levels)
    assert matched_range([a, [(1e-4, 0.95, 0.0), (1e-3, 0.99, 0.1)]]) is None  # b starts above a's best
    assert matched_levels([a, [(1e-4, 0.95, 0.0)]]) == [] and matched_levels([]) == []


def _grid_trial(method, seed, lr, acc, nll, forgetting):
    return {"method": method, "seed": seed, "learning_rate": lr, "val": {"facts_val": acc}, "val_nll": nll,
            "forgetting": forgetting}


def _grid(scale_lora, noise=(0.0, 0.01, -0.01)):
    """Both methods learn along the same accuracy path (0.25 -> 0.85); LoRA forgets `scale_lora` times what MiLoRA
    forgets at every point, give or take a per-seed wobble."""
    out = []
    for seed, wobble in enumerate(noise):
        for lr, acc, nll, f in [(1e-4, 0.25, 2.0, 0.01), (1e-3, 0.55, 1.2, 0.05), (1e-2, 0.85, 0.5, 0.2)]:
            out.append(_grid_trial("milora", seed, lr, acc, nll, f))
            out.append(_grid_trial("lora", seed, lr, acc + wobble, nll, f * scale_lora + wobble / 10))
    return out


def test_frontier_statistics_pair_the_methods_seed_by_seed_at_each_level():
    fr = frontier_statistics(_grid(2.0), "accuracy", n_levels=2)
    assert fr["seeds"] == [0, 1, 2] and fr["range"] == pytest.approx([0.26, 0.84])
    assert [lv["level"] for lv in fr["levels"]] == pytest.approx([0.55, 0.84])
    top = fr["levels"][1]
    assert top["forgetting"]["milora"]["n"] == 3
    d = top["differences"]["lora"]
    assert d["method"] == "paired t over seeds" and d["significant"] and d["estimate"] > 0.1
    # on the NLL axis the level is reported as an NLL (lower: learnt more)
    nll = frontier_statistics(_grid(2.0), "nll", n_levels=2)
    assert all(0.5 <= lv["level"] <= 2.0 for lv in nll["levels"]) and nll["levels"][0]["level"] > nll["levels"][1]["level"]


def _block(lora_facts, milora_facts, grid):
    def trial(seed, hits, f):
        return {"seed": seed, "test": {"facts": sum(hits) / len(hits), "recall": 0.9, "cloze": 0.9},
                "forgetting": f, "hits": {"facts_test": hits, "recall_test": [1] * 10, "cloze_test": [1] * 10}}

    final = {"lora": [trial(s, lora_facts, 0.2) for s in range(3)],
             "milora": [trial(s, milora_facts, 0.1) for s in range(3)]}
    block = lab_statistics(final, n_boot=500)
    block["frontier"] = {"accuracy": frontier_statistics(grid, "accuracy", n_levels=2)}
    return block


def test_the_answer_claims_learning_parity_only_when_the_interval_shows_it():
    close = _block([1] * 170 + [0] * 30, [1] * 168 + [0] * 32, _grid(2.0))  # 0.85 vs 0.84, 200 items
    text = "\n".join(answer(close))
    assert "MiLoRA learns within 0.05 of it: shown" in text
    far = _block([1] * 17 + [0] * 3, [1] * 15 + [0] * 5, _grid(2.0))  # 0.85 vs 0.75 on 20 items
    assert "within 0.05 of it: not shown" in "\n".join(answer(far))


def test_the_answer_says_forgetting_is_lower_only_where_every_interval_excludes_zero():
    lower = "\n".join(answer(_block([1] * 10, [1] * 10, _grid(2.0))))
    assert "MiLoRA forgets less than lora at every level" in lower
    same = "\n".join(answer(_block([1] * 10, [1] * 10, _grid(1.0, noise=(0.0, 0.02, -0.02)))))
    assert "no difference from lora is shown at any level" in same
    none = _block([1] * 10, [1] * 10, [t for t in _grid(2.0) if not (t["method"] == "lora" and t["learning_rate"] > 1e-4)])
    assert "no matched comparison" in "\n".join(answer(none))


class CharTokenizer:
    """A character-level stand-in for a Hugging Face tokenizer (what `encode_text` calls of one)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 120 for c in text]}


def test_document_nll_is_one_mean_per_document_consistent_with_the_token_weighted_mean(llama):
    docs = ["a short one", "a much longer document that the chunker splits into several pieces " * 2, "mid size doc"]
    per_doc = document_nll(llama, CharTokenizer(), docs, max_length=24, batch_size=2)
    assert len(per_doc) == 3 and all(x > 0 for x in per_doc)
    tokens = [len(d) for d in docs]  # every character is predicted once (after its chunk's BOS)
    mean, count = heldout_nll(llama, CharTokenizer(), docs, max_length=24, batch_size=2)
    assert count == sum(tokens)
    assert sum(x * n for x, n in zip(per_doc, tokens, strict=True)) / sum(tokens) == pytest.approx(mean, rel=1e-5)
    assert document_nll(llama, CharTokenizer(), docs[:1], 24) == pytest.approx(per_doc[:1], rel=1e-5)


def test_the_answer_names_the_others_differences_when_milora_learns_most():
    text = "\n".join(answer(_block([1] * 15 + [0] * 5, [1] * 18 + [0] * 2, _grid(2.0))))
    assert "MiLoRA has the highest facts test accuracy (0.900; lora − milora -0.150 [" in text
