"""Scoring of the comparison lab (`milora.data.lab`): log-likelihood multiple choice and forgetting.

A row's pick is the option whose continuation has the lowest mean token NLL after the row's prompt. Prompted
rows are scored as the fine-tuning data is trained (the response, then EOS); plain-text rows (the cloze) score
the continuation only. Chance is 1 / (number of options).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from milora.model.generate import batches
from milora.model.nll import sequence_nll
from milora.model.tokenize import encode


def _encoded(tokenizer: Any, row: Mapping[str, Any], option: str, max_length: int) -> dict[str, list[int]]:
    e = encode(tokenizer, row["prompt"], option, max_length)
    out = {k: list(e[k]) for k in ("input_ids", "attention_mask", "labels")}
    if row.get("raw"):
        out["labels"][-1] = -100  # the EOS `encode` appends: a cloze continues the text, it does not end it
    return out


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], max_length: int = 256,
                  batch_size: int = 32) -> tuple[list[int], list[float]]:
    """Per row: 1 where the lowest-mean-NLL option is its `answer` (an index into `options`), else 0; and the
    gold option's mean token NLL (how sure the model is of the right answer, not only whether it ranks first)."""
    model.eval()
    flat = [(i, _encoded(tokenizer, r, o, max_length)) for i, r in enumerate(rows) for o in r["options"]]
    scores: list[float] = []
    for chunk in batches([e for _, e in flat], batch_size):
        nll = sequence_nll(model, list(chunk))
        scores.extend((nll[:, 0] / nll[:, 1].clamp(min=1)).tolist())
    hits, gold, pos = [], [], 0
    for r in rows:
        k = len(r["options"])
        mine = scores[pos: pos + k]
        pos += k
        hits.append(int(min(range(k), key=mine.__getitem__) == r["answer"]))
        gold.append(mine[r["answer"]])
    return hits, gold


def chance(rows: Sequence[Mapping[str, Any]]) -> float:
    """Expected accuracy of a uniform random pick: the mean of 1 / options."""
    return sum(1 / len(r["options"]) for r in rows) / len(rows)


def score_sets(model: nn.Module, tokenizer: Any, sets: Mapping[str, Sequence[Mapping[str, Any]]],
               max_length: int = 256, batch_size: int = 32) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Per-example hits and gold-option NLLs of the model on every named set."""
    hits, gold = {}, {}
    for name, rows in sets.items():
        hits[name], gold[name] = choice_scores(model, tokenizer, rows, max_length, batch_size)
    return hits, gold


def evaluate_trial(model: nn.Module, tokenizer: Any, adapter_dir: Any, sets: Mapping[str, Sequence[Mapping[str, Any]]],
                   heldout: Sequence[str], max_length: int = 256, batch_size: int = 32,
                   score_base: bool = False) -> dict[str, Any]:
    """Score the model with the trained adapter at `adapter_dir` on top of the base `model`: per-example hits and
    gold-option NLLs on every set, and forgetting per held-out pretraining document (its mean token NLL after
    minus before; `forgetting` is their mean over documents); with `score_base`, the base's hits and NLLs on every
    set too (`hits_before`, `gold_nll_before`; the same for every trial on one base, so scored once)."""
    from milora.core.adapter import load_adapter
    from milora.model.nll import document_nll

    before = document_nll(model, tokenizer, list(heldout), max_length, batch_size)
    hits_before, gold_before = score_sets(model, tokenizer, sets, max_length, batch_size) if score_base else ({}, {})
    tuned = load_adapter(model, adapter_dir)
    tuned.eval()
    hits, gold = score_sets(tuned, tokenizer, sets, max_length, batch_size)
    after = document_nll(tuned, tokenizer, list(heldout), max_length, batch_size)
    per_doc = [a - b for a, b in zip(after, before, strict=True)]
    return {"hits": hits, "gold_nll": gold, "hits_before": hits_before, "gold_nll_before": gold_before,
            "heldout_nll_base": sum(before) / len(before), "forgetting_docs": per_doc,
            "forgetting": sum(per_doc) / len(per_doc)}
