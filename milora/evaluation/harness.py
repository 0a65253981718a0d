"""lm-evaluation-harness (`lm_eval`) run in process on a model object: the fine-tuned model and its base.

Metrics come out as `{task: {metric: value}}` from lm-eval's results, a metric named `acc` when its filter
is `none` and `<metric>_<filter>` otherwise (`exact_match_strict-match`); `*_stderr` values are kept.
The stage and `milora eval` record them as `lm_eval.<task>.<metric>`, and the fine-tuned minus the base
values as `lm_eval_delta.<task>.<metric>` (stderr and lm-eval's `sample_len` left out).

Tasks are looked up in `include_path` (local task YAMLs, e.g. `dataset_path: json` over local files)
first; lm-eval's own task index (thousands of YAMLs, ~15 s to build) is only read when a task is not
found there. Offline, only tasks whose data are local files (or already in the HF datasets cache) run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from milora.core.errors import InvalidInput, MissingInput

log = logging.getLogger(__name__)


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike[str] | None = None) -> Any:
    """An lm-eval TaskManager that knows `tasks`: the local YAMLs of `include_path` alone when they define
    them all, else those plus lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise MissingInput(f"lm-eval include_path {str(include_path)!r} is not a directory of task YAMLs")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise InvalidInput(f"lm-eval has no task(s) {', '.join(unknown)} among its built-in tasks{where}; "
                           "list them with `lm-eval ls tasks`, or define them in a task YAML under include_path")
    return manager


def metric_name(key: str) -> str:
    """lm-eval's `acc,none` -> `acc`; `exact_match,strict-match` -> `exact_match_strict-match`."""
    metric, _, flt = key.partition(",")
    return metric if flt in ("", "none") else f"{metric}_{flt}"


def results_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The numeric metrics of lm-eval's `results` section, per task."""
    out: dict[str, dict[str, float]] = {}
    for task, values in sorted(results.items()):
        nums = {metric_name(k): float(v) for k, v in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "alias"}
        if nums:
            out[task] = dict(sorted(nums.items()))
    return out


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], include_path: str | None = None,
                num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
                manager: Any = None) -> dict[str, dict[str, float]]:
    """lm-eval's `simple_evaluate` on `model` (a transformers or PEFT model object, evaluated as it is: on
    its device, in its dtype) with `tokenizer`; returns `{task: {metric: value}}`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        return {}
    manager = manager or task_manager(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=False)
    metrics = results_metrics((out or {}).get("results", {}))
    log.info("lm-eval: %s", metrics)
    return metrics


def deltas(tuned: Mapping[str, Mapping[str, float]], base: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Fine-tuned minus base, per task and metric present in both (standard errors and counts left out)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in tuned.items():
        d = {m: v - base[task][m] for m, v in values.items()
             if task in base and m in base[task] and "_stderr" not in m and m != "sample_len"}
        if d:
            out[task] = d
    return out
