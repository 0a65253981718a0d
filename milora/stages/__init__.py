"""The pipeline stages, one module each, each a plain `run(cfg: Config, paths: Paths) -> None` that writes
files. `dvc.yaml` runs them through `milora stage NAME`, which calls `run_stage` here.

Stage modules are imported on use, so that one stage does not pay for another's heavy imports.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from milora.pipeline.config import Config, load_config
from milora.pipeline.paths import Paths
from milora.pipeline.results import StepResult, recorded

log = logging.getLogger(__name__)

# In pipeline order; each module has `run(cfg, paths)`.
STAGES: tuple[str, ...] = ("ingest", "base", "prepare", "svd", "train", "evaluate")


def stage_function(name: str) -> Callable[[Config, Paths], None]:
    """The `run` function of stage `name`."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"milora.stages.{name}").run


def run_stage(name: str, params: str | os.PathLike[str] = "params.yaml", root: str | os.PathLike[str] = ".",
              overrides: Mapping[str, Any] | None = None) -> StepResult:
    """Validate the config, run one stage, and record its structured result in `.milora/results/`.

    Returns the result; an exception from the stage is recorded (kind, exit code, message) and re-raised."""
    paths = Paths(Path(root))
    with recorded(name, paths.root) as result:
        cfg = load_config(params, overrides)
        fn = stage_function(name)
        log.info("stage %s: start", name)
        fn(cfg, paths)
        metrics = paths.stage_metrics(name)
        if metrics is not None and metrics.exists():
            result.metrics = metrics.relative_to(paths.root).as_posix()
    log.info("stage %s: done in %.1fs", name, result.seconds)
    return result
