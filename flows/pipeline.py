"""The `milora-pipeline` Prefect flow: the DVC stages as tasks, then MLflow registration.

The flow orchestrates and never computes. Each stage task runs `dvc repro --single-item <stage>` in the
project root (DVC skips a stage whose deps, params and outs did not change, and `train` resumes from
`checkpoints/` by itself), streaming the stage's output into the task's log; `register` runs
`milora register`. What the flow adds is the operator's view and the rules around the stages:

* parameters: `overrides` (dotted `params.yaml` keys, validated by the typed config before anything
  runs), `model_name` (the registered model), `root` (the project) and `params` (another params file);
  overrides are written into `params.yaml` for the run and the original is put back afterwards
  (`flows.params`), because DVC and the stages read `params.yaml`;
* one run per workspace: the flow holds `milora.pipeline.lock.WorkspaceLock` for its whole duration
  (`milora run` takes it before Prefect starts; the flow then uses that one);
* retries with backoff only for transient failures (a stage killed by a signal, an unreachable server,
  as the step's structured result says), `flow.retries` times, `flow.retry_delays` apart (params); a
  config or data error (exit 2) or a bug (exit 3) fails at once; the failing step's own message is the
  flow run's final message;
* scheduled semantics: the `ingest` stage is forced first, so the data source's current contents are
  versioned (a new `data/raw` hash when rows changed); when then every stage is up to date and this
  exact pipeline state was already registered, the run ends as "nothing to retrain";
* artifacts: a markdown report per run and a progress bar updated across stages and during training.

The return value is the metrics of the run, `{stage: metrics/<stage>.json}`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run as runtime_flow_run
from prefect.runtime import task_run as runtime_task_run
from prefect.states import Completed, Failed, State

from flows.dvc import (
    DvcResult,
    StageFailed,
    dvc_command,
    pipeline_status,
    repro_outcome,
    run_streamed,
    step_failure,
    venv_env,
)
from flows.params import parse_overrides, run_params, validate_run_config
from flows.report import REGISTERED_FILE, RunReport, read_metrics, registration_line, render_markdown
from flows.workspace import is_workspace, keep_after_failure, remove_after_success
from milora.core.errors import UserError
from milora.core.io import read_json, write_json
from milora.pipeline.config import Config, FlowConfig
from milora.pipeline.dvcstate import default_remote, lock_digest, lock_record, out_hash, stage_order
from milora.pipeline.lock import WorkspaceBusy, WorkspaceLock, held_lock
from milora.pipeline.paths import Paths
from milora.pipeline.results import TOKEN_ENV, StepResult, read_result
from milora.tracking.identity import ENV_PREFECT_FLOW_RUN

FLOW_NAME = "milora-pipeline"
INGEST = "ingest"  # forced on every run: it reads the data source's current contents
DATA_OUT = "data/raw"
REGISTER = "register"
PUSH_DATA = "push-data"
NOTHING_TO_RETRAIN = "nothing to retrain"
PROGRESS_KEY = "milora-progress"
REPORT_KEY = "milora-run-report"

# Transient failures are retried this many times, waiting this long before each retry (seconds): the
# defaults of the tasks; a run uses its params' `flow.retries` / `flow.retry_delays` (see `with_retries`).
RETRIES = FlowConfig().retries
RETRY_DELAYS = FlowConfig().delays()


def with_retries(task: Any, policy: FlowConfig) -> Any:
    """`task` retrying transient failures `policy.retries` times, `policy.delays()` seconds apart."""
    return task.with_options(retries=policy.retries, retry_delay_seconds=policy.delays() or 0)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only failures classified transient (see `flows.dvc`)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.kind == "transient"


class _Progress:
    """The run's progress artifact: equal shares per step, the train step moved by its own progress."""

    def __init__(self, steps: list[str]):
        self.steps = steps
        self.artifact_id: uuid.UUID | None = None
        try:
            self.artifact_id = create_progress_artifact(
                0.0, key=PROGRESS_KEY, description=f"milora-pipeline: {' -> '.join(steps)}")
        except Exception as exc:  # the report must never fail a run
            logging.getLogger(__name__).warning("could not create the progress artifact: %s", exc)

    def span(self, step: str) -> tuple[float, float]:
        i, n = self.steps.index(step), len(self.steps)
        return 100.0 * i / n, 100.0 * (i + 1) / n


