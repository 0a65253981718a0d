"""What a pipeline run did, as data (`RunReport`, filled in step by step by the flow), as the run's markdown
artifact and as the summary `milora run` prints. No Prefect, DVC or MLflow calls here: the registration is read
from the register step's structured result and `metrics/register.json`."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flows.steps import StageFailed
from milora.core.io import read_json, write_json
from milora.pipeline.paths import Paths
from milora.pipeline.retrain import NOTHING_TO_RETRAIN

REPORT_FILE = Path(".milora") / "last_run.json"

# How each stage outcome reads in the artifact and the summary.
OUTCOME_TEXT = {
    "ran": "ran",
    "skipped": "skipped (unchanged)",
    "restored": "restored from DVC run cache",
    "up to date": "skipped (pipeline up to date)",
    "failed": "FAILED",
    "not run": "not run",
    "no remote": "skipped (no DVC default remote)",
    "already registered": "skipped (this pipeline state is already registered)",
}


@dataclass
class StageRun:
    """One stage (or the register step) in one flow run."""

    name: str
    outcome: str = "not run"  # ran | skipped | restored | up to date | failed | not run
    seconds: float = 0.0  # wall time of its subprocess (DVC + the stage), 0 when not invoked
    compute_seconds: float | None = None  # the stage's own time, as `milora stage` logs it
    attempts: int = 0
    detail: str | None = None

    @property
    def executed(self) -> bool:
        """Whether the stage's command actually ran (as opposed to DVC skipping it)."""
        return self.outcome in ("ran", "failed")


@dataclass
class RunReport:
    """Everything the artifact and the summary show about one flow run."""

    root: str
    status: str = "running"  # completed | nothing to retrain | failed
    message: str = ""
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    flow_run_url: str | None = None
    started_at: str | None = None
    seconds: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)
    params_file: str = "params.yaml"
    data_version: str | None = None
    data_changed: bool | None = None
    stages: list[StageRun] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    registration: dict[str, Any] | None = None

    def stage(self, name: str) -> StageRun:
        """The entry of stage `name` (created on first use, in call order)."""
        for s in self.stages:
            if s.name == name:
                return s
        s = StageRun(name)
        self.stages.append(s)
        return s

    @classmethod
    def planned(cls, root: str | os.PathLike[str], steps: list[str], **fields: Any) -> RunReport:
        """A new report listing every step the run will take, in order, none run yet."""
        report = cls(root=str(root), **fields)
        for name in steps:
            report.stage(name)
        return report

    def record(self, result: dict[str, Any]) -> None:
        """A finished stage task's result (`name`, `outcome`, `seconds`, ...)."""
        s = self.stage(result["name"])
        s.outcome, s.seconds = result["outcome"], result["seconds"]
        s.compute_seconds, s.attempts = result.get("compute_seconds"), result.get("attempts", 1)

    def record_failure(self, name: str, exc: BaseException) -> None:
        """Step `name` failed with `exc`: the run failed, with the error's message."""
        s = self.stage(name)
        s.outcome = "failed"
        if isinstance(exc, StageFailed):
            s.attempts, s.seconds, s.detail = exc.attempt, exc.seconds, exc.detail
        else:
            s.attempts, s.detail = max(s.attempts, 1), f"{type(exc).__name__}: {exc}"
        self.status, self.message = "failed", str(exc)

    def nothing_to_retrain(self, last: dict[str, Any], stages: list[str], register: str) -> None:
        """Every stage was up to date and this pipeline state was registered already (`last`): the run ends."""
        for name in stages:
            self.stage(name).outcome = "up to date"
        self.stage(register).outcome = "already registered"
        self.registration = {
            **(last.get("registration") or {}), "skipped": True,
            "reason": f"{NOTHING_TO_RETRAIN}: data and params unchanged since {last.get('model_name')} "
                      f"version {last.get('version')} was registered"}
        self.status, self.message = NOTHING_TO_RETRAIN, (
            f"{NOTHING_TO_RETRAIN}: data version {self.data_version} and params unchanged since "
            f"the last registered run")

    def registered(self, register: str, reg: dict[str, Any]) -> None:
        """The register task's result: the run completed."""
        s = self.stage(register)
        s.outcome, s.seconds, s.attempts = "ran", reg["seconds"], reg["attempts"]
        self.registration = reg["decision"]
        self.status = "completed"
        self.message = (f"ran {', '.join(self.ran)}" if self.ran else "every stage was up to date") + \
            f"; {registration_line_short(self.registration)}"

    @property
    def ran(self) -> list[str]:
        """Names of the stages whose command ran."""
        return [s.name for s in self.stages if s.executed]

    @property
    def stage_seconds(self) -> float:
        """Sum of the stage subprocesses' wall times."""
        return sum(s.seconds for s in self.stages)

    @property
    def overhead(self) -> float | None:
        """Share of the flow's wall time spent outside stage subprocesses (orchestration)."""
        if self.seconds <= 0:
            return None
        return max(0.0, self.seconds - self.stage_seconds) / self.seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunReport:
        """Inverse of `to_dict`."""
        data = dict(data)
        data["stages"] = [StageRun(**s) for s in data.get("stages", [])]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> Path:
        """Write the report to `<root>/.milora/last_run.json` (atomically)."""
        return write_json(Path(self.root) / REPORT_FILE, self.to_dict())


