"""`milora deploy`: serve the `milora-pipeline` flow as the `nightly-retrain` deployment (foreground), or, with
`--pool NAME`, register the deployments of `prefect.yaml` with a work pool for workers to run.

Local mode: the deployment runs the flow on a cron schedule (`schedule.cron` / `schedule.timezone` of params.yaml
unless `--cron` / `--timezone` say otherwise) against this project root, and accepts ad-hoc runs:

    prefect deployment run 'milora-pipeline/nightly-retrain' --params '{"overrides": {"adapter.rank": 4}}'

The command keeps running and executes the deployment's runs in subprocesses, one at a time; stop it
with Ctrl-C (the schedule is paused on shutdown and resumes when it is served again).

Pool mode (`--pool NAME`): `prefect deploy --all --no-prompt --pool NAME` in the project (a git checkout), the
pool created as a `process` pool if it does not exist; `nightly-retrain` gets the schedule of params.yaml (or
`--cron` / `--timezone`), `on-demand` none; the command returns, and `prefect worker start --pool NAME` on any
machine runs the deployments' runs, each in its own workspace at the deployed commit (`flows.workspace`).

Both need a Prefect server (`PREFECT_API_URL`, e.g. `prefect server start` on http://127.0.0.1:4200/api).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from milora.core.errors import UserError

HELP = "serve the scheduled nightly-retrain deployment, or deploy prefect.yaml's deployments to a work pool"
DEFAULT_NAME = "nightly-retrain"
PREFECT_FILE = "prefect.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora deploy`."""
    p.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    p.add_argument("--cron", default=None, help="cron schedule (default: schedule.cron of the params)")
    p.add_argument("--timezone", default=None, help="IANA timezone of the cron (default: schedule.timezone)")
    p.add_argument("--no-schedule", action="store_true", help="serve without a schedule (runs on demand only)")
    p.add_argument("--root", default=".", help="project root the runs work in (default: .)")
    p.add_argument("--params", default=None, help="params file the runs start from (default: params.yaml)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="default override for every run of the deployment (repeatable)")
    p.add_argument("--model-name", default=None, help="MLflow registered model name for the runs")
    p.add_argument("--pool", default=None, metavar="NAME",
                   help=f"deploy the deployments of {PREFECT_FILE} to this work pool (a process pool is created if "
                        "missing) for `prefect worker start --pool NAME`, instead of serving here")


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()


def schedule(cron: str, timezone: str) -> Any:
    """The Prefect cron schedule, or a `UserError` naming what is wrong with the cron or the timezone."""
    from prefect.schedules import Cron

    from milora.pipeline.config import check_cron, check_timezone

    try:
        check_timezone(timezone)
    except ValueError:
        raise UserError(f"schedule.timezone = {timezone!r} is not an IANA timezone (e.g. UTC, Europe/Paris); "
                        "fix it in params.yaml or pass --timezone") from None
    try:
        check_cron(cron)
    except ValueError as exc:
        raise UserError(f"schedule.cron = {cron!r} is not a valid cron expression: {exc}; in params.yaml or with "
                        "--cron") from None
    return Cron(cron, timezone=timezone)


def check_server(api_url: str) -> None:
    """Fail with one clear line when the Prefect API does not answer."""
    import httpx

    try:
        httpx.get(api_url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise UserError(f"the Prefect server at PREFECT_API_URL={api_url} does not answer ({type(exc).__name__}); "
                        "start it with `prefect server start` or fix PREFECT_API_URL") from None


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora deploy`."""
    from flows.params import validate_run_config
    from milora.pipeline.config import parse_sets

    root = Path(args.root).expanduser().resolve()
    if not (root / "dvc.yaml").exists():
        raise UserError(f"{root}: no dvc.yaml here; run from the project root or pass --root")
    overrides = parse_sets(args.set)
    cfg = validate_run_config(root, args.params, overrides)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    api = _api_url()
    if not api:
        raise UserError("milora deploy needs a Prefect server: start one with `prefect server start` and set "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)")

    for noisy in ("httpx", "httpcore"):  # one line per API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import milora_pipeline

    schedules = []
    if not args.no_schedule:
        cron = args.cron or cfg.schedule.cron
        tz = args.timezone or cfg.schedule.timezone
        schedules = [schedule(cron, tz)]
    check_server(api)
    if args.pool:
        return deploy_to_pool(root, args, overrides)
    parameters = {"root": str(root), **run_parameters(args, overrides)}
    # Module entrypoint: the runs import `flows.pipeline` from the installed package, whatever the cwd.
    milora_pipeline.serve(name=args.name, schedules=schedules, parameters=parameters, limit=1,
                          tags=["milora"], entrypoint_type=EntrypointType.MODULE_PATH,
                          description=f"Scheduled MiLoRA retraining of {root}")
    return 0


def run_parameters(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """The deployments' default flow parameters from this command's -S, --params and --model-name."""
    given = {"overrides": overrides, "params": args.params, "model_name": args.model_name}
    return {k: v for k, v in given.items() if v}


def ensure_pool(name: str) -> bool:
    """Create work pool `name` as a `process` pool unless it exists; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:  # created meanwhile
            return False
    return True


def deploy_to_pool(root: Path, args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`prefect deploy --name D --pool NAME --no-prompt` in `root` for each deployment D of prefect.yaml, with the
    schedule, params file and default parameters of this command; the pool is created if missing.

    (One `prefect deploy` per deployment: with `--all`, Prefect ignores command-line options such as `--pool`.)"""
    import json
    import subprocess
    import sys

    from milora.pipeline.config import parse_yaml

    prefect_file = root / PREFECT_FILE
    if not prefect_file.exists():
        raise UserError(f"{root}: no {PREFECT_FILE} here; --pool deploys the deployments it declares")
    if args.no_schedule or args.name != DEFAULT_NAME:
        raise UserError("--pool deploys the deployments of prefect.yaml as declared there (nightly-retrain with "
                        "the schedule, on-demand without): --name and --no-schedule apply to the local mode only")
    names = [d["name"] for d in (parse_yaml(prefect_file.read_text(encoding="utf-8")) or {}).get("deployments")
             or [] if isinstance(d, dict) and d.get("name")]
    if not names:
        raise UserError(f"{prefect_file}: no named deployments")
    if ensure_pool(args.pool):
        print(f"created work pool {args.pool!r} (type process)")
    env = dict(os.environ)
    for var, value in (("MILORA_PARAMS", args.params), ("MILORA_CRON", args.cron), ("MILORA_TIMEZONE", args.timezone)):
        if value:
            env[var] = value
    parameters = run_parameters(args, overrides)
    for name in names:
        cmd = [sys.executable, "-m", "prefect", "deploy", "--name", name, "--pool", args.pool, "--no-prompt",
               *(["--params", json.dumps(parameters)] if parameters else [])]
        rc = subprocess.run(cmd, cwd=root, env=env).returncode
        if rc != 0:
            raise UserError(f"prefect deploy of {name!r} failed (exit {rc}); see its output above")
    print(f"deployed {', '.join(names)} to work pool {args.pool!r}; run them with `prefect worker start --pool "
          f"{args.pool}` on the machines that should (each run works in its own workspace; see README)")
    return 0