def _set_progress(artifact_id: str | None, value: float, description: str | None = None) -> None:
    if not artifact_id:
        return
    try:
        update_progress_artifact(uuid.UUID(artifact_id), max(0.0, min(100.0, value)), description=description)
    except Exception as exc:  # a progress bar must never fail a stage
        get_run_logger().debug("progress update failed: %s", exc)


def _train_fraction(root: Path, since: float) -> float | None:
    """Training progress from `checkpoints/progress.json` (written by the train stage at each log), if
    written after `since` (a file left by an earlier run says nothing about this one)."""
    path = Paths(root).checkpoints_dir / "progress.json"
    try:
        if path.stat().st_mtime < since:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return min(1.0, float(data["step"]) / float(data["max_steps"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _inherited_fds(root: Path) -> tuple[int, ...]:
    """The workspace lock's descriptor, so a stage outliving this process keeps the workspace locked."""
    lock = held_lock(root)
    return (lock.fileno(),) if lock is not None else ()


# DVC's hints after each stage (about git, autostage, push): noise in a task log (display only).
_DVC_HINTS = ("To track the changes with git, run:", "git add ", "To enable auto staging, run:",
              "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")


def _log_line(logger: Any, line: str) -> None:
    text = line.strip()
    if text and not text.startswith(_DVC_HINTS):
        logger.info(line.rstrip())


def _run_step(name: str, cmd: list[str], root: Path, on_tick: Any = None, result_step: str | None = None,
              env: dict[str, str] | None = None) -> tuple[DvcResult, int, StepResult | None]:
    """Run one step's subprocess with its output in the task log, under a fresh run token.

    Returns the command's result, the attempt number and the structured result the step wrote under this
    token (None when DVC skipped it); raises `StageFailed` from that result if the command failed."""
    logger = get_run_logger()
    attempt = runtime_task_run.run_count or 1
    task_ctx = TaskRunContext.get()
    attempts = (task_ctx.task.retries if task_ctx is not None else RETRIES) + 1
    token = uuid.uuid4().hex
    result = run_streamed(cmd, cwd=root, env=venv_env({**(env or {}), TOKEN_ENV: token}), on_line=lambda ln: _log_line(logger, ln),
                          on_tick=on_tick, pass_fds=_inherited_fds(root))
    step = read_result(root, result_step, token) if result_step else None
    if result.returncode != 0:
        exc = step_failure(name, result.returncode, step, result.output, attempt, round(result.seconds, 3),
                           attempts)
        logger.error("%s", exc)
        raise exc
    return result, attempt, step


@task(name="stage", task_run_name="{stage}", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_transient, cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, root: str, force: bool = False, progress_id: str | None = None,
              progress_span: tuple[float, float] = (0.0, 100.0), sync: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item STAGE` in `root`, its output streamed into this task's log.

    With `sync` (a worker's workspace with a DVC remote: `flows.workspace`), DVC pulls what the stage needs from
    the remote (`--pull`: inputs, run cache) and pushes the stage's outputs and run cache unless it restored them.
    Returns the `StageRun` fields as a dict; raises `StageFailed` (kind transient/user/internal)."""
    rootp = Path(root)
    lo, hi = progress_span
    _set_progress(progress_id, lo, f"{stage}: running")
    on_tick = None
    if stage == "train":
        started = time.time()

        def on_tick() -> None:
            frac = _train_fraction(rootp, started)
            if frac is not None:
                _set_progress(progress_id, lo + (hi - lo) * frac, f"train: {100 * frac:.0f}% of the steps")

    args = ["repro", "--single-item", *(["--force"] if force else []), *(["--pull"] if sync else []), stage]
    get_run_logger().info("$ dvc %s", " ".join(args))
    before = lock_record(rootp, stage)
    result, attempt, step = _run_step(stage, dvc_command(*args), rootp, on_tick, result_step=stage)
    outcome = repro_outcome(step, before, lock_record(rootp, stage))
    if sync and outcome != "restored":  # (a skipped stage too: an earlier attempt may have run it, not pushed)
        get_run_logger().info("$ dvc push --run-cache %s", stage)
        _run_step(f"push {stage}", dvc_command("push", "--run-cache", stage), rootp)
    _set_progress(progress_id, hi, f"{stage}: {outcome}")
    get_run_logger().info("stage %s: %s in %.1fs", stage, outcome, result.seconds)
    return {"name": stage, "outcome": outcome, "seconds": round(result.seconds, 3),
            "compute_seconds": step.seconds if step else None, "attempts": attempt}


@task(name=PUSH_DATA, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, persist_result=False)
def push_data(root: str, stage: str = INGEST) -> dict[str, Any]:
    """`dvc push STAGE`: send the new data version to the DVC default remote (no-op without one)."""
    rootp = Path(root)
    remote = default_remote(rootp)
    if remote is None:
        get_run_logger().info("no DVC default remote: the data version stays in the local cache only")
        return {"remote": None, "seconds": 0.0, "attempts": 0}
    get_run_logger().info("$ dvc push %s  (remote %s)", stage, remote)
    # through DVC's API in `flows.push`, which records a structured result: an unreachable remote is transient
    cmd = [sys.executable, "-m", "flows.push", str(rootp), stage]
    result, attempt, _ = _run_step(PUSH_DATA, cmd, rootp, result_step=PUSH_DATA)
    return {"remote": remote, "seconds": round(result.seconds, 3), "attempts": attempt}


@task(name="register", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, persist_result=False)
def register(root: str, flow_run_id: str | None = None, progress_id: str | None = None,
             progress_span: tuple[float, float] = (0.0, 100.0)) -> dict[str, Any]:
    """`milora register`: log the run to MLflow, register a version as `challenger`, run the champion gate.

    Returns `{"decision": registration_summary(...), "seconds": ..., "attempts": ...}`."""
    _set_progress(progress_id, progress_span[0], "register: running")
    get_run_logger().info("$ milora register --root %s", root)
    cmd = [sys.executable, "-m", "milora.cli", "register", "--root", root]
    env = {ENV_PREFECT_FLOW_RUN: flow_run_id} if flow_run_id else None
    result, attempt, step = _run_step(REGISTER, cmd, Path(root), result_step=REGISTER, env=env)
    decision = registration_summary(step.data if step else {}, Path(root))
    get_run_logger().info("register: %s", registration_line(decision))
    _set_progress(progress_id, progress_span[1], "register: done")
    return {"decision": decision, "seconds": round(result.seconds, 3), "attempts": attempt}


def registration_summary(reg: dict[str, Any], root: Path) -> dict[str, Any]:
    """The registration as the report shows it, from the register step's structured result (`data`: version,
    decision, both metric values) and `metrics/register.json` (tracking URI, MLflow run link)."""
    written: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        written = read_json(Paths(root).metrics("register"))
    d = reg.get("decision") or {}
    out = {"model_name": reg.get("model_name", written.get("model_name")),
           "version": reg.get("version", written.get("version")),
           "run_id": reg.get("run_id", written.get("run_id")),
           "model_uri": reg.get("model_uri", written.get("model_uri")),
           "created": reg.get("created"),
           "reused": reg.get("reused"),
           "promoted": d.get("promote", written.get("promoted")),
           "reason": d.get("reason", written.get("reason")),
           "metric": d.get("metric", written.get("metric")),
           "challenger_value": d.get("challenger_value", written.get("challenger_value")),
           "champion_value": d.get("champion_value", written.get("champion_value")),
           "champion_version": d.get("champion_version", written.get("champion_version")),
           "tracking_uri": written.get("tracking_uri")}
    if out["promoted"] is not None:
        out["decision"] = "promoted to champion" if out["promoted"] else "champion kept"
    uri = out["tracking_uri"] or ""
    if out["run_id"] and uri.startswith(("http://", "https://")):
        out["run_url"] = f"{uri.rstrip('/')}/#/runs/{out['run_id']}"
    return {k: v for k, v in out.items() if v is not None}


def _read_registered(root: Path) -> dict[str, Any] | None:
    path = root / REGISTERED_FILE
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None


def _record_stage(report: RunReport, result: dict[str, Any]) -> None:
    s = report.stage(result["name"])
    s.outcome, s.seconds = result["outcome"], result["seconds"]
    s.compute_seconds, s.attempts = result.get("compute_seconds"), result.get("attempts", 1)


def _record_failure(report: RunReport, name: str, exc: BaseException) -> None:
    s = report.stage(name)
    s.outcome = "failed"
    if isinstance(exc, StageFailed):
        s.attempts, s.seconds, s.detail = exc.attempt, exc.seconds, exc.detail
    else:
        s.attempts, s.detail = max(s.attempts, 1), f"{type(exc).__name__}: {exc}"


def _publish(report: RunReport, t0: float) -> None:
    """Finish the report: timings, metrics, the markdown artifact and `.milora/last_run.json`."""
    report.seconds = round(time.perf_counter() - t0, 3)
    report.metrics = read_metrics(report.root)
    try:
        report.save()
    except OSError as exc:
        logging.getLogger(__name__).warning("could not save the run report: %s", exc)
    try:
        create_markdown_artifact(render_markdown(report), key=REPORT_KEY,
                                 description=f"milora-pipeline run: {report.status}")
    except Exception as exc:  # the report must never fail a run
        logging.getLogger(__name__).warning("could not create the report artifact: %s", exc)


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
    t0 = time.perf_counter()
    rootp = Path(root).expanduser().resolve()
    # Validate before anything runs: a bad key or value fails here, with no task run at all. String values
    # are read as YAML 1.2, as `-S` values and params.yaml are (`"3e-4"` is 0.0003).
    try:
        overrides = parse_overrides(overrides)
        if model_name:
            overrides["register.model_name"] = model_name
        validate_run_config(rootp, params, overrides)
        stages = stage_order(rootp)
    except UserError as exc:
        return _failed(exc)
    report = _new_report(rootp, stages, overrides, params)
    get_run_logger().info("workspace %s; stages %s; overrides %s", rootp, " -> ".join(stages),
                          overrides or "none")
    try:
        holding = _hold_workspace(rootp, report.flow_run_id)
    except WorkspaceBusy as exc:
        return _failed(exc)
    with holding, run_params(rootp, params, overrides) as cfg:
        run = _PipelineRun(rootp, report, cfg, _Progress([*stages, REGISTER]),
                           sync=is_workspace(rootp) and default_remote(rootp) is not None)
        try:  # any failure: record it in the report and the artifact, then fail the flow run with it
            run.execute(stages)
        except BaseException as exc:
            _record_failure(report, run.current, exc)
            report.status, report.message = "failed", str(exc)
            _publish(report, t0)
            if isinstance(exc, (StageFailed, UserError)):
                return _failed(exc)  # its message says it all: no traceback in the logs
            raise
    _publish(report, t0)
    return Completed(message=report.message, data=report.metrics)  # the message shows in the Prefect UI


def _new_report(root: Path, stages: list[str], overrides: dict[str, Any], params: str | None) -> RunReport:
    """The run's report, listing every step it will take in order (ingest is followed by push-data)."""
    report = RunReport(root=str(root), flow_run_id=runtime_flow_run.id, flow_run_name=runtime_flow_run.name,
                       flow_run_url=runtime_flow_run.ui_url, overrides=overrides,
                       params_file=str(params or "params.yaml"),
                       started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for name in stages:
        report.stage(name)
        if name == INGEST:
            report.stage(PUSH_DATA)
    report.stage(REGISTER)
    return report


def _hold_workspace(root: Path, flow_run_id: str) -> contextlib.AbstractContextManager[Any]:
    """The workspace lock for the run: the one `milora run` already holds (annotated with this flow run), or a
    new one taken here (raises `WorkspaceBusy`)."""
    lock = held_lock(root)  # `milora run` takes it before starting Prefect
    if lock is not None:
        lock.annotate(flow_run_id=flow_run_id)
        return contextlib.nullcontext()
    lock = WorkspaceLock(root, flow_run_id=flow_run_id, command=f"flow {FLOW_NAME}")
    lock.acquire()
    return lock


class _PipelineRun:
    """One run's steps in order: forced ingest and push of the data version, the stages DVC finds out of date,
    then registration, each a retrying task recorded in the report; `current` names the step in progress."""

    def __init__(self, root: Path, report: RunReport, cfg: Config, progress: _Progress, sync: bool):
        self.root, self.report, self.cfg, self.progress, self.sync = root, report, cfg, progress, sync
        self.pid = str(progress.artifact_id) if progress.artifact_id else None
        self.current = progress.steps[0]

    def execute(self, stages: list[str]) -> None:
        rest = stages
        if INGEST in stages:
            self.ingest()
            rest = [s for s in stages if s != INGEST]
        self.current = "dvc status"
        pending = pipeline_status(self.root)
        if not pending and self.already_registered(rest):
            return
        for name in rest:
            self.current = name
            if pending:
                self.stage(name)
            else:
                self.report.stage(name).outcome = "up to date"
        self.register()

    def stage(self, name: str, force: bool = False) -> None:
        _record_stage(self.report, with_retries(run_stage, self.cfg.flow)(
            name, str(self.root), force=force, progress_id=self.pid, progress_span=self.progress.span(name),
            sync=self.sync))

    def ingest(self) -> None:
        """Version the data source's current contents (forced), then push that version to the DVC remote."""
        self.current = INGEST
        before = out_hash(self.root, INGEST, DATA_OUT)
        self.stage(INGEST, force=True)
        self.report.data_version = out_hash(self.root, INGEST, DATA_OUT)
        self.report.data_changed = self.report.data_version != before
        self.current = PUSH_DATA
        pushed = with_retries(push_data, self.cfg.flow)(str(self.root))
        s = self.report.stage(PUSH_DATA)
        s.outcome = "ran" if pushed["remote"] else "no remote"
        s.seconds, s.attempts = pushed["seconds"], pushed["attempts"]

    def already_registered(self, rest: list[str]) -> bool:
        """With every stage up to date: whether this whole pipeline state (dvc.lock: data version, params, code
        and outputs of every stage) was last registered from this workspace under this model name; if so the
        run ends here as "nothing to retrain"."""
        last = _read_registered(self.root) or {}
        if last.get("lock") != lock_digest(self.root) or last.get("model_name") != self.cfg.register.model_name:
            return False
        report = self.report
        for name in rest:
            report.stage(name).outcome = "up to date"
        report.stage(REGISTER).outcome = "already registered"
        report.registration = {
            **(last.get("registration") or {}), "skipped": True,
            "reason": f"{NOTHING_TO_RETRAIN}: data and params unchanged since {last.get('model_name')} "
                      f"version {last.get('version')} was registered"}
        report.status, report.message = NOTHING_TO_RETRAIN, (
            f"{NOTHING_TO_RETRAIN}: data version {report.data_version} and params unchanged since "
            f"the last registered run")
        _set_progress(self.pid, 100.0, NOTHING_TO_RETRAIN)
        get_run_logger().info(report.message)
        return True

    def register(self) -> None:
        """`milora register`, then remember the registered pipeline state in `REGISTERED_FILE`."""
        self.current, report = REGISTER, self.report
        reg = with_retries(register, self.cfg.flow)(str(self.root), flow_run_id=report.flow_run_id,
                                                    progress_id=self.pid, progress_span=self.progress.span(REGISTER))
        s = report.stage(REGISTER)
        s.outcome, s.seconds, s.attempts = "ran", reg["seconds"], reg["attempts"]
        report.registration = reg["decision"]
        write_json(self.root / REGISTERED_FILE, {
            "lock": lock_digest(self.root), "model_name": self.cfg.register.model_name,
            "version": report.registration.get("version"), "data_version": report.data_version,
            "flow_run_id": report.flow_run_id, "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "registration": report.registration})
        report.status = "completed"
        ran = report.ran
        report.message = (f"ran {', '.join(ran)}" if ran else "every stage was up to date") + \
            f"; {registration_line_short(report.registration)}"
        _set_progress(self.pid, 100.0, "done")


def _failed(exc: BaseException) -> State:
    """End the flow run Failed with the error's one-line message (calling the flow raises `exc`)."""
    get_run_logger().error("%s", exc)
    return Failed(message=str(exc), data=exc)


def registration_line_short(reg: dict[str, Any] | None) -> str:
    """`registered <name> v<version> (<decision>)` for the run's message."""
    if not reg:
        return "nothing registered"
    if reg.get("reused"):
        return (f"already registered as {reg.get('model_name', '?')} v{reg.get('version', '?')} "
                "(a byte-identical adapter)")
    text = f"registered {reg.get('model_name', '?')} v{reg.get('version', '?')}"
    return text + (f" ({reg['decision']})" if reg.get("decision") else "")