def load_report(root: str | os.PathLike[str]) -> RunReport | None:
    """The report of the last flow run in `root`, if any."""
    path = Path(root) / REPORT_FILE
    return RunReport.from_dict(read_json(path)) if path.exists() else None


def read_metrics(root: str | os.PathLike[str]) -> dict[str, Any]:
    """`metrics/<stage>.json` of every stage that wrote one, keyed by stage (what `dvc metrics show` shows)."""
    out: dict[str, Any] = {}
    mdir = Path(root) / "metrics"
    for path in sorted(mdir.glob("*.json")) if mdir.is_dir() else []:
        try:
            out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return out


def registration_summary(reg: dict[str, Any], root: str | os.PathLike[str]) -> dict[str, Any]:
    """The registration as the report shows it, from the register step's structured result (`data`: version,
    decision, both metric values) and `metrics/register.json` (tracking URI, MLflow run link)."""
    written: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        written = read_json(Paths(Path(root)).metrics("register"))
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


def registration_line_short(reg: dict[str, Any] | None) -> str:
    """`registered <name> v<version> (<decision>)` for the run's message."""
    if not reg:
        return "nothing registered"
    if reg.get("reused"):
        return (f"already registered as {reg.get('model_name', '?')} v{reg.get('version', '?')} "
                "(a byte-identical adapter)")
    text = f"registered {reg.get('model_name', '?')} v{reg.get('version', '?')}"
    return text + (f" ({reg['decision']})" if reg.get("decision") else "")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _scalars(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows.extend(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            rows.append((f"{prefix}{k}", v))
    return rows


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.1f}"


def registration_line(reg: dict[str, Any] | None) -> str:
    """One sentence: what registration decided (or why there was none)."""
    if not reg:
        return "nothing registered"
    if reg.get("skipped"):
        return str(reg.get("reason") or "nothing registered")
    name, version = reg.get("model_name"), reg.get("version")
    if reg.get("reused"):
        head = (f"already registered: {name} version {version} holds this exact adapter (same weights, base "
                "and data); nothing new registered")
        if reg.get("decision"):
            head += f"; its champion gate decision: {reg['decision']}"
        return head + (f" ({reg['reason']})" if reg.get("reason") else "")
    head = f"registered {name} version {version} as challenger" if version else "registration ran"
    decision = reg.get("decision")
    if decision:
        head += f"; champion gate: {decision}"
    if reg.get("reason"):
        head += f" ({reg['reason']})"
    return head


def render_markdown(report: RunReport) -> str:
    """The run's markdown artifact: outcome, stages with timings, data version, metrics, registration."""
    title = report.flow_run_name or report.flow_run_id or "run"
    lines = [f"# milora-pipeline `{title}`: {report.status}", ""]
    if report.message:
        lines += [f"> {_md_escape(report.message)}", ""]
    lines += [
        f"* Workspace: `{report.root}`; params: `{report.params_file}`"
        + (f" with overrides `{json.dumps(report.overrides, sort_keys=True)}`" if report.overrides else ""),
        f"* Data version: `{report.data_version or 'unknown'}`"
        + ("" if report.data_changed is None else (" (changed since the last run)" if report.data_changed
                                                  else " (unchanged)")),
        f"* Flow wall time: {report.seconds:.1f} s; stage subprocesses: {report.stage_seconds:.1f} s"
        + (f"; orchestration overhead: {100 * report.overhead:.1f}%" if report.overhead is not None else ""),
        "",
        "## Stages",
        "",
        "| stage | outcome | wall (s) | stage compute (s) | attempts |",
        "|---|---|---:|---:|---:|",
    ]
    for s in report.stages:
        outcome = OUTCOME_TEXT.get(s.outcome, s.outcome)
        if s.detail and s.outcome == "failed":
            outcome += f": {_md_escape(s.detail)}"
        lines.append(f"| {s.name} | {outcome} | {_seconds(s.seconds) if s.attempts else ''} | "
                     f"{_seconds(s.compute_seconds)} | {s.attempts or ''} |")
    lines += ["", "## Metrics", ""]
    rows = [(f"{stage}.{k}", v) for stage, m in report.metrics.items() if isinstance(m, dict)
            for k, v in _scalars(m)]
    if rows:
        lines += ["| metric | value |", "|---|---:|"] + [f"| {_md_escape(k)} | {_fmt(v)} |" for k, v in rows]
    else:
        lines.append("no metrics yet")
    lines += ["", "## Registration", "", registration_line(report.registration)]
    reg = report.registration or {}
    for label, key in (("Challenger", "challenger_value"), ("Champion", "champion_value"),
                       ("Champion version", "champion_version")):
        if reg.get(key) is not None:
            lines.append(f"* {label}: {_fmt(reg[key])}")
    lines += [f"* {label}: {text}" for label, text in _registration_refs(
        reg, code=lambda t: f"`{t}`", link=lambda text, url: f"[{text}]({url})")]
    return "\n".join(lines) + "\n"


def _registration_refs(reg: dict[str, Any], code: Any, link: Any) -> list[tuple[str, str]]:
    """(label, text) of the registered model's URI and its MLflow run (a link, else its id in its store), with
    `code(text)` and `link(text, url)` formatting them for the output at hand."""
    refs = []
    if reg.get("model_uri"):
        refs.append(("MLflow model", code(reg["model_uri"])))
    if reg.get("run_url"):
        refs.append(("MLflow run", link(reg.get("run_id", "run"), reg["run_url"])))
    elif reg.get("run_id"):
        refs.append(("MLflow run", f"{code(reg['run_id'])} in {code(reg.get('tracking_uri') or 'the MLflow store')}"))
    return refs


def render_summary(report: RunReport, adapter_dir: str | None = None, runs_hint: str | None = None) -> str:
    """The plain-text summary `milora run` prints at the end."""
    head = f"milora run: {report.status}"
    if report.message and report.status != "failed":  # a failure's message ends the output on its own
        head = (f"milora run: {report.message}" if report.message.startswith(report.status)
                else f"{head} ({report.message})")
    out = [head, ""]
    out.append("stages:")
    width = max((len(s.name) for s in report.stages), default=8)
    for s in report.stages:
        timing = f"{s.seconds:6.1f}s" if s.attempts else " " * 7
        compute = f"  (stage {s.compute_seconds:.1f}s)" if s.compute_seconds is not None else ""
        tries = f"  [{s.attempts} attempts]" if s.attempts > 1 else ""
        detail = f": {s.detail}" if s.detail and s.outcome == "failed" else ""
        out.append(f"  {s.name:<{width}}  {timing}  {OUTCOME_TEXT.get(s.outcome, s.outcome)}{compute}{tries}{detail}")
    overhead = f", orchestration overhead {100 * report.overhead:.1f}%" if report.overhead is not None else ""
    out.append(f"  flow {report.seconds:.1f}s, stage subprocesses {report.stage_seconds:.1f}s{overhead}")
    out += ["", f"data version: {report.data_version or 'unknown'}"
            + ("" if report.data_changed is None else (" (changed)" if report.data_changed else " (unchanged)"))]
    ev = report.metrics.get("eval") if isinstance(report.metrics.get("eval"), dict) else None
    if ev:
        out += ["", "eval metrics:"] + [f"  {k}: {_fmt(v)}" for k, v in _scalars(ev)]
    tr = report.metrics.get("train") if isinstance(report.metrics.get("train"), dict) else None
    if tr:
        keys = [k for k in ("steps", "train_loss", "final_loss", "loss", "seconds") if k in tr]
        if keys:
            out += ["train: " + ", ".join(f"{k} {_fmt(tr[k])}" for k in keys)]
    out += ["", "model:"]
    if adapter_dir:
        out.append(f"  adapter: {adapter_dir}")
    reg = report.registration or {}
    out.append(f"  {registration_line(reg)}")
    out += [f"  {label}: {text}" for label, text in _registration_refs(reg, code=str, link=lambda text, url: url)]
    uri = reg.get("tracking_uri") or ""
    if not reg.get("run_url") and reg.get("run_id") and uri.startswith("sqlite:"):
        out.append(f"  browse MLflow: mlflow ui --backend-store-uri {uri}")
    if report.flow_run_url or runs_hint:
        out += ["", "runs:"]
        if report.flow_run_url:
            out.append(f"  Prefect flow run: {report.flow_run_url}")
        if runs_hint:
            out.append(f"  {runs_hint}")
    return "\n".join(out) + "\n"
