"""The `evaluate` stage: task accuracy (math, multiple choice), perplexity and forgetting.

* math (GSM8K style): greedy generation, final-number extraction, exact match;
* multiple choice (LLM-Adapters style): answer extraction from the generation, and log-likelihood
  scoring of each option's response;
* perplexity on the eval split's responses;
* forgetting: loss on held-out pretraining text after fine-tuning minus before (the MiLoRA paper's
  "forgetting loss"); 0 for an unchanged model.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from milora.core.adapter import load_adapter
from milora.core.io import atomic_write_text, dump_json, dump_jsonl, read_jsonl
from milora.model.base import load_base
from milora.model.generate import batches, generate
from milora.model.nll import heldout_loss, mean_loss, sequence_nll
from milora.model.scoring import extract_choice, extract_number, gold_choice, parse_number
from milora.model.tokenize import encode
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths
from milora.pipeline.results import write_metrics

log = logging.getLogger(__name__)

# The numbers of metrics/eval.json (DVC metrics, compared across runs); reports/eval.json has them all.
SUMMARY = ["average_accuracy", "math_accuracy", "choice_accuracy", "perplexity", "forgetting"]
# Run facts: timings/eval.json, not the byte-reproducible report.
TIMINGS = ["*_seconds"]

# ----------------------------------------------------------------------------- answer extraction

















# ----------------------------------------------------------------------------- model scoring


















def _candidate_responses(row: dict[str, Any]) -> list[str]:
    """The response text each option would have, for log-likelihood scoring."""
    n = int(row.get("n_options") or 0)
    answer, response = row.get("answer", ""), row.get("response", "")
    label = re.match(r"([A-Za-z_]+?)(\d+)$", answer or "")
    if label and answer in response:
        return [response.replace(answer, f"{label.group(1)}{k}") for k in range(1, n + 1)]
    options = row.get("options") or []
    if len(options) == n and n:
        return list(options)
    raise ValueError(f"row {row.get('id')}: cannot build option candidates for log-likelihood scoring")


def score_choices_loglik(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]],
                         max_length: int, batch_size: int = 16) -> list[int]:
    """1-based option picked by the highest length-normalised log-likelihood of each option's response."""
    picks = []
    for row in rows:
        cands = _candidate_responses(row)
        enc = [encode(tokenizer, row["prompt"], c, max_length) for c in cands]
        scores = torch.cat([sequence_nll(model, list(ch)) for ch in batches(enc, batch_size)])
        mean_nll = scores[:, 0] / scores[:, 1].clamp(min=1)
        picks.append(int(torch.argmin(mean_nll).item()) + 1)
    return picks


# ----------------------------------------------------------------------------- the stage


def _per_task(rows: list[dict[str, Any]], cap: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        bucket = out.setdefault(r.get("task", "generic"), [])
        if len(bucket) < cap:
            bucket.append(r)
    return out


def evaluate_model(model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], cfg: Config,
                   max_length: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Task metrics and per-example predictions of one model on the eval rows."""
    model.eval()
    ecfg = cfg.eval
    tasks = _per_task(rows, ecfg.max_examples)
    metrics: dict[str, float] = {}
    preds: list[dict[str, Any]] = []
    accs: list[float] = []
    gen_tasks = [t for t in ("math", "choice", "generic") if t in tasks and (t != "choice" or ecfg.choice_mode != "loglik")]
    for task in gen_tasks:
        trows = tasks[task]
        t0 = time.perf_counter()
        gens = generate(model, tokenizer, [r["prompt"] for r in trows], ecfg.max_new_tokens, ecfg.batch_size,
                        max_prompt_tokens=max_length)
        metrics[f"{task}_generation_seconds"] = round(time.perf_counter() - t0, 3)
        correct = []
        for r, g in zip(trows, gens, strict=True):
            rec = {"id": r["id"], "task": task, "prediction": g, "answer": r.get("answer", "")}
            if task == "math":
                got, gold = extract_number(g), parse_number(str(r.get("answer", "")))
                ok = got is not None and gold is not None and math.isclose(got, gold, rel_tol=0, abs_tol=1e-6)
                rec.update(extracted=got, correct=ok)
                correct.append(ok)
            elif task == "choice":
                got, gold = extract_choice(g, int(r["n_options"])), gold_choice(r["answer"])
                rec.update(extracted=got, correct=got is not None and got == gold)
                correct.append(rec["correct"])
            preds.append(rec)
        if correct:
            metrics[f"{task}_accuracy"] = sum(correct) / len(correct)
            metrics[f"n_{task}"] = len(correct)
            accs.append(metrics[f"{task}_accuracy"])
    if "choice" in tasks and ecfg.choice_mode in ("loglik", "both"):
        crows = tasks["choice"]
        picks = score_choices_loglik(model, tokenizer, crows, max_length, ecfg.batch_size)
        hits = [p == gold_choice(r["answer"]) for p, r in zip(picks, crows, strict=True)]
        metrics["choice_accuracy_loglik"] = sum(hits) / len(hits)
        metrics["n_choice"] = len(hits)
        if ecfg.choice_mode == "loglik":
            accs.append(metrics["choice_accuracy_loglik"])
        by_id = {p["id"]: p for p in preds if p["task"] == "choice"}
        for r, pick, ok in zip(crows, picks, hits, strict=True):
            rec = by_id.get(r["id"])
            if rec is None:
                rec = {"id": r["id"], "task": "choice", "answer": r["answer"]}
                preds.append(rec)
            rec.update(loglik_pick=pick, loglik_correct=ok)
    if accs:
        metrics["average_accuracy"] = sum(accs) / len(accs)
    encoded = [encode(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
    loss = mean_loss(model, encoded, ecfg.batch_size)
    metrics["eval_loss"] = loss
    metrics["perplexity"] = math.exp(min(loss, 50.0))
    return metrics, preds


def heldout_lines(cfg: Config, paths: Paths, limit: int = 200) -> list[str]:
    """Held-out pretraining documents for the forgetting metric (embedded base, or `data.heldout_text`)."""
    path = Path(cfg.data.heldout_text) if cfg.data.heldout_text else paths.heldout_text
    if not path.exists() or path.stat().st_size == 0:
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:limit]


def run(cfg: Config, paths: Paths) -> None:
    """Evaluate the trained adapter; write metrics/eval.json and eval/predictions.jsonl."""
    t0 = time.perf_counter()
    rows = read_jsonl(paths.prepared_dir / "eval.jsonl")
    model, tokenizer = load_base(cfg, paths)
    max_length = cfg.data.max_length
    docs = heldout_lines(cfg, paths)
    before = heldout_loss(model, tokenizer, docs, max_length, cfg.eval.batch_size) if docs else None
    model = load_adapter(model, paths.adapter_dir)
    model.eval()
    metrics, preds = evaluate_model(model, tokenizer, rows, cfg, max_length)
    if before is not None:
        after = heldout_loss(model, tokenizer, docs, max_length, cfg.eval.batch_size)
        metrics.update(heldout_loss_base=before, heldout_loss_tuned=after, forgetting=after - before)
    else:
        log.warning("no held-out pretraining text (set data.heldout_text): forgetting not measured")
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
    paths.predictions.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.predictions, dump_jsonl(preds))
    write_metrics(paths, "eval", metrics, SUMMARY, TIMINGS)
    log.info("eval: %s", dump_json({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}).strip())
