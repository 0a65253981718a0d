"""The `evaluate` stage: benchmark suites, lm-evaluation-harness tasks, the held-out slice of the training
data (task accuracy, perplexity) and forgetting.

* benchmark suites (`eval.suites`, copied to `data/suites/<name>` by `ingest`): greedy generation judged by
  `milora.judge` (`suites.<name>.accuracy`, `suites_average`), or loss / perplexity for suites without
  gold answers; predictions in `eval/suites/<name>.jsonl`; each suite's content hash in the report. With
  `eval.score_base` every suite is scored on the base first (`suites.<name>.base_accuracy`, `.retained`,
  `.n_base_correct`; `base_prediction`, `base_correct` per example), and `eval.retention_suite`'s `retained`
  is the top-level `retention`;
* lm-eval tasks (`eval.lm_eval`): run in process on the base, then on the fine-tuned model with its adapter
  merged into the weights (what an exported merged model computes): `lm_eval.<task>.<metric>` and the
  deltas over the base, `lm_eval_delta.<task>.<metric>`;
* the held-out slice: math (GSM8K style) and multiple choice (LLM-Adapters style) judged by the same rule,
  multiple choice also by log-likelihood of each option's response; perplexity on the responses;
* forgetting: loss on held-out pretraining text after fine-tuning minus before (the MiLoRA paper's
  "forgetting loss"); 0 for an unchanged model. A base without pretraining text (a GGUF or Hub model) is
  measured on its own sampled replies instead (`models/self_text.jsonl`, `data.self_text`): the NLL increase
  estimates KL(base || tuned) (`self_text_nll_base`, `self_text_nll_tuned`, `self_text_forgetting`), and
  `forgetting` is that increase when there is no held-out text (`forgetting_source` says which).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from milora.core.adapter import load_adapter
from milora.core.errors import InvalidInput, MissingInput
from milora.core.io import atomic_dir, atomic_write_text, dump_json, dump_jsonl, file_digest, read_jsonl
from milora.data.suites import load_suite
from milora.evaluation import harness
from milora.evaluation.suites import SuiteResult, best_response, score_suite, summary, with_base
from milora.model.base import load_base
from milora.model.generate import generate
from milora.model.nll import heldout_loss, mean_loss
from milora.model.precision import autocast, default_device, inference_precision, warn_if_emulated
from milora.model.scoring import answer_kind, extract, judge, option_index
from milora.model.self_text import self_text_loss
from milora.model.tokenize import encode
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths
from milora.pipeline.results import write_metrics

log = logging.getLogger(__name__)

# The numbers of metrics/eval.json (DVC metrics, compared across runs); reports/eval.json has them all.
SUMMARY = ["average_accuracy", "perplexity", "forgetting", "self_text_forgetting", "retention"]
SUITE_SUMMARY = ["accuracy", "perplexity", "loglik_accuracy", "base_accuracy", "retained"]  # of each suite
# Run facts: timings/eval.json, not the byte-reproducible report.
TIMINGS = ["*_seconds", "suites.*.seconds", "suites.*.base_seconds"]

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
    return [best_response(model, tokenizer, row["prompt"], _candidate_responses(row), max_length, batch_size) + 1
            for row in rows]


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
    gen_tasks = [t for t in ("math", "choice", "qa", "generic")
                 if t in tasks and (t != "choice" or ecfg.choice_mode != "loglik")]
    for task in gen_tasks:
        trows = tasks[task]
        t0 = time.perf_counter()
        gens = generate(model, tokenizer, [r["prompt"] for r in trows], ecfg.max_new_tokens, ecfg.batch_size,
                        max_prompt_tokens=max_length)
        metrics[f"{task}_generation_seconds"] = round(time.perf_counter() - t0, 3)
        correct = []
        for r, g in zip(trows, gens, strict=True):
            rec = {"id": r["id"], "task": task, "prediction": g, "answer": r.get("answer", "")}
            if task in ("math", "choice", "qa") and answer_kind(r) != "none":
                rec.update(extracted=extract(r, g), correct=judge(r, g))
                correct.append(rec["correct"])
            preds.append(rec)
        if correct:
            metrics[f"{task}_accuracy"] = sum(correct) / len(correct)
            metrics[f"n_{task}"] = len(correct)
            accs.append(metrics[f"{task}_accuracy"])
    if "choice" in tasks and ecfg.choice_mode in ("loglik", "both"):
        crows = tasks["choice"]
        picks = score_choices_loglik(model, tokenizer, crows, max_length, ecfg.batch_size)
        hits = [p == option_index(r) for p, r in zip(picks, crows, strict=True)]
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


def forgetting_metrics(model: nn.Module, tokenizer: Any, cfg: Config, docs: list[str], before: float | None,
                       sampled: list[dict[str, Any]], self_before: float | None) -> dict[str, Any]:
    """Forgetting of the tuned `model`: on held-out pretraining text and / or on the base's sampled replies,
    given the base's losses on them (`before`, `self_before`)."""
    max_length, batch = cfg.data.max_length, cfg.eval.batch_size
    out: dict[str, Any] = {}
    if self_before is not None:
        after = self_text_loss(model, tokenizer, sampled, max_length, batch)
        out.update(self_text_nll_base=self_before, self_text_nll_tuned=after, self_text_forgetting=after - self_before,
                   forgetting=after - self_before, forgetting_source="self_text")
    if before is not None:
        after = heldout_loss(model, tokenizer, docs, max_length, batch)
        out.update(heldout_loss_base=before, heldout_loss_tuned=after, forgetting=after - before,
                   forgetting_source="heldout_text")
    if not out:
        log.warning("no held-out pretraining text (data.heldout_text) nor sampled base text (data.self_text): "
                    "forgetting not measured")
    return out


