"""Fan-out: many trials of the pipeline, each a run of the on-demand deployment, gathered into one table.

    python -m flows.fanout --grid adapter.method=lora,pissa,milora --grid train.seed=0,1 \\
        --set train.max_steps=100 --max-parallel 2 --threads 1 --out sweep.json

The `milora-fanout` flow takes a list of override sets (`grid` builds one from axes: methods x ranks x learning
rates x seeds ...) and submits each as a flow run of the on-demand deployment with Prefect's `run_deployment`:
the work pool's workers run them, each in its own workspace (`flows.workspace`), as many at once as there are
workers (or the pool's concurrency limit), and never more than `max_parallel` from this sweep. Every trial runs
with `threads` CPU threads (`OMP_NUM_THREADS` and friends in its job variables), so parallel trials on one
machine do not fight for its cores. When they are done, the flow reads each trial's MLflow run (found by its
Prefect flow-run id), makes it a child of one MLflow parent run for the sweep, and returns (and logs, and
writes as a Prefect artifact) one table: the trial's overrides, its state, and its metrics.

Needs `PREFECT_API_URL` (the server the workers poll) and `MLFLOW_TRACKING_URI` (the tracking server the
trials log to).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.futures import as_completed
from prefect.runtime import flow_run as runtime_flow_run

FLOW_NAME = "milora-fanout"
DEPLOYMENT = "milora-pipeline/on-demand"
TABLE_KEY = "milora-fanout"
# The metrics of each trial's MLflow run the table shows (those present), after the champion-gate metric.
COLUMNS = ("average_accuracy", "perplexity", "forgetting", "train.train_loss", "train.eval_loss_end",
           "train.train_seconds", "train.cpu_threads", "svd.cache_hits")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "milora.fanout"


def grid(axes: Mapping[str, Sequence[Any]], common: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Override sets of the cartesian product of `axes` (dotted key -> values, in order), each with `common`."""
    keys = list(axes)
    for key in keys:
        if not list(axes[key]):
            raise ValueError(f"grid axis {key!r} has no values")
    return [{**(common or {}), **dict(zip(keys, values, strict=True))}
            for values in itertools.product(*(list(axes[k]) for k in keys))]


def label(overrides: Mapping[str, Any]) -> str:
    """`key=value, ...` of a trial's overrides, for the table."""
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def thread_env(threads: int | None) -> dict[str, str]:
    """The job-variable env that pins a trial's CPU threads (empty: the worker's defaults)."""
    return {var: str(threads) for var in THREAD_VARS} if threads else {}


def render_table(rows: Sequence[Mapping[str, Any]], metric: str = "average_accuracy") -> str:
    """The sweep's markdown table: one row per trial, its overrides, state and metrics."""
    keys = [k for k in dict.fromkeys((metric, *COLUMNS)) if any(k in r.get("metrics", {}) for r in rows)]
    lines = ["| trial | overrides | state | " + " | ".join(keys) + " | MLflow run |",
             "|---:|---|---|" + "---:|" * len(keys) + "---|"]
    for r in rows:
        values = [r.get("metrics", {}).get(k) for k in keys]
        cells = [f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v) for v in values]
        lines.append(f"| {r['trial']} | {label(r['overrides'])} | {r['state']} | " + " | ".join(cells)
                     + f" | {r.get('run_id') or ''} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- the flow


@task(name="trial", task_run_name="trial-{index}", cache_policy=NO_CACHE, persist_result=False)
def trial(index: int, deployment: str, overrides: dict[str, Any], model_name: str | None,
          threads: int | None) -> dict[str, Any]:
    """One trial: a run of the deployment with these overrides (a subflow of the sweep), waited for."""
    parameters: dict[str, Any] = {"overrides": overrides}
    if model_name:
        parameters["model_name"] = model_name
    run = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=2,
                         job_variables={"env": thread_env(threads)} if threads else None, tags=["milora-fanout"])
    state = run.state
    return {"trial": index, "overrides": overrides, "flow_run_id": str(run.id), "flow_run_name": run.name,
            "state": state.name if state else "unknown", "message": (state.message or "") if state else "",
            "start": run.start_time.isoformat() if run.start_time else None,
            "end": run.end_time.isoformat() if run.end_time else None}


