"""What a pipeline run logs to its MLflow run (`log_pipeline_run`): the flattened params, every stage's numbers
as metrics, the training-loss curve, the lineage tags (`milora.tracking.lineage`) and the artifacts (adapter,
dvc.lock, reports, plots, eval predictions). Missing optional files are skipped with a log line. It is
idempotent: a run already logged with the same outputs is left as is. Every logged string and text artifact
is scrubbed of credentials first (`milora.tracking.scrub`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.core.errors import InvalidInput
from milora.pipeline.config import Config, flatten
from milora.pipeline.paths import Paths
from milora.tracking.identity import ENV_RUN_ID, TAG_RUN_KEY, run_key
from milora.tracking.lineage import lineage_tags, read_json_or_none, read_lineage
from milora.tracking.scrub import scrub, scrubbed_copy

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

TAG_LOGGED = "milora.logged"
PREFIXED = ("data", "base", "svd", "train")  # logged as `<name>.<key>`; eval metrics are unprefixed
LOSS_METRIC = "train_loss"
PARAM_PRECISION = "train.precision_resolved"  # what train.precision resolved to (lineage `precision`)

_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")


def metric_key(key: str) -> str:
    """A valid MLflow metric/param key (characters MLflow refuses become `_`)."""
    return _BAD_KEY_CHARS.sub("_", key)[:250]


def numeric_metrics(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics mapping as `prefix + dotted.key -> float` (bools as 0/1)."""
    out = {}
    for k, v in flatten(data).items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, int | float) and not (isinstance(v, float) and math.isinf(v)):
            out[metric_key(prefix + k)] = float(v)
    return out


def collect_metrics(paths: Paths) -> dict[str, float]:
    """Every numeric result of a run, from each stage's `reports/<name>.json` (all its numbers; the DVC
    metrics file when there is no report) and `timings/<name>.json` (its run facts): eval unprefixed, the
    other stages as `<name>.<key>`."""
    out: dict[str, float] = {}
    for stage in (*PREFIXED, "eval"):
        p = paths.report(stage) if paths.report(stage).is_file() else paths.metrics(stage)
        for f in (p, paths.timings(stage)):
            if not f.is_file():
                log.info("no %s: skipping its metrics", f)
                continue
            data = read_json_or_none(f)
            if isinstance(data, Mapping):
                out.update(numeric_metrics(data, "" if stage == "eval" else f"{stage}."))
    return out


def read_loss_curve(path: Path) -> list[tuple[int, float]]:
    """`(step, loss)` rows of `plots/train_loss.csv` (header `step,loss`); bad rows are skipped."""
    import csv

    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                rows.append((int(float(row["step"])), float(row["loss"])))
            except (KeyError, TypeError, ValueError):
                continue
    return rows


def run_params(cfg: Config, lineage: Mapping[str, Any]) -> dict[str, str]:
    """Flattened params: the config, overridden by the adapter's lineage params (what trained it), and
    `train.precision_resolved`, what `train.precision` (e.g. `auto`) resolved to when it trained; scrubbed."""
    merged = {**cfg.flat(), **flatten(lineage.get("params") or {})}
    if lineage.get("precision"):
        merged[PARAM_PRECISION] = lineage["precision"]
    out = {}
    for k, v in merged.items():
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        out[metric_key(k)] = scrub(text)[:6000]
    return out


ARTIFACTS: tuple[tuple[str, str], ...] = (
    # (path relative to the root, artifact directory)
    ("models/adapter", "adapter"),
    ("dvc.lock", "lineage"),
    ("data/raw.dvc", "lineage"),
    ("models/base.json", "lineage"),
    ("metrics/data.json", "metrics"),
    ("metrics/base.json", "metrics"),
    ("metrics/svd.json", "metrics"),
    ("metrics/train.json", "metrics"),
    ("metrics/eval.json", "metrics"),
    ("reports/data.json", "reports"),
    ("reports/base.json", "reports"),
    ("reports/svd.json", "reports"),
    ("reports/train.json", "reports"),
    ("reports/eval.json", "reports"),
    ("timings/base.json", "timings"),
    ("timings/svd.json", "timings"),
    ("timings/svd_matrices.json", "timings"),
    ("timings/train.json", "timings"),
    ("timings/eval.json", "timings"),
    ("plots/train_loss.csv", "plots"),
    ("plots/spectrum.png", "plots"),
    ("eval/predictions.jsonl", "eval"),
    ("eval/suites", "eval/suites"),
)


def log_pipeline_run(mlflow_client: MlflowClient, run_id: str, cfg: Config, paths: Paths,
                     key: str | None = None, tags: Mapping[str, str] | None = None) -> bool:
    """Log params, metrics, lineage tags (`tags` when the caller has them) and artifacts of the outputs
    under `paths` into `run_id`.

    Idempotent: returns False without logging when the run is already marked logged for the same
    outputs (`key`); raises ValueError if it was logged for different outputs.
    """
    from mlflow.entities import Metric, Param, RunTag

    key = key or run_key(paths)
    run = mlflow_client.get_run(run_id)
    done = run.data.tags.get(TAG_LOGGED)
    if done == key:
        log.info("MLflow run %s already holds these outputs: not logging them again", run_id)
        return False
    if done:
        raise InvalidInput(
            f"MLflow run {run_id} already holds other pipeline outputs (key {done[:12]}, these are {key[:12]}): "
            f"unset {ENV_RUN_ID} (or start a new pipeline run) so that these outputs get their own run"
        )
    lineage = read_lineage(paths)
    tags = {**(tags if tags is not None else lineage_tags(cfg, paths, lineage)), TAG_RUN_KEY: key}
    params = run_params(cfg, lineage)
    existing = run.data.params
    params = {k: v for k, v in params.items() if k not in existing}
    metrics = collect_metrics(paths)
    now = int(time.time() * 1000)
    batch_metrics = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
    loss = paths.plot("train_loss.csv")
    if LOSS_METRIC in run.data.metrics:
        log.info("run %s already has %s (logged live by the train stage): not re-logging the CSV", run_id, LOSS_METRIC)
    elif loss.is_file():
        batch_metrics += [Metric(LOSS_METRIC, v, now, s) for s, v in read_loss_curve(loss)]
    else:
        log.info("no %s: no per-step training loss", loss)
    for i in range(0, len(batch_metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=batch_metrics[i : i + 1000], synchronous=True)
    plist = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(plist), 100):
        mlflow_client.log_batch(run_id, params=plist[i : i + 100], synchronous=True)
    tlist = [RunTag(k, v) for k, v in sorted(tags.items())]
    for i in range(0, len(tlist), 100):
        mlflow_client.log_batch(run_id, tags=tlist[i : i + 100], synchronous=True)
    mlflow_client.log_dict(run_id, {**tags, "svd_cache_keys": lineage.get("svd_cache_keys") or {}},
                           "lineage/lineage.json")
    with tempfile.TemporaryDirectory(prefix="milora-artifacts-") as tmp:
        for src, dest in ARTIFACTS:
            p = paths.root / src
            if not p.exists():
                log.info("no %s: not logged", p)
                continue
            p = scrubbed_copy(p, Path(tmp))
            if p.is_dir():
                mlflow_client.log_artifacts(run_id, str(p), dest)
            else:
                mlflow_client.log_artifact(run_id, str(p), dest)
    mlflow_client.set_tag(run_id, TAG_LOGGED, key)
    log.info("logged %d params, %d metrics, %d tags and the artifacts to MLflow run %s",
             len(plist), len(batch_metrics), len(tlist), run_id)
    return True
