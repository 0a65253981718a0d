"""The `prepare` stage: normalise, dedup, tokenize-check and split `data/raw` into train/eval JSONL."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.core.errors import MissingInput
from milora.core.io import atomic_write_text
from milora.data.formats import ROW_KEYS, copied_from, read_records
from milora.model.base import load_tokenizer
from milora.model.tokenize import tokenize_pair
from milora.pipeline.config import REHEARSAL, Config
from milora.pipeline.paths import Paths
from milora.pipeline.results import write_metrics

log = logging.getLogger(__name__)

# The numbers of metrics/data.json (DVC metrics, compared across runs); reports/data.json has them all.
SUMMARY = ["rows.train", "rows.eval"]


def dedup(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Drop exact duplicates (same prompt and response), keeping the first; returns (rows, number dropped)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        key = (r["prompt"], r["response"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, len(rows) - len(out)


def _unit(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()[:16], 16) / 2**64


@dataclass
class Split:
    """A train/eval split and what the eval cap did."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    capped_to_train: int = 0
    capped_dropped: int = 0


def split_rows(rows: Sequence[dict[str, Any]], eval_fraction: float, max_eval_rows: int, seed: int = 0,
               train_only: Sequence[dict[str, Any]] = ()) -> Split:
    """Deterministic split by hashing each row's group (or id) with the seed; eval capped at `max_eval_rows`.

    A row's side depends only on its own content and the seed, so appending data never moves existing
    rows between splits. Groups stay whole; eval groups beyond the cap go to train. Both splits are
    ordered by a seeded hash of the row id (a shuffle that interleaves tasks). `train_only` rows (rehearsal)
    join the training side, in the same order, and are never held out.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or r["id"], []).append(r)
    ranked = sorted(groups, key=lambda g: (_unit(seed, g), g))
    chosen = [g for g in ranked if _unit(seed, g) < eval_fraction]
    if not chosen and len(ranked) > 1:
        chosen = ranked[:1]  # tiny sources still get an eval row
    if len(chosen) == len(ranked) and len(ranked) > 1:
        chosen = chosen[:-1]
    eval_rows: list[dict[str, Any]] = []
    held = set(chosen)
    train_rows = [r for g in ranked if g not in held for r in groups[g]]
    capped_to_train = capped_dropped = 0
    for g in chosen:
        room = max_eval_rows - len(eval_rows)
        if room >= len(groups[g]):
            eval_rows.extend(groups[g])
        elif room > 0 and not eval_rows:  # a single group larger than the cap: take part, drop the rest
            eval_rows.extend(groups[g][:room])
            capped_dropped += len(groups[g]) - room
        else:
            train_rows.extend(groups[g])
            capped_to_train += len(groups[g])
    order = lambda r: (_unit(seed, r["id"]), r["id"])  # noqa: E731
    return Split(sorted([*train_rows, *train_only], key=order), sorted(eval_rows, key=order), capped_to_train,
                 capped_dropped)


def _percentiles(values: Sequence[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 90, 95, 99)}
    out.update(mean=round(float(a.mean()), 2), max=int(a.max()), min=int(a.min()))
    return out


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps({k: r[k] for k in ROW_KEYS}, ensure_ascii=False) + "\n" for r in rows)


def _short_origin(origin: str, raw_dir: Path) -> str:
    """A machine-independent name for a source file in metrics: its path inside the raw data directory."""
    p = Path(origin)
    return p.relative_to(raw_dir).as_posix() if p.is_relative_to(raw_dir) and p != raw_dir else p.name


def rehearsal_rows(paths: Paths, tokenizer: Any) -> list[dict[str, Any]]:
    """The base's own replies written by the `base` stage (`data.rehearsal`), as normalised chat rows of task
    `rehearsal` (the train stage distils the base on them with `train.rehearsal_kl`)."""
    if not paths.rehearsal.is_file() or paths.rehearsal.stat().st_size == 0:
        return []
    return [{**r, "task": REHEARSAL} for r in read_records(paths.rehearsal, "chat", "fail", tokenizer).rows]


def run(cfg: Config, paths: Paths) -> None:
    """Normalise, dedup, tokenize-check and split `data/raw` (written by `ingest`); write train/eval JSONL and
    metrics/data.json. The output depends only on the raw files, the tokenizer and the data params."""

    t0 = time.perf_counter()
    d = cfg.data
    raw = paths.raw_dir
    if not raw.is_dir():
        raise MissingInput(f"{raw} not found: run `milora stage ingest` first (it copies data.source there)")
    tokenizer = load_tokenizer(cfg, paths)

    def describe(path: Path) -> str:  # errors name the user's file (and row), not the copy in data/raw
        return d.source if path == raw else copied_from(d.source, path.relative_to(raw).as_posix())

    loaded = read_records(raw, d.format, d.on_bad_rows, tokenizer, describe=describe)
    rows = loaded.rows
    dropped = Counter(loaded.dropped)
    if d.dedup:
        rows, n_dup = dedup(rows)
        if n_dup:
            dropped["duplicate"] = n_dup
    else:  # keep duplicates, but give them distinct ids
        seen: Counter[str] = Counter()
        for r in rows:
            seen[r["id"]] += 1
            if seen[r["id"]] > 1:
                r["id"] = f"{r['id']}-{seen[r['id']]}"
    lengths: dict[str, list[int]] = {"prompt": [], "response": [], "total": []}
    truncated: set[str] = set()
    for r in rows:
        p_ids, r_ids = tokenize_pair(tokenizer, r["prompt"], r["response"])
        lengths["prompt"].append(len(p_ids))
        lengths["response"].append(len(r_ids))
        lengths["total"].append(len(p_ids) + len(r_ids))
        if len(p_ids) + len(r_ids) > d.max_length:
            truncated.add(r["id"])
    rehearsal = rehearsal_rows(paths, tokenizer)  # training only: they keep the base's behaviour, measure nothing
    split = split_rows(rows, d.eval_fraction, d.max_eval_rows, d.seed, train_only=rehearsal)
    out = paths.prepared_dir
    atomic_write_text(out / "train.jsonl", _jsonl(split.train))
    atomic_write_text(out / "eval.jsonl", _jsonl(split.eval))
    if split.capped_dropped:
        dropped["eval cap (rest of an oversized group)"] = split.capped_dropped
    metrics = {  # a function of data/raw, the tokenizer and the data params only (not of where data.source is)
        "formats": {_short_origin(k, raw): v for k, v in loaded.formats.items()},
        "rows": {"source": loaded.source_rows, "loaded": len(loaded.rows), "kept": len(rows),
                 "train": len(split.train), "eval": len(split.eval), "rehearsal": len(rehearsal)},
        "dropped": dict(sorted(dropped.items())),
        "eval_capped_to_train": split.capped_to_train,
        "tasks": {name: dict(sorted(Counter(r["task"] for r in part).items()))
                  for name, part in (("train", split.train), ("eval", split.eval))},
        "truncated": {"max_length": d.max_length, "train": sum(r["id"] in truncated for r in split.train),
                      "eval": sum(r["id"] in truncated for r in split.eval)},
        "token_lengths": {k: _percentiles(v) for k, v in lengths.items()},
    }
    write_metrics(paths, "data", metrics, SUMMARY)
    log.info("prepare: %d rows (%d train, %d eval, dropped %s, truncated %d) -> %s in %.1fs",
             len(loaded.rows), len(split.train), len(split.eval), dict(dropped) or "none", len(truncated), out,
             time.perf_counter() - t0)

