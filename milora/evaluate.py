"""The `evaluate` stage: task accuracy (math, multiple choice), perplexity and forgetting.

* math (GSM8K style): greedy generation, final-number extraction, exact match;
* multiple choice (LLM-Adapters style): answer extraction from the generation, and log-likelihood
  scoring of each option's response;
* perplexity on the eval split's responses;
* forgetting: loss on held-out pretraining text after fine-tuning minus before (the MiLoRA paper's
  "forgetting loss"); 0 for an unchanged model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- answer extraction

_NUM = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?"
_NUM_RE = re.compile(_NUM)
_ANSWER_CUES = re.compile(r"(?:####|answer\s*(?:is|:|=)|answer\s+would\s+be|result\s+is|total\s+is)", re.I)


def _parse_number(token: str) -> float | None:
    t = token.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    if "/" in t:
        num, den = t.split("/", 1)
        try:
            frac = Fraction(num) / Fraction(den)
        except (ValueError, ZeroDivisionError):
            return None
        return float(frac)
    try:
        return float(t)
    except ValueError:
        return None


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUM_RE.finditer(text):
        tok = m.group(0)
        end = m.end()
        # a date-like a/b/c or a version-like 1.2.3 is not a number we can trust
        if end < len(text) and text[end] in "/" and "/" in tok:
            continue
        out.append(tok)
    return out


def extract_number(text: str) -> float | None:
    """The final numeric answer of a generated math solution (GSM8K conventions), or None."""
    if not text:
        return None
    cues = list(_ANSWER_CUES.finditer(text))
    if cues:
        tail = text[cues[-1].end():]
        nums = _numbers(tail)
        if nums:
            return _parse_number(nums[0])
    nums = _numbers(text)
    return _parse_number(nums[-1]) if nums else None


_CHOICE_RE = re.compile(r"\b(?:option|answer|solution|ending|choice)\s*#?\s*(\d+)\b", re.I)
_LETTER_RE = re.compile(r"(?:answer\s*(?:is|:)\s*\(?|^\(?)([A-Ea-e])(?:\)|\.|\b)", re.I)
_BOOL_RE = re.compile(r"\b(true|false)\b", re.I)


def extract_choice(text: str, n_options: int) -> int | None:
    """The 1-based option a generated multiple-choice answer picks (LLM-Adapters style), or None."""
    if not text or n_options < 1:
        return None
    cue = re.search(r"correct\s+answer\s+is|answer\s+is|answer\s*:", text, re.I)
    region = text[cue.start():] if cue else text
    m = _CHOICE_RE.search(region) or (_CHOICE_RE.search(text) if cue else None)
    if m:
        k = int(m.group(1))
        return k if 1 <= k <= n_options else None
    if n_options == 2:
        b = _BOOL_RE.search(region)
        if b:
            return 1 if b.group(1).lower() == "true" else 2
    letter = _LETTER_RE.search(region.strip())
    if letter:
        k = ord(letter.group(1).upper()) - ord("A") + 1
        return k if 1 <= k <= n_options else None
    return None


def gold_choice(answer: str) -> int | None:
    """The 1-based option index of a gold label like `option2`, `answer3`, `true`/`false`."""
    return extract_choice(f"the correct answer is {answer}", max(2, _max_index(answer)))


def _max_index(answer: str) -> int:
    m = re.search(r"(\d+)", answer or "")
    return int(m.group(1)) if m else 2


# ----------------------------------------------------------------------------- model scoring


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 16, max_prompt_tokens: int | None = None) -> list[str]:
    """Greedy, batched generation with the KV cache; returns only the new text of each prompt."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for chunk in _batches(list(prompts), batch_size):
            enc = tokenizer(list(chunk), return_tensors="pt", padding=True, add_special_tokens=True,
                            truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outputs


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


@torch.no_grad()
def sequence_nll(model: nn.Module, batch: list[dict[str, list[int]]]) -> torch.Tensor:
    """Summed NLL and token count of the labelled tokens of each encoded example: (n, 2)."""
    device = next(model.parameters()).device
    ids = _pad([b["input_ids"] for b in batch], 0).to(device)
    mask = _pad([b["attention_mask"] for b in batch], 0).to(device)
    labels = _pad([b["labels"] for b in batch], -100).to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(tok * valid).sum(-1)
    return torch.stack([nll, valid.sum(-1).float()], dim=-1).cpu()


def mean_loss(model: nn.Module, encoded: list[dict[str, list[int]]], batch_size: int = 16) -> float:
    """Token-weighted mean NLL over encoded examples."""
    total, count = 0.0, 0.0
    for chunk in _batches(encoded, batch_size):
        r = sequence_nll(model, list(chunk))
        total += r[:, 0].sum().item()
        count += r[:, 1].sum().item()
    return total / max(count, 1.0)


def encode_text(tokenizer: Any, text: str, max_length: int) -> list[dict[str, list[int]]]:
    """Chunks of plain text encoded for a language-modelling loss on every token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = max_length - len(bos)
    out = []
    for i in range(0, len(ids), step):
        chunk = bos + ids[i: i + step]
        if len(chunk) > 1:
            out.append({"input_ids": chunk, "attention_mask": [1] * len(chunk), "labels": chunk})
    return out


def heldout_loss(model: nn.Module, tokenizer: Any, lines: Sequence[str], max_length: int,
                 batch_size: int = 16) -> float:
    """Mean token NLL of the model on held-out text documents."""
    encoded = [e for line in lines for e in encode_text(tokenizer, line, max_length)]
    if not encoded:
        raise ValueError("held-out text is empty: nothing to measure forgetting on")
    return mean_loss(model, encoded, batch_size)


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
    from milora.data import encode

    picks = []
    for row in rows:
        cands = _candidate_responses(row)
        enc = [encode(tokenizer, row["prompt"], c, max_length) for c in cands]
        scores = torch.cat([sequence_nll(model, list(ch)) for ch in _batches(enc, batch_size)])
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


def evaluate_model(model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], cfg: Any,
                   max_length: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Task metrics and per-example predictions of one model on the eval rows."""
    from milora.data import encode

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
                got, gold = extract_number(g), _parse_number(str(r.get("answer", "")))
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


def heldout_lines(cfg: Any, paths: Any, limit: int = 200) -> list[str]:
    """Held-out pretraining documents for the forgetting metric (embedded base, or `data.heldout_text`)."""
    path = Path(cfg.data.heldout_text) if cfg.data.heldout_text else paths.heldout_text
    if not path.exists() or path.stat().st_size == 0:
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:limit]


