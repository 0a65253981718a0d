"""Scoring a model on benchmark suites: greedy generation (as the served model generates) judged by
`milora.judge`, or, for suites without gold answers (alpaca, chat), the loss on their responses.

Metrics: `suites.<name>.accuracy` and `.n` (plus `.seconds`), or `.loss`, `.perplexity` and `.n` for
loss-only suites; `suites_average` is the mean accuracy over the suites that report one. Open questions
with candidate `options` (`qa`) also get `.loglik_accuracy` and `.n_loglik`: the option whose text, as the
whole reply, has the highest length-normalised log-likelihood is right when it contains an alias. Predictions: one row per example, `id`,
`prompt`, `prediction`, `answer`, `extracted`, `correct` (and `loglik_pick`, `loglik_correct`; loss-only
suites: `id`, `prompt`, `loss`, `tokens`).

`with_base` puts the base model's result beside the tuned one's: `.base_accuracy`, `.n_base_correct` and
`.retained`, the share of the examples the base got right that the tuned model still gets right (1.0 when
the base got none right: nothing was there to lose), and per example `base_prediction`, `base_correct`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from milora.model.generate import batches, generate
from milora.model.nll import sequence_nll
from milora.model.scoring import aliases_of, answer_kind, extract, gold_option, judge
from milora.model.tokenize import encode

log = logging.getLogger(__name__)


@dataclass
class SuiteResult:
    """One suite's numbers and per-example predictions."""

    name: str
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def _progress(total: int, name: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"suite {name}", unit="ex", disable=None, leave=False)


def generate_all(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                 max_length: int | None, name: str) -> list[str]:
    """Greedy generations for `prompts`, batch by batch (the same batches as one `generate` call), with a
    progress bar named after the suite."""
    out: list[str] = []
    with _progress(len(prompts), name) as bar:
        for chunk in batches(list(prompts), batch_size):
            out.extend(generate(model, tokenizer, chunk, max_new_tokens, batch_size, max_prompt_tokens=max_length))
            bar.update(len(chunk))
    return out


def best_response(model: nn.Module, tokenizer: Any, prompt: str, candidates: Sequence[str], max_length: int,
                  batch_size: int = 16) -> int:
    """0-based index of the candidate response with the highest length-normalised log-likelihood (the lowest
    mean token NLL, EOS included) after `prompt`."""
    enc = [encode(tokenizer, prompt, c, max_length) for c in candidates]
    scores = torch.cat([sequence_nll(model, list(ch)) for ch in batches(enc, batch_size)])
    return int(torch.argmin(scores[:, 0] / scores[:, 1].clamp(min=1)).item())


def score_accuracy(model: nn.Module, tokenizer: Any, name: str, records: Sequence[dict[str, Any]],
                   max_new_tokens: int, batch_size: int, max_length: int) -> SuiteResult:
    """Generate an answer for every record with a gold answer and judge it (and pick the likeliest option of
    an open question with `options`)."""
    t0 = time.perf_counter()
    gens = generate_all(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size, max_length, name)
    preds = []
    for r, g in zip(records, gens, strict=True):
        preds.append({"id": r["id"], "prompt": r["prompt"], "prediction": g, "answer": r["answer"],
                      "extracted": extract(r, g), "correct": judge(r, g)})
    n = len(preds)
    metrics = {"accuracy": sum(p["correct"] for p in preds) / n if n else 0.0, "n": n}
    chosen = [(r, p) for r, p in zip(records, preds, strict=True) if answer_kind(r) == "qa" and r.get("options")]
    for r, p in chosen:
        pick = best_response(model, tokenizer, r["prompt"], r["options"], max_length, batch_size)
        p.update(loglik_pick=r["options"][pick], loglik_correct=pick == gold_option(r["options"], aliases_of(r)))
    if chosen:
        metrics.update(loglik_accuracy=sum(p["loglik_correct"] for _, p in chosen) / len(chosen), n_loglik=len(chosen))
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    return SuiteResult(name, metrics, preds)


def score_loss(model: nn.Module, tokenizer: Any, name: str, records: Sequence[dict[str, Any]], batch_size: int,
               max_length: int) -> SuiteResult:
    """Token-weighted loss and perplexity on the responses of records without gold answers."""
    t0 = time.perf_counter()
    rows = [r for r in records if r.get("response")]
    preds: list[dict[str, Any]] = []
    total = count = 0.0
    with _progress(len(rows), name) as bar:
        for chunk in batches(rows, batch_size):
            nll = sequence_nll(model, [encode(tokenizer, r["prompt"], r["response"], max_length) for r in chunk])
            for r, (s, k) in zip(chunk, nll.tolist(), strict=True):
                preds.append({"id": r["id"], "prompt": r["prompt"], "loss": s / max(k, 1), "tokens": int(k)})
                total, count = total + s, count + k
            bar.update(len(chunk))
    loss = total / max(count, 1)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(preds),
               "seconds": round(time.perf_counter() - t0, 3)}
    return SuiteResult(name, metrics, preds)


def score_suite(model: nn.Module, tokenizer: Any, name: str, records: Sequence[dict[str, Any]], max_new_tokens: int,
                batch_size: int, max_length: int) -> SuiteResult:
    """Accuracy when the suite's records have gold answers (those without one are left out), else loss."""
    model.eval()
    judged = [r for r in records if answer_kind(r) != "none"]
    if judged:
        result = score_accuracy(model, tokenizer, name, judged, max_new_tokens, batch_size, max_length)
    else:
        result = score_loss(model, tokenizer, name, records, batch_size, max_length)
    log.info("suite %s: %s", name, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in result.metrics.items()))
    return result


def with_base(tuned: SuiteResult, base: SuiteResult) -> SuiteResult:
    """`tuned` with the base model's result on the same records beside it: `base_accuracy`, `n_base_correct`,
    `retained` (and `base_loglik_accuracy`), or `base_loss` and `base_perplexity` for a loss-only suite; each
    prediction gets the base's (`base_prediction`, `base_correct`, `base_loglik_correct` or `base_loss`)."""
    if [p["id"] for p in tuned.predictions] != [p["id"] for p in base.predictions]:
        raise ValueError(f"suite {tuned.name}: the base and the tuned model were scored on different examples")
    m, b = tuned.metrics, base.metrics
    if "accuracy" in m:
        kept = sum(p["correct"] and q["correct"] for p, q in zip(tuned.predictions, base.predictions, strict=True))
        n_base = sum(q["correct"] for q in base.predictions)
        m.update(base_accuracy=b["accuracy"], n_base_correct=n_base, retained=kept / n_base if n_base else 1.0)
        if "loglik_accuracy" in b:
            m["base_loglik_accuracy"] = b["loglik_accuracy"]
        fields = {"prediction": "base_prediction", "correct": "base_correct", "loglik_correct": "base_loglik_correct"}
    else:
        m.update(base_loss=b["loss"], base_perplexity=b["perplexity"])
        fields = {"loss": "base_loss"}
    for p, q in zip(tuned.predictions, base.predictions, strict=True):
        p.update({new: q[old] for old, new in fields.items() if old in q})
    m["base_seconds"] = b["seconds"]
    return tuned


def summary(results: Sequence[SuiteResult]) -> dict[str, Any]:
    """`{"suites": {name: metrics}, "suites_average": mean accuracy}` (no average when no suite has accuracy)."""
    out: dict[str, Any] = {"suites": {r.name: r.metrics for r in results}}
    accs = [r.metrics["accuracy"] for r in results if "accuracy" in r.metrics]
    if accs:
        out["suites_average"] = sum(accs) / len(accs)
    return out