def heldout_lines(cfg: Config, paths: Paths, limit: int = 200) -> list[str]:
    """Held-out pretraining documents for the forgetting metric (embedded base, or `data.heldout_text`)."""
    path = Path(cfg.data.heldout_text) if cfg.data.heldout_text else paths.heldout_text
    if not path.exists() or path.stat().st_size == 0:
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:limit]


def load_suites(cfg: Config, paths: Paths, tokenizer: Any) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(name, content hash, records) of each suite of `eval.suites`, from its copy under `data/suites/`."""
    out = []
    for suite in cfg.eval.suites:
        where = paths.suites_dir / suite.name
        if not where.is_dir():
            raise MissingInput(f"{where} not found: run `milora stage ingest` (it copies the eval.suites there)")
        out.append((suite.name, file_digest(where), load_suite(suite, where, tokenizer)))
    return out


def check_retention_suite(cfg: Config, suites: Sequence[tuple[str, str, list[dict[str, Any]]]]) -> None:
    """Fail before any scoring when `eval.retention_suite` has no gold answers (retention needs accuracy)."""
    name = cfg.eval.retention_suite
    records = next((r for n, _, r in suites if n == name), None)
    if records is not None and not any(answer_kind(r) != "none" for r in records):
        raise InvalidInput(f"eval.retention_suite = {name!r}: that suite has no gold answers (it is scored by loss "
                           "only); name a suite with answers, e.g. a qa probe")


def summary_keys(metrics: dict[str, Any]) -> list[str]:
    """The DVC metrics of this run: `SUMMARY`, the suites' accuracy / perplexity (and the base's accuracy,
    retained share and log-likelihood accuracy where measured), the lm-eval metrics."""
    keys = [*SUMMARY, "suites_average"]
    for name, m in metrics.get("suites", {}).items():
        keys += [f"suites.{name}.{k}" for k in SUITE_SUMMARY if k in m]
    for section in ("lm_eval", "lm_eval_delta"):
        for task, values in metrics.get(section, {}).items():
            keys += [f"{section}.{task}.{m}" for m in values if "_stderr" not in m and m != "sample_len"]
    return keys


def run(cfg: Config, paths: Paths) -> None:
    """Evaluate the trained adapter; write metrics/eval.json, eval/predictions.jsonl and eval/suites/.

    Every forward pass (the base's and the fine-tuned model's) runs at `eval.precision` (fp32 unless set; `train`:
    the adapter's training precision), as the registered pyfunc then serves."""
    t0 = time.perf_counter()
    rows = read_jsonl(paths.prepared_dir / "eval.jsonl")
    device = default_device()
    precision = warn_if_emulated(inference_precision(cfg.eval.precision, paths.adapter_dir, device), device)
    model, tokenizer = load_base(cfg, paths)
    model.to(device)
    suites = load_suites(cfg, paths, tokenizer)
    check_retention_suite(cfg, suites)
    with autocast(precision, device):
        metrics, preds, results = _evaluate(cfg, paths, model, tokenizer, rows, suites, device)
    metrics["precision"] = precision
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
    paths.predictions.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.predictions, dump_jsonl(preds))
    with atomic_dir(paths.suite_predictions_dir) as tmp:
        for r in results:
            atomic_write_text(tmp / f"{r.name}.jsonl", dump_jsonl(r.predictions))
    write_metrics(paths, "eval", metrics, summary_keys(metrics), TIMINGS)
    log.info("eval: %s", dump_json({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}).strip())