def evaluate_stage(cfg: Any, paths: Any) -> None:
    """Evaluate the trained adapter; write metrics/eval.json and eval/predictions.jsonl."""
    import milora
    from milora.base import load_base
    from milora.io import atomic_write_text, dump_json, write_json

    t0 = time.perf_counter()
    rows = read_jsonl(paths.prepared_dir / "eval.jsonl")
    model, tokenizer = load_base(cfg, paths)
    max_length = cfg.data.max_length
    docs = heldout_lines(cfg, paths)
    before = heldout_loss(model, tokenizer, docs, max_length, cfg.eval.batch_size) if docs else None
    model = milora.load_adapter(model, paths.adapter_dir)
    model.eval()
    metrics, preds = evaluate_model(model, tokenizer, rows, cfg, max_length)
    if before is not None:
        after = heldout_loss(model, tokenizer, docs, max_length, cfg.eval.batch_size)
        metrics.update(heldout_loss_base=before, heldout_loss_tuned=after, forgetting=after - before)
    else:
        log.warning("no held-out pretraining text (set data.heldout_text): forgetting not measured")
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
    paths.predictions.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.predictions, "".join(json.dumps(p, sort_keys=True) + "\n" for p in preds))
    write_json(paths.metrics("eval"), metrics)
    log.info("eval: %s", dump_json({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}).strip())
