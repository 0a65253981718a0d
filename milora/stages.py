"""`milora stage NAME`: run one pipeline stage (what `dvc.yaml` and the Prefect flow call).

Each stage is a plain function `fn(config, paths) -> None` that only writes files.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import time
from pathlib import Path

from milora.config import load_config
from milora.paths import Paths

log = logging.getLogger(__name__)

# Comma-separated stage names that fail on purpose (a transient-looking RuntimeError, exit 1): how the
# orchestration tests inject a fault without editing code.
FAULT_ENV = "MILORA_FAULT_INJECT"

# stage name -> "module:function"; imported lazily so one stage's heavy imports don't slow the others.
STAGES: dict[str, str] = {
    "ingest": "milora.ingest:ingest_stage",
    "base": "milora.base:base_stage",
    "prepare": "milora.data:prepare_stage",
    "svd": "milora.init_stage:svd_stage",
    "train": "milora.train:train_stage",
    "evaluate": "milora.evaluate:evaluate_stage",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora stage`."""
    p.add_argument("name", choices=sorted(STAGES))
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root where stage outputs go (default: .)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key for this run, e.g. -S adapter.rank=16")


def parse_sets(items: list[str]) -> dict[str, object]:
    """`["a.b=1", ...]` -> `{"a.b": 1}` (values parsed as YAML)."""
    from milora.config import ConfigError, parse_override_value

    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE (e.g. adapter.rank=16)")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_override_value(v)
    return out


def run_stage(name: str, params: str | Path = "params.yaml", root: str | Path = ".", overrides=None) -> float:
    """Validate the config, run one stage, return its wall time in seconds."""
    module, func = STAGES[name].split(":")
    cfg = load_config(params, overrides)
    fn = getattr(importlib.import_module(module), func)
    t0 = time.perf_counter()
    log.info("stage %s: start", name)
    if name in os.environ.get(FAULT_ENV, "").split(","):
        raise RuntimeError(f"fault injected into stage {name!r} by {FAULT_ENV} (for resume/retry tests)")
    fn(cfg, Paths(Path(root)))
    dt = time.perf_counter() - t0
    log.info("stage %s: done in %.1fs", name, dt)
    return dt


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora stage`."""
    run_stage(args.name, args.params, args.root, parse_sets(args.set))
    return 0