def _evaluate(cfg: Config, paths: Paths, model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]],
              suites: list[tuple[str, str, list[dict[str, Any]]]], device: str) -> tuple[dict[str, Any], list, list]:
    """The metrics, held-out predictions and suite results of the evaluate stage (the base's forgetting and
    lm-eval references first, then the fine-tuned model)."""
    max_length = cfg.data.max_length
    ecfg, lm = cfg.eval, cfg.eval.lm_eval
    docs = heldout_lines(cfg, paths)
    before = heldout_loss(model, tokenizer, docs, max_length, ecfg.batch_size) if docs else None
    sampled = read_jsonl(paths.self_text) if paths.self_text.is_file() else []
    self_before = self_text_loss(model, tokenizer, sampled, max_length, ecfg.batch_size) if sampled else None
    manager = harness.task_manager(lm.tasks, lm.include_path) if lm.tasks else None
    lm_args = dict(tasks=lm.tasks, num_fewshot=lm.num_fewshot, limit=lm.limit, batch_size=lm.batch_size, manager=manager)
    lm_base = harness.run_lm_eval(model, tokenizer, **lm_args) if lm.tasks else {}

    def score_suites(scored: nn.Module) -> list[SuiteResult]:
        return [score_suite(scored, tokenizer, name, records, suite.max_new_tokens or ecfg.max_new_tokens,
                            ecfg.batch_size, max_length)
                for suite, (name, _, records) in zip(ecfg.suites, suites, strict=True)]

    base_results = score_suites(model) if ecfg.score_base else []  # before the adapter changes the model
    # The residual is rebuilt on the CPU, as the served pyfunc does, so both hold the same weights bit for bit.
    model = load_adapter(model.cpu(), paths.adapter_dir).to(device)
    model.eval()
    metrics, preds = evaluate_model(model, tokenizer, rows, cfg, max_length)
    results = score_suites(model)
    if base_results:
        results = [with_base(tuned, base) for tuned, base in zip(results, base_results, strict=True)]
    metrics.update(summary(results))
    for name, digest, _ in suites:
        metrics["suites"][name]["sha256"] = digest
    if ecfg.retention_suite is not None:
        metrics["retention"] = metrics["suites"][ecfg.retention_suite]["retained"]
    metrics.update(forgetting_metrics(model, tokenizer, cfg, docs, before, sampled, self_before))
    if lm.tasks:
        model.merge_adapter()  # last: the weights of an exported merged model (nothing runs on it after this)
        metrics["lm_eval"] = harness.run_lm_eval(model, tokenizer, **lm_args)
        metrics["lm_eval_delta"] = harness.deltas(metrics["lm_eval"], lm_base)
        metrics["lm_eval_base"] = lm_base
        if lm.include_path:
            metrics["lm_eval_include_sha256"] = file_digest(Path(lm.include_path))
    return metrics, preds, results
