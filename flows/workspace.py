"""Isolated workspaces: a pipeline run started by a Prefect worker works in its own checkout of the project.

The deployments of `prefect.yaml` carry two steps of this module:

* build (`prefect deploy`, run in the project): `source` names the repository and the commit being deployed,
  and the schedule of params.yaml (`schedule.cron` / `schedule.timezone`) for `nightly-retrain`;
* pull (on the worker, before each flow run): `checkout` gives the run its workspace,
  `$MILORA_WORKSPACES/<flow run id>` (default `~/.cache/milora/workspaces`): a git clone at that commit whose
  DVC remotes are the project's (a relative local remote is resolved against the source checkout), with a DVC
  cache shared by the workspaces of the machine, a relative `svd.cache` linked to one cache shared by them
  too (an absolute directory or `s3://` cache is shared as it is), and MLflow on the shared tracking server
  (`MLFLOW_TRACKING_URI`; without one, a local source project's embedded store). The stages then run the
  checkout's code (it is put first on `PYTHONPATH`).

The flow (`flows.pipeline`) pulls what each stage needs from the DVC remote (`dvc repro --pull`: missing
inputs, and the run cache, so a stage another run already ran with the same inputs is restored rather than
re-run) and pushes what each stage produced (outputs and run cache). The hooks below remove the workspace when
the flow run completes and keep it when it fails or crashes: a retry of that flow run (`prefect flow-run retry
ID`) comes back to the same workspace, skips the completed stages and resumes `train` from its checkpoints.
A workspace is a project like any other: the workspace lock still allows one run at a time in it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from milora.core.errors import InvalidInput, MissingInput
from milora.core.io import read_json, write_json

log = logging.getLogger("prefect.milora.workspace")  # shown in the worker's output with the pull step's

ENV_WORKSPACES = "MILORA_WORKSPACES"  # where a worker keeps the workspaces of its runs
ENV_REPOSITORY = "MILORA_REPOSITORY"  # the repository the runs clone, if not the deploying checkout's origin
ENV_FLOW_RUN = "PREFECT__FLOW_RUN_ID"  # set by the worker for the flow-run process
MARKER = Path(".milora") / "workspace.json"
DVC_CACHE = ".dvc-cache"  # under the workspaces directory: one DVC cache for the machine's workspaces
SVD_CACHE = ".svd_cache"  # under the workspaces directory: where a relative svd.cache of a workspace points


def default_workspaces() -> Path:
    """`$MILORA_WORKSPACES`, else `~/.cache/milora/workspaces`."""
    return Path(os.environ.get(ENV_WORKSPACES) or Path.home() / ".cache" / "milora" / "workspaces").expanduser()


def _git(*args: str, cwd: str | os.PathLike[str] | None = None, check: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise InvalidInput(f"git {' '.join(args)} failed in {cwd or os.getcwd()}: "
                           f"{(out.stderr or out.stdout).strip().splitlines()[-1:] or out.returncode}")
    return out.stdout.strip()


def _is_local(repository: str) -> bool:
    return "://" not in repository and not repository.startswith("git@") and Path(repository).is_dir()


# --------------------------------------------------------------------------------------------------- build step


def source(directory: str = ".", params: str | None = None, cron: str | None = None,
           timezone: str | None = None) -> dict[str, Any]:
    """Build step of `prefect.yaml` (runs at `prefect deploy`): what the deployment's runs check out.

    Returns `repository` (`$MILORA_REPOSITORY`, else the checkout's `origin`, else the checkout's own path),
    `commit` (HEAD; uncommitted changes are not deployed, and a warning says so) and the schedule `cron` /
    `timezone` (params.yaml's `schedule` section unless given)."""
    from flows.params import validate_run_config
    from milora.pipeline.config import check_cron, check_timezone

    root = Path(_git("rev-parse", "--show-toplevel", cwd=directory))
    commit = _git("rev-parse", "HEAD", cwd=root)
    repository = os.environ.get(ENV_REPOSITORY) or _git("config", "--get", "remote.origin.url", cwd=root,
                                                        check=False) or str(root)
    if _git("status", "--porcelain", "--untracked-files=no", cwd=root):
        print(f"warning: {root} has uncommitted changes; the deployment runs commit {commit[:12]} without them")
    if not _is_local(repository) and not _git("branch", "-r", "--contains", commit, cwd=root, check=False):
        print(f"warning: commit {commit[:12]} is on no remote branch; push it so that workers can fetch it "
              f"from {repository}")
    cfg = validate_run_config(root, params)
    try:
        cron, timezone = check_cron(cron or cfg.schedule.cron), check_timezone(timezone or cfg.schedule.timezone)
    except ValueError as exc:
        raise InvalidInput(f"deployment schedule: {exc}") from None
    return {"repository": repository, "commit": commit, "cron": cron, "timezone": timezone}


# --------------------------------------------------------------------------------------------------- pull step


def checkout(repository: str, commit: str, workspaces: str | None = None) -> dict[str, str]:
    """Pull step of `prefect.yaml` (runs on the worker before each flow run): enter this run's workspace.

    Creates `<workspaces>/<flow run id>` (a clone of `repository` at `commit`, wired to the shared DVC remote,
    caches and MLflow), or finds it again when the flow run is retried, and makes it the working directory."""
    flow_run_id = os.environ.get(ENV_FLOW_RUN)
    if not flow_run_id:
        raise MissingInput(f"{ENV_FLOW_RUN} is not set: the checkout step runs in a flow run started by a worker")
    base = (Path(workspaces).expanduser() if workspaces else default_workspaces()).resolve()
    ws = base / flow_run_id
    if (ws / MARKER).exists():
        found = read_json(ws / MARKER)
        log.info("workspace %s: resuming flow run %s there (made %s on %s)", ws, flow_run_id,
                 found.get("created_at"), found.get("host"))
        if found.get("commit") != commit:
            log.warning("workspace %s holds commit %s; the deployment now names %s: checking it out", ws,
                        found.get("commit"), commit)
            _checkout_commit(ws, commit)
            write_json(ws / MARKER, {**found, "commit": commit})
    else:
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{flow_run_id}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _git("clone", "--quiet", "--no-checkout", repository, str(tmp))
        _checkout_commit(tmp, commit)
        _wire(tmp, base, repository)
        write_json(tmp / MARKER, {"flow_run_id": flow_run_id, "repository": repository, "commit": commit,
                                  "host": socket.gethostname(),
                                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        tmp.rename(ws)
        log.info("workspace %s: %s at %s", ws, repository, commit[:12])
    _use_tracking(repository, ws)
    os.chdir(ws)
    # The stages (DVC runs `milora stage ...`) run the checkout's code, whatever the worker has installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ws), os.environ.get("PYTHONPATH")) if p)
    return {"directory": str(ws)}


def _checkout_commit(ws: Path, commit: str) -> None:
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ws, capture_output=True).returncode:
        _git("fetch", "--quiet", "origin", commit, cwd=ws)
    _git("checkout", "--quiet", "--detach", commit, cwd=ws)


def _wire(ws: Path, base: Path, repository: str) -> None:
    """Point a fresh clone at what the workspaces share: DVC remotes and cache (in `.dvc/config.local`, which git
    ignores), SVD cache."""
    from configobj import ConfigObj  # what DVC reads its config with

    if (ws / ".dvc" / "config").is_file():
        local = ConfigObj(str(ws / ".dvc" / "config.local"))
        for section, values in ConfigObj(str(ws / ".dvc" / "config")).items():
            url = values.get("url", "") if section.startswith("remote ") and isinstance(values, dict) else ""
            if not url or "://" in url or Path(url).expanduser().is_absolute():
                continue
            if not _is_local(repository):
                log.warning("DVC %s is the relative path %r: each workspace would get its own; use a shared "
                            "remote (s3://..., or a directory every worker sees by the same absolute path)",
                            section, url)
                continue
            local.setdefault(section, {})["url"] = str((Path(repository) / ".dvc" / url).resolve())
        local.setdefault("cache", {})["dir"] = str(base / DVC_CACHE)
        local.write()
    from milora.pipeline.config import load_config

    cache = load_config(ws / "params.yaml").svd.cache
    if cache and "://" not in cache and not Path(cache).expanduser().is_absolute():
        (base / SVD_CACHE).mkdir(parents=True, exist_ok=True)
        link = ws / cache
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(base / SVD_CACHE, target_is_directory=True)
            exclude = ws / ".git" / "info" / "exclude"  # the link is the workspace's own, not the project's
            exclude.parent.mkdir(parents=True, exist_ok=True)
            with exclude.open("a", encoding="utf-8") as f:
                f.write(f"/{Path(cache).as_posix().strip('/')}\n")


def _use_tracking(repository: str, ws: Path) -> None:
    """MLflow for the run: `MLFLOW_TRACKING_URI` when set; else the embedded store of a local source project,
    with the experiment's artifacts there too (the workspace goes away after the run)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    if not _is_local(repository):
        raise MissingInput("a pipeline run in a workspace needs a shared MLflow: set MLFLOW_TRACKING_URI in the "
                           "worker's environment or the deployment's job variables (env)")
    from milora.pipeline.config import load_config
    from milora.tracking.store import client, ensure_experiment, tracking_uri

    src = Path(repository).resolve()
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(src)
    ensure_experiment(client(src), load_config(ws / "params.yaml").register.experiment, src)
    log.info("MLflow: the embedded store of %s (set MLFLOW_TRACKING_URI to share a tracking server)", src)


# --------------------------------------------------------------------------------------------------- the run


def is_workspace(root: str | os.PathLike[str]) -> bool:
    """True when `root` is a workspace made by `checkout`."""
    return (Path(root) / MARKER).exists()


def _root(flow_run: Any) -> Path:
    return Path((getattr(flow_run, "parameters", None) or {}).get("root") or ".").expanduser().resolve()


def _logger(flow: Any, flow_run: Any) -> Any:
    from prefect.logging.loggers import flow_run_logger

    return flow_run_logger(flow_run, flow)


def remove_after_success(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (on completion): remove the run's workspace; its outputs are in the DVC remote and MLflow."""
    root = _root(flow_run)
    if not is_workspace(root):
        return
    os.chdir(root.parent)
    shutil.rmtree(root, ignore_errors=True)
    _logger(flow, flow_run).info("workspace %s removed (the run completed)", root)


def keep_after_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (on failure or crash): keep the workspace, so that a retry of this flow run resumes there."""
    root = _root(flow_run)
    if is_workspace(root):
        _logger(flow, flow_run).warning("workspace %s kept for resuming: `prefect flow-run retry %s` continues there (completed "
                    "stages are skipped, train resumes from its checkpoints); remove it by hand otherwise",
                    root, flow_run.id)
