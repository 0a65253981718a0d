"""`milora deploy`: serve the `milora-pipeline` flow as the `nightly-retrain` deployment (foreground).

The deployment runs the flow on a cron schedule (`schedule.cron` / `schedule.timezone` of params.yaml
unless `--cron` / `--timezone` say otherwise) against this project root, and accepts ad-hoc runs:

    prefect deployment run 'milora-pipeline/nightly-retrain' --params '{"overrides": {"adapter.rank": 4}}'

It needs a Prefect server (`PREFECT_API_URL`, e.g. `prefect server start` on http://127.0.0.1:4200/api).
The command keeps running and executes the deployment's runs in subprocesses, one at a time; stop it
with Ctrl-C (the schedule is paused on shutdown and resumes when it is served again).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from milora.core.errors import UserError

HELP = "serve the scheduled nightly-retrain deployment of the pipeline flow"
DEFAULT_NAME = "nightly-retrain"


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


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()


def schedule(cron: str, timezone: str) -> Any:
    """The Prefect cron schedule, or a `UserError` naming what is wrong with the cron or the timezone."""
    from prefect.schedules import Cron

    from milora.pipeline.config import check_timezone

    try:
        check_timezone(timezone)
    except ValueError:
        raise UserError(f"schedule.timezone = {timezone!r} is not an IANA timezone (e.g. UTC, Europe/Paris); "
                        "fix it in params.yaml or pass --timezone") from None
    try:
        return Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise UserError(f"schedule.cron = {cron!r} is not a valid cron expression ({str(exc).splitlines()[0]}); "
                        "use five fields like '0 3 * * *', in params.yaml or with --cron") from None


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
    parameters: dict = {"root": str(root)}
    if overrides:
        parameters["overrides"] = overrides
    if args.params:
        parameters["params"] = args.params
    if args.model_name:
        parameters["model_name"] = args.model_name
    # Module entrypoint: the runs import `flows.pipeline` from the installed package, whatever the cwd.
    milora_pipeline.serve(name=args.name, schedules=schedules, parameters=parameters, limit=1,
                          tags=["milora"], entrypoint_type=EntrypointType.MODULE_PATH,
                          description=f"Scheduled MiLoRA retraining of {root}")
    return 0
