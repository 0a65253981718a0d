"""What a registered model comes from: the adapter's `lineage.json`, the git commit, DVC's data hashes, the base
identity, the SVD cache keys and the benchmark suites' content hashes, as the lineage tags of its MLflow run (DVC's
data hashes come from `milora.pipeline.dvcstate`, the one reader of dvc.lock)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from milora.core.io import file_digest
from milora.pipeline.config import Config
from milora.pipeline.dvcstate import data_hashes
from milora.pipeline.paths import Paths
from milora.tracking.identity import TAG_PREFECT, prefect_flow_run_id
from milora.tracking.scrub import scrub

log = logging.getLogger(__name__)


def read_json_or_none(path: Path) -> Any:
    """The JSON in `path`, or None (with a warning) when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): skipped", path, exc)
        return None


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def read_lineage(paths: Paths) -> dict[str, Any]:
    """`models/adapter/lineage.json` (empty if missing), with `base` filled from `models/base.json` when absent."""
    p = paths.adapter_dir / "lineage.json"
    lineage = read_json_or_none(p) if p.is_file() else None
    if lineage is None:
        log.info("no %s: lineage comes from the other outputs only", p)
        lineage = {}
    if not lineage.get("base") and paths.base_json.is_file():
        lineage["base"] = read_json_or_none(paths.base_json) or {}
    return lineage


def trained_with(cfg: Config, lineage: Mapping[str, Any]) -> tuple[str, str]:
    """The adapter's method and rank: what its lineage records (what trained it), else the config's."""
    return str(lineage.get("method") or cfg.adapter.method), str(lineage.get("rank") or cfg.adapter.rank)


def run_name(cfg: Config, lineage: Mapping[str, Any], key: str) -> str:
    """The name of a pipeline run's MLflow run: `<method>-r<rank>-<first 8 of its run key>`."""
    method, rank = trained_with(cfg, lineage)
    return f"{method}-r{rank}-{key[:8]}"


def lineage_tags(cfg: Config, paths: Paths, lineage: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The lineage tags of a run: git commit, DVC data hashes, base identity, SVD cache keys, method, suites'
    content hashes, Prefect run."""
    lin = dict(lineage if lineage is not None else read_lineage(paths))
    tags: dict[str, str] = {}
    commit = lin.get("git_commit") or _git_commit(paths.root)
    if commit:
        tags["milora.git_commit"] = str(commit)
        tags["mlflow.source.git.commit"] = str(commit)
    dvc = data_hashes(paths.root)
    content = lin.get("data_hash")  # sha256 over data/prepared's files, recorded by the train stage
    data_hash = dvc.get("data_hash") or content  # the DVC version of data/prepared when there is one
    if data_hash:
        tags["milora.data_hash"] = str(data_hash)
    if content:
        tags["milora.data_sha256"] = str(content)
        if paths.prepared_dir.is_dir() and file_digest(paths.prepared_dir) != content:
            log.warning("the adapter was trained on other data than data/prepared holds now (stale outputs? "
                        "`dvc repro` retrains): tagging the run milora.data_stale=true")
            tags["milora.data_stale"] = "true"
    if dvc.get("raw_data_hash"):
        tags["milora.raw_data_hash"] = dvc["raw_data_hash"]
    if dvc.get("suites_data_hash"):
        tags["milora.suites_data_hash"] = dvc["suites_data_hash"]
    tags.update(suite_tags(paths))
    for k, v in sorted((lin.get("base") or {}).items()):
        if v is not None and not isinstance(v, Mapping | list):
            tags[f"milora.base.{k}"] = str(v)
    keys = lin.get("svd_cache_keys") or {}
    if isinstance(keys, Mapping):
        blob = json.dumps(dict(keys), sort_keys=True, separators=(",", ":"))
        tags["milora.svd_cache_keys.count"] = str(len(keys))
        tags["milora.svd_cache_keys.sha256"] = hashlib.sha256(blob.encode()).hexdigest()
        if len(blob) <= 5000:
            tags["milora.svd_cache_keys"] = blob
    method, rank = trained_with(cfg, lin)
    tags["milora.method"] = method
    if lin.get("precision"):
        tags["milora.precision"] = str(lin["precision"])  # what train.precision resolved to: fp32 | bf16 | fp16
    tags["milora.rank"] = rank
    tags["milora.quantization"] = str(lin.get("quantization") or cfg.adapter.quantization)  # none|nf4|fp4|int8
    flow = prefect_flow_run_id()
    if flow:
        tags[TAG_PREFECT] = flow
    return {k: scrub(v) for k, v in tags.items()}


def suite_tags(paths: Paths) -> dict[str, str]:
    """The content hash of each benchmark suite the evaluate stage scored (`milora.suite.<name>.sha256`) and of
    the lm-eval task directory (`milora.lm_eval_include_sha256`), from `reports/eval.json`."""
    report = read_json_or_none(paths.report("eval")) if paths.report("eval").is_file() else None
    if not isinstance(report, Mapping):
        return {}
    tags = {f"milora.suite.{name}.sha256": str(s["sha256"]) for name, s in sorted((report.get("suites") or {}).items())
            if isinstance(s, Mapping) and s.get("sha256")}
    if report.get("lm_eval_include_sha256"):
        tags["milora.lm_eval_include_sha256"] = str(report["lm_eval_include_sha256"])
    return tags
