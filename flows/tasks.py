"""The tasks of the `milora-pipeline` flow (`flows.pipeline`): a DVC stage (`dvc repro --single-item`), the push of
a new data version, and registration (`milora register`). Each runs its subprocess under a fresh run token with
its output streamed into the task's log, and learns what happened from the step's structured result
(`milora.pipeline.results`), never from log text; each retries transient failures only (`retry_transient`),
`flow.retries` times, `flow.retry_delays` apart (`with_retries`); each moves the run's progress bar.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import task_run as runtime_task_run

from flows.report import registration_line, registration_summary
from flows.steps import StageFailed, dvc_command, repro_outcome, run_streamed, shown, step_failure, venv_env
from milora.pipeline import progress
from milora.pipeline.config import FlowConfig
from milora.pipeline.dvcstate import default_remote, lock_record
from milora.pipeline.lock import held_lock
from milora.pipeline.results import TOKEN_ENV, read_result
from milora.tracking.identity import ENV_PREFECT_FLOW_RUN

INGEST, PUSH_DATA, REGISTER = "ingest", "push-data", "register"
RETRIES, RETRY_DELAYS = FlowConfig().retries, FlowConfig().delays()  # the tasks' defaults; a run uses its params'


def with_retries(task: Any, policy: FlowConfig) -> Any:
    """`task` retrying transient failures `policy.retries` times, `policy.delays()` seconds apart."""
    return task.with_options(retries=policy.retries, retry_delay_seconds=policy.delays() or 0)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only failures classified transient (see `flows.steps`)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.kind == "transient"


def set_progress(artifact_id: str | None, value: float, description: str) -> None:
    """Move the run's progress artifact (`artifact_id`; None: there is none) to `value` percent."""
    with contextlib.suppress(Exception):  # a progress bar must never fail a run
        if artifact_id:
            update_progress_artifact(uuid.UUID(artifact_id), progress.clamp(value), description=description)


def _run_step(name: str, cmd: list[str], root: Path, on_tick: Any = None, result_step: str | None = None,
              env: dict[str, str] | None = None) -> tuple[Any, int, Any]:
    """Run one step's subprocess under a fresh run token, its output in the task log (the workspace lock passed
    on, so a stage outliving this process keeps the workspace locked). Returns the command's result, the
    attempt and the step's structured result (None when DVC skipped it); raises `StageFailed` if it failed."""
    logger, token, lock = get_run_logger(), uuid.uuid4().hex, held_lock(root)
    attempt, ctx = runtime_task_run.run_count or 1, TaskRunContext.get()
    result = run_streamed(cmd, cwd=root, env=venv_env({**(env or {}), TOKEN_ENV: token}), on_tick=on_tick,
                          on_line=lambda ln: logger.info(ln.rstrip()) if shown(ln) else None,
                          pass_fds=(lock.fileno(),) if lock is not None else ())
    step = read_result(root, result_step, token) if result_step else None
    if result.returncode != 0:
        attempts = (ctx.task.retries if ctx is not None else RETRIES) + 1
        logger.error("%s", exc := step_failure(name, result.returncode, step, result.output, attempt,
                                                round(result.seconds, 3), attempts))
        raise exc
    return result, attempt, step


@task(name="stage", task_run_name="{stage}", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, root: str, force: bool = False, progress_id: str | None = None,
              progress_span: tuple[float, float] = (0.0, 100.0), sync: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item STAGE` in `root`; with `sync` (a worker's workspace with a DVC remote) it pulls
    what the stage needs and pushes what it made. Returns the `StageRun` fields; raises `StageFailed`."""
    rootp, started = Path(root), time.time()
    set_progress(progress_id, progress_span[0], f"{stage}: running")

    def on_tick() -> None:  # the train stage moves the bar by its own progress file
        if stage == "train" and (frac := progress.train_fraction(rootp, started)) is not None:
            set_progress(progress_id, progress.within(progress_span, frac), f"train: {100 * frac:.0f}% of the steps")

    args = ["repro", "--single-item", *(["--force"] if force else []), *(["--pull"] if sync else []), stage]
    get_run_logger().info("$ dvc %s", " ".join(args))
    before = lock_record(rootp, stage)
    result, attempt, step = _run_step(stage, dvc_command(*args), rootp, on_tick, result_step=stage)
    outcome = repro_outcome(step, before, lock_record(rootp, stage))
    if sync and outcome != "restored":  # (a skipped stage too: an earlier attempt may have run it, not pushed)
        get_run_logger().info("$ dvc push --run-cache %s", stage)
        _run_step(f"push {stage}", dvc_command("push", "--run-cache", stage), rootp)
    set_progress(progress_id, progress_span[1], f"{stage}: {outcome}")
    get_run_logger().info("stage %s: %s in %.1fs", stage, outcome, result.seconds)
    return {"name": stage, "outcome": outcome, "seconds": round(result.seconds, 3),
            "compute_seconds": step.seconds if step else None, "attempts": attempt}


@task(name=PUSH_DATA, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, persist_result=False)
def push_data(root: str, stage: str = INGEST) -> dict[str, Any]:
    """`dvc push STAGE` (through DVC's API in `flows.push`, which records a structured result: an unreachable
    remote is transient): the new data version to the DVC default remote (no-op without one)."""
    if (remote := default_remote(root)) is None:
        get_run_logger().info("no DVC default remote: the data version stays in the local cache only")
        return {"remote": None, "seconds": 0.0, "attempts": 0}
    get_run_logger().info("$ dvc push %s  (remote %s)", stage, remote)
    cmd = [sys.executable, "-m", "flows.push", root, stage]
    result, attempt, _ = _run_step(PUSH_DATA, cmd, Path(root), result_step=PUSH_DATA)
    return {"remote": remote, "seconds": round(result.seconds, 3), "attempts": attempt}


@task(name="register", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, persist_result=False)
def register(root: str, flow_run_id: str | None = None, progress_id: str | None = None,
             progress_span: tuple[float, float] = (0.0, 100.0)) -> dict[str, Any]:
    """`milora register`: log the run to MLflow, register a version as `challenger`, run the champion gate.
    Returns `{"decision": registration_summary(...), "seconds": ..., "attempts": ...}`."""
    set_progress(progress_id, progress_span[0], "register: running")
    get_run_logger().info("$ milora register --root %s", root)
    cmd = [sys.executable, "-m", "milora.cli", "register", "--root", root]
    env = {ENV_PREFECT_FLOW_RUN: flow_run_id} if flow_run_id else None
    result, attempt, step = _run_step(REGISTER, cmd, Path(root), result_step=REGISTER, env=env)
    decision = registration_summary(step.data if step else {}, root)
    get_run_logger().info("register: %s", registration_line(decision))
    set_progress(progress_id, progress_span[1], "register: done")
    return {"decision": decision, "seconds": round(result.seconds, 3), "attempts": attempt}
