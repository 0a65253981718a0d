"""Where each stage reads and writes, relative to the project root (the directory holding params.yaml).

`dvc.yaml` declares the same paths as deps/outs; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import overload

# stage -> the name of its `metrics/<name>.json` (what `dvc metrics show` and MLflow call it)
STAGE_METRICS = {"base": "base", "prepare": "data", "svd": "svd", "train": "train", "evaluate": "eval",
                 "register": "register"}


class _Under:
    """A `Paths` attribute: the path `rel` under the project root."""

    def __init__(self, rel: str):
        self.parts = tuple(rel.split("/"))

    @overload
    def __get__(self, obj: None, owner: type) -> _Under: ...
    @overload
    def __get__(self, obj: Paths, owner: type) -> Path: ...

    def __get__(self, obj: Paths | None, owner: type) -> Path | _Under:
        return self if obj is None else obj.root.joinpath(*self.parts)


@dataclass(frozen=True)
class Paths:
    """All pipeline file locations under one project root.

    Attributes:
        root: the project root (the directory holding params.yaml).
        base_dir: `models/base`, the embedded tiny base in HF format (model + tokenizer); unused for external
            models.
        base_json: `models/base.json`, base identity: what to load (`load_path`), revision / content hash,
            dtype, parameter count.
        heldout_text: `models/heldout.txt`, held-out pretraining text for the forgetting metric (embedded base:
            written by `base`).
        self_text: `models/self_text.jsonl`, the base's own replies to everyday instructions (`data.self_text`),
            sampled once by `base`: the forgetting metric of a base without pretraining text (empty when off).
        rehearsal: `models/rehearsal.jsonl`, the base's greedy replies to the profile's rehearsal prompts
            (`data.rehearsal`, chat rows), written by `base`, added to the training split by `prepare`.
        raw_dir: `data/raw`, the raw data, DVC-versioned: the current contents of `data.source`.
        suites_dir: `data/suites`, the benchmark suites of `eval.suites`, one directory each
            (`data/suites/<name>/`), DVC-versioned.
        prepared_dir: `data/prepared`, `train.jsonl` and `eval.jsonl`: normalised rows (prompt, response,
            answer, task, ...).
        svd_init_dir: `models/svd_init`, the untrained adapter (initial factors), as written by
            `milora.save_adapter`.
        adapter_dir: `models/adapter`, the trained adapter (`milora.save_adapter` format) with `lineage.json`.
        checkpoints_dir: `checkpoints`, trainer checkpoints; survive re-runs so an interrupted `train` resumes.
        predictions: `eval/predictions.jsonl`, per-example predictions for error analysis.
        suite_predictions_dir: `eval/suites`, per-example predictions of each benchmark suite:
            `eval/suites/<name>.jsonl`.
    """

    root: Path = Path(".")

    # base stage (runs first: `prepare` needs the tokenizer)
    base_dir = _Under("models/base")
    base_json = _Under("models/base.json")
    heldout_text = _Under("models/heldout.txt")
    self_text = _Under("models/self_text.jsonl")
    rehearsal = _Under("models/rehearsal.jsonl")
    # ingest stage
    raw_dir = _Under("data/raw")
    suites_dir = _Under("data/suites")
    # prepare stage
    prepared_dir = _Under("data/prepared")
    # svd stage
    svd_init_dir = _Under("models/svd_init")
    # train stage
    adapter_dir = _Under("models/adapter")
    checkpoints_dir = _Under("checkpoints")
    # evaluate stage
    predictions = _Under("eval/predictions.jsonl")
    suite_predictions_dir = _Under("eval/suites")

    def metrics(self, name: str) -> Path:
        """`metrics/<name>.json` (a stage's file is named in `STAGE_METRICS`)."""
        return self.root / "metrics" / f"{name}.json"

    def report(self, name: str) -> Path:
        """`reports/<name>.json`: a stage's detailed numbers (per matrix, per percentile, counts), a superset of
        its DVC metrics, logged to MLflow; byte-reproducible (its timings are in `timings/<name>.json`)."""
        return self.root / "reports" / f"{name}.json"

    def timings(self, name: str) -> Path:
        """`timings/<name>.json`: a stage's run facts (wall times, cache hits, memory), which change on every
        rerun: not a stage output, so that outputs stay byte-reproducible (dvc.yaml lists them as top-level
        metrics); logged to MLflow."""
        return self.root / "timings" / f"{name}.json"

    def stage_metrics(self, stage: str) -> Path | None:
        """The DVC metrics file a stage writes, if it writes one."""
        name = STAGE_METRICS.get(stage)
        return self.metrics(name) if name else None

    def plot(self, name: str) -> Path:
        """`plots/<name>` (CSV for `dvc plots`, PNG for people)."""
        return self.root / "plots" / name