def _mlflow() -> Any:
    from milora.tracking.store import client

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        from milora.core.errors import MissingInput

        raise MissingInput("the fan-out reads its trials from the MLflow tracking server they log to: set "
                           "MLFLOW_TRACKING_URI (the same as the workers')")
    return client()


def _parent_run(mlflow_client: Any, experiment: str, trials: list[dict[str, Any]], flow_run_id: str | None) -> str:
    from milora.tracking.identity import TAG_PREFECT
    from milora.tracking.store import ensure_experiment

    exp = ensure_experiment(mlflow_client, experiment)
    tags = {SWEEP_TAG: "parent", **({TAG_PREFECT: flow_run_id} if flow_run_id else {})}
    run = mlflow_client.create_run(exp, run_name=f"fanout-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    mlflow_client.log_param(run.info.run_id, "trials", len(trials))
    keys = sorted({k for t in trials for k in t})
    for key in keys:
        values = sorted({json.dumps(t.get(key)) for t in trials})
        mlflow_client.log_param(run.info.run_id, f"grid.{key}"[:250], ", ".join(values)[:500])
    return run.info.run_id


def _adopt(mlflow_client: Any, experiment: str, parent: str, row: dict[str, Any]) -> None:
    """Find the trial's MLflow run (by its Prefect flow-run id), make it a child of the sweep, read its metrics."""
    from milora.tracking.identity import TAG_PREFECT
    from milora.tracking.store import ensure_experiment

    if not row.get("flow_run_id"):
        return
    exp = ensure_experiment(mlflow_client, experiment)
    found = mlflow_client.search_runs([exp], filter_string=f"tags.`{TAG_PREFECT}` = '{row['flow_run_id']}'",
                                      max_results=1)
    if not found:
        return
    run = found[0]
    mlflow_client.set_tag(run.info.run_id, PARENT_TAG, parent)
    mlflow_client.set_tag(run.info.run_id, SWEEP_TAG, f"trial {row['trial']}")
    row["run_id"] = run.info.run_id
    row["metrics"] = dict(run.data.metrics)


@flow(name=FLOW_NAME, description="Trials of the pipeline (a grid of overrides) as runs of the on-demand "
      "deployment, their metrics gathered from MLflow into one table", persist_result=False)
def milora_fanout(trials: list[dict[str, Any]], deployment: str = DEPLOYMENT, max_parallel: int | None = None,
                  threads: int | None = None, experiment: str = "milora", model_name: str | None = None,
                  metric: str = "average_accuracy") -> list[dict[str, Any]]:
    """Run every override set of `trials` as a run of `deployment`; return one row per trial.

    Args:
        trials: override sets, e.g. `[{"adapter.method": "lora"}, {"adapter.method": "milora"}]`.
        deployment: the deployment each trial runs (`flow/deployment`).
        max_parallel: at most this many trials submitted at once (default: all; the pool limits them).
        threads: CPU threads of each trial (OMP_NUM_THREADS ...), so parallel trials share the cores.
        experiment: the MLflow experiment of the trials (register.experiment), where the parent run goes.
        model_name: register the trials' models under this name rather than register.model_name.
        metric: the metric the table shows first.
    """
    logger = get_run_logger()
    if not trials:
        raise ValueError("no trials: give at least one override set")
    mlflow_client = _mlflow()
    parent = _parent_run(mlflow_client, experiment, trials, str(runtime_flow_run.id or "") or None)
    limit = max(1, min(max_parallel or len(trials), len(trials)))
    logger.info("%d trials of %s, at most %d at once, %s CPU threads each; MLflow parent run %s", len(trials),
                deployment, limit, threads or "default", parent)
    t0 = time.perf_counter()
    queue = list(enumerate(trials))
    running: dict[Any, tuple[int, dict[str, Any]]] = {}
    rows = []

    def submit() -> None:
        index, overrides = queue.pop(0)
        running[trial.submit(index, deployment, dict(overrides), model_name, threads)] = (index, dict(overrides))

    while queue and len(running) < limit:
        submit()
    while running:
        done = next(as_completed(list(running)))
        index, overrides = running.pop(done)
        row = done.result(raise_on_failure=False)
        if isinstance(row, BaseException):  # the trial could not even be submitted or followed
            row = {"trial": index, "overrides": overrides, "state": "Failed", "message": str(row)}
        logger.info("trial %d (%s): %s", row["trial"], label(row["overrides"]), row["state"])
        _adopt(mlflow_client, experiment, parent, row)
        rows.append(row)
        if queue:
            submit()
    rows.sort(key=lambda r: r["trial"])
    seconds = round(time.perf_counter() - t0, 3)
    table = render_table(rows, metric)
    logger.info("fan-out done in %.1fs:\n%s", seconds, table)
    completed = sum(r["state"] == "Completed" for r in rows)
    mlflow_client.log_metric(parent, "trials_completed", completed)
    mlflow_client.log_metric(parent, "wall_seconds", seconds)
    mlflow_client.log_text(parent, table, "fanout.md")
    mlflow_client.log_dict(parent, {"seconds": seconds, "trials": rows}, "fanout.json")
    mlflow_client.set_terminated(parent, "FINISHED" if completed == len(rows) else "FAILED")
    create_markdown_artifact(f"# Fan-out: {len(rows)} trials, {completed} completed, {seconds:.0f} s\n\n" + table,
                             key=TABLE_KEY, description="milora fan-out trials")
    return rows


# --------------------------------------------------------------------------------------------------- the command


def _axis(text: str) -> tuple[str, list[Any]]:
    from milora.pipeline.config import parse_override_value

    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"--grid {text!r}: use KEY=V1,V2,... e.g. adapter.method=lora,milora")
    return key, [parse_override_value(v) for v in values.split(",")]


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.fanout`: build the grid, run the fan-out flow, print the table."""
    from milora.pipeline.config import parse_sets

    p = argparse.ArgumentParser(prog="python -m flows.fanout", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", action="append", type=_axis, default=[], metavar="KEY=V1,V2",
                   help="one axis of the grid (repeatable): the trials are the product of the axes")
    p.add_argument("--trials", default=None, help="a JSON file with a list of override sets (instead of --grid)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override every trial gets (repeatable)")
    p.add_argument("--deployment", default=DEPLOYMENT, help=f"the deployment to run (default: {DEPLOYMENT})")
    p.add_argument("--max-parallel", type=int, default=None, help="at most this many trials at once")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per trial (OMP_NUM_THREADS ...)")
    p.add_argument("--experiment", default="milora", help="MLflow experiment of the trials (register.experiment)")
    p.add_argument("--model-name", default=None, help="register the trials' models under this name")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    common = parse_sets(args.set)
    if args.trials:
        trials = [{**common, **t} for t in json.loads(Path(args.trials).read_text(encoding="utf-8"))]
    else:
        trials = grid(dict(args.grid), common) if args.grid else [common]
    os.environ.setdefault("DO_NOT_TRACK", "1")
    state = milora_fanout(trials=trials, deployment=args.deployment, max_parallel=args.max_parallel,
                                 threads=args.threads, experiment=args.experiment, model_name=args.model_name,
                                 return_state=True)
    if not state.is_completed():
        print(f"fan-out failed: {state.message}", file=sys.stderr)
        return 1
    rows = state.result()
    print(render_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0 if all(r["state"] == "Completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
