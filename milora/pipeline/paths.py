"""Where each stage reads and writes, relative to the project root (the directory holding params.yaml).

`dvc.yaml` declares the same paths as deps/outs; keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# stage -> the name of its `metrics/<name>.json` (what `dvc metrics show` and MLflow call it)
STAGE_METRICS = {"base": "base", "prepare": "data", "svd": "svd", "train": "train", "evaluate": "eval",
                 "register": "register"}


@dataclass(frozen=True)
class Paths:
    """All pipeline file locations under one project root."""

    root: Path = Path(".")

    # base stage (runs first: `prepare` needs the tokenizer)
    @property
    def base_dir(self) -> Path:
        """The embedded tiny base in HF format (model + tokenizer); unused for external models."""
        return self.root / "models" / "base"

    @property
    def base_json(self) -> Path:
        """Base identity: what to load (`load_path`), revision / content hash, dtype, parameter count."""
        return self.root / "models" / "base.json"

    @property
    def heldout_text(self) -> Path:
        """Held-out pretraining text for the forgetting metric (embedded base: written by `base`)."""
        return self.root / "models" / "heldout.txt"

    # ingest stage
    @property
    def raw_dir(self) -> Path:
        """The raw data, DVC-versioned: the current contents of `data.source`."""
        return self.root / "data" / "raw"

    @property
    def suites_dir(self) -> Path:
        """The benchmark suites of `eval.suites`, one directory each (`data/suites/<name>/`), DVC-versioned."""
        return self.root / "data" / "suites"

    # prepare stage
    @property
    def prepared_dir(self) -> Path:
        """`train.jsonl` and `eval.jsonl`: normalised rows (prompt, response, answer, task, ...)."""
        return self.root / "data" / "prepared"

    # svd stage
    @property
    def svd_init_dir(self) -> Path:
        """The untrained adapter (initial factors), as written by `milora.save_adapter`."""
        return self.root / "models" / "svd_init"

    # train stage
    @property
    def adapter_dir(self) -> Path:
        """The trained adapter (`milora.save_adapter` format) with `lineage.json`."""
        return self.root / "models" / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        """Trainer checkpoints; survive re-runs so an interrupted `train` resumes."""
        return self.root / "checkpoints"

    # evaluate stage
    @property
    def predictions(self) -> Path:
        """Per-example predictions for error analysis."""
        return self.root / "eval" / "predictions.jsonl"

    @property
    def suite_predictions_dir(self) -> Path:
        """Per-example predictions of each benchmark suite: `eval/suites/<name>.jsonl`."""
        return self.root / "eval" / "suites"

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
