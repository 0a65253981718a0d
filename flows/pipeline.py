"""The `milora-pipeline` Prefect flow: validate, lock the workspace, run the DVC stages, register, report.

The flow orchestrates and never computes. Each stage task runs `dvc repro --single-item <stage>` (DVC skips a
stage whose deps, params and outs did not change; `train` resumes from `checkpoints/` by itself), streaming its
output into the task's log; `register` runs `milora register`. Around the stages:

* parameters: `overrides` (dotted `params.yaml` keys, validated before anything runs), `model_name`, `root`
  and `params` (another params file); overrides are in `params.yaml` while the run lasts (`flows.params`);
* one run per workspace: the flow holds `milora.pipeline.lock.WorkspaceLock` (or the one `milora run` took);
* retries with backoff only for transient failures (as the step's structured result says), `flow.retries`
  times, `flow.retry_delays` apart; the failing step's own message is the flow run's final message;
* scheduled semantics: `ingest` is forced first, so the data source's current contents are versioned; when
  then every stage is up to date and this exact pipeline state was already registered, the run ends as
  "nothing to retrain" (`milora.pipeline.retrain`);
* artifacts: a markdown report per run (`flows.report`) and a progress bar (`milora.pipeline.progress`).

The return value is the metrics of the run, `{stage: metrics/<stage>.json}`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Completed, Failed, State

from flows.params import parse_overrides, run_params, validate_run_config
from flows.report import RunReport, read_metrics, render_markdown
from flows.steps import StageFailed, pipeline_status
from flows.tasks import (
    INGEST,
    PUSH_DATA,
    REGISTER,
    push_data,
    register,
    run_stage,
    set_progress,
    with_retries,
)
from flows.workspace import is_workspace, keep_after_failure, remove_after_success
from milora.core.errors import UserError
from milora.pipeline import progress
from milora.pipeline.dvcstate import default_remote, out_hash, stage_order
from milora.pipeline.lock import WorkspaceBusy, WorkspaceLock, held_lock
from milora.pipeline.retrain import NOTHING_TO_RETRAIN, already_registered, remember_registered

FLOW_NAME = "milora-pipeline"
DATA_OUT = "data/raw"  # ingest's output: its hash is the data version
PROGRESS_KEY, REPORT_KEY = "milora-progress", "milora-run-report"
log = logging.getLogger(__name__)


@flow(name=FLOW_NAME, description="MiLoRA fine-tuning: DVC stages ingest..evaluate, then MLflow registration",
      validate_parameters=True, persist_result=False, on_completion=[remove_after_success],
      on_failure=[keep_after_failure], on_crashed=[keep_after_failure])
def milora_pipeline(overrides: dict[str, Any] | None = None, model_name: str | None = None, root: str = ".",
                    params: str | None = None) -> dict[str, Any]:
    """Run the pipeline in `root` with `overrides` of `params.yaml` keys; return the metrics by stage.

    Args:
        overrides: dotted params keys to values for this run, e.g. `{"adapter.rank": 4}`.
        model_name: the MLflow registered model (default: `register.model_name` of the params).
        root: the project root (holding `params.yaml` and `dvc.yaml`).
        params: a params file to start from instead of `params.yaml` (relative to `root`).
    """
    t0, rootp = time.perf_counter(), Path(root).expanduser().resolve()
    try:  # validate before anything runs: a bad key or value fails here, with no task run at all
        overrides = parse_overrides(overrides) | ({"register.model_name": model_name} if model_name else {})
        validate_run_config(rootp, params, overrides)
        stages = stage_order(rootp)
        holding = _hold_workspace(rootp, runtime_flow_run.id)
    except (UserError, WorkspaceBusy) as exc:
        return _failed(exc)
    steps = [s for name in stages for s in ([name, PUSH_DATA] if name == INGEST else [name])] + [REGISTER]
    report = RunReport.planned(rootp, steps, flow_run_id=runtime_flow_run.id, flow_run_name=runtime_flow_run.name,
                               flow_run_url=runtime_flow_run.ui_url, overrides=overrides,
                               params_file=str(params or "params.yaml"),
                               started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    get_run_logger().info("workspace %s; stages %s; overrides %s", rootp, " -> ".join(stages), overrides or "none")
    bar = [*stages, REGISTER]
    try:
        pid = str(create_progress_artifact(0.0, key=PROGRESS_KEY, description=f"{FLOW_NAME}: {' -> '.join(bar)}"))
    except Exception as exc:  # the report must never fail a run
        pid = None
        log.warning("could not create the progress artifact: %s", exc)
    current, root_s = stages[0], str(rootp)  # `current`: the step a failure is recorded against
    with holding, run_params(rootp, params, overrides) as cfg:
        retried = {t.name: with_retries(t, cfg.flow) for t in (run_stage, push_data, register)}
        sync = is_workspace(rootp) and default_remote(rootp) is not None
        try:  # any failure: record it in the report and the artifact, then fail the flow run with it
            rest = [s for s in stages if s != INGEST]
            if INGEST in stages:  # version the data source's current contents (forced), push that version
                current, before = INGEST, out_hash(rootp, INGEST, DATA_OUT)
                report.record(retried["stage"](INGEST, root_s, True, pid, progress.span(bar, INGEST), sync))
                report.data_version = out_hash(rootp, INGEST, DATA_OUT)
                report.data_changed = report.data_version != before
                current, pushed = PUSH_DATA, retried[PUSH_DATA](root_s)
                report.record({"name": PUSH_DATA, "outcome": "ran" if pushed["remote"] else "no remote", **pushed})
            current = "dvc status"
            pending = pipeline_status(rootp)
            if not pending and (last := already_registered(rootp, cfg.register.model_name)):
                report.nothing_to_retrain(last, rest, REGISTER)
                set_progress(pid, 100.0, NOTHING_TO_RETRAIN)
                get_run_logger().info(report.message)
            else:
                for current in rest:
                    if pending:
                        span = progress.span(bar, current)
                        report.record(retried["stage"](current, root_s, False, pid, span, sync))
                    else:
                        report.stage(current).outcome = "up to date"
                current = REGISTER
                reg = retried[REGISTER](root_s, report.flow_run_id, pid, progress.span(bar, REGISTER))
                report.registered(REGISTER, reg)
                remember_registered(rootp, cfg.register.model_name, report.registration, report.data_version,
                                    report.flow_run_id)
                set_progress(pid, 100.0, "done")
        except BaseException as exc:
            report.record_failure(current, exc)
            _publish(report, t0)
            if isinstance(exc, (StageFailed, UserError)):
                return _failed(exc)  # its message says it all: no traceback in the logs
            raise
    _publish(report, t0)
    return Completed(message=report.message, data=report.metrics)  # the message shows in the Prefect UI


def _hold_workspace(root: Path, flow_run_id: str) -> contextlib.AbstractContextManager[Any]:
    """The workspace lock for the run: the one `milora run` holds (annotated with this flow run), or a new one."""
    if (lock := held_lock(root)) is not None:
        lock.annotate(flow_run_id=flow_run_id)
        return contextlib.nullcontext()
    return WorkspaceLock(root, flow_run_id=flow_run_id, command=f"flow {FLOW_NAME}").acquire()


def _publish(report: RunReport, t0: float) -> None:
    """Finish the report: timings, metrics, `.milora/last_run.json` and the markdown artifact."""
    report.seconds, report.metrics = round(time.perf_counter() - t0, 3), read_metrics(report.root)
    try:
        report.save()
    except OSError as exc:
        log.warning("could not save the run report: %s", exc)
    try:
        create_markdown_artifact(render_markdown(report), key=REPORT_KEY,
                                 description=f"{FLOW_NAME} run: {report.status}")
    except Exception as exc:  # the report must never fail a run
        log.warning("could not create the report artifact: %s", exc)


def _failed(exc: BaseException) -> State:
    """End the flow run Failed with the error's one-line message (calling the flow raises `exc`)."""
    get_run_logger().error("%s", exc)
    return Failed(message=str(exc), data=exc)
