"""Which MLflow run a pipeline run is, and which model its outputs are.

One run per pipeline run: the register step joins `MLFLOW_RUN_ID` when the caller sets it (the Prefect flow
creates it with `ensure_run` and exports it); without one, the run is found again by the Prefect flow-run
id, or by the content key of the outputs being logged (`run_key`), so a retry never forks it. `model_key` is
the content key of the adapter alone: one key, one model, whoever produced it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from milora.core.errors import InvalidInput
from milora.pipeline.paths import Paths
from milora.tracking.scrub import redact_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

ENV_RUN_ID = "MLFLOW_RUN_ID"
ENV_PREFECT_FLOW_RUN = "PREFECT__FLOW_RUN_ID"
TAG_RUN_KEY = "milora.run_key"
TAG_MODEL_KEY = "milora.model_key"
TAG_PREFECT = "milora.prefect_flow_run_id"


def prefect_flow_run_id() -> str | None:
    """The current Prefect flow-run id, from `PREFECT__FLOW_RUN_ID` or the Prefect runtime context."""
    env = os.environ.get(ENV_PREFECT_FLOW_RUN)
    if env:
        return env
    if "prefect" in sys.modules:  # only ask Prefect when this process already runs it
        with contextlib.suppress(Exception):
            from prefect.runtime import flow_run

            fid = flow_run.id
            return str(fid) if fid else None
    return None


def run_key(paths: Paths) -> str:
    """Content key of a pipeline run's results: sha256 over the adapter directory and `metrics/eval.json`."""
    h = hashlib.sha256()
    files = sorted(p for p in paths.adapter_dir.rglob("*") if p.is_file())
    for p in [*files, paths.metrics("eval")]:
        if p.is_file():
            h.update(str(p.relative_to(paths.root)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def model_key(paths: Paths) -> str:
    """Content key of the model itself: sha256 over the adapter directory's files (names and bytes). The
    adapter is byte-reproducible and holds its lineage (base identity with its content hash, data hash), so
    one key means one model, whichever workspace, flow run or params round trip produced it."""
    h = hashlib.sha256()
    adapter = paths.adapter_dir
    for p in sorted(q for q in adapter.rglob("*") if q.is_file()):
        h.update(p.relative_to(adapter).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def ensure_run(
    mlflow_client: MlflowClient,
    experiment_id: str,
    key: str | None = None,
    run_name: str | None = None,
) -> str:
    """The pipeline's MLflow run: `MLFLOW_RUN_ID`, else the run of this Prefect flow run, else of `key`; else a new one."""
    from mlflow.exceptions import MlflowException

    rid = os.environ.get(ENV_RUN_ID, "").strip()
    if rid:
        try:
            mlflow_client.get_run(rid)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise InvalidInput(
                f"{ENV_RUN_ID}={rid} names no run on {redact_uri(mlflow_client.tracking_uri)}: "
                f"unset {ENV_RUN_ID} to start a new run, or point MLFLOW_TRACKING_URI at the store that has it"
            ) from None
        return rid
    flow = prefect_flow_run_id()
    tags = {TAG_PREFECT: flow} if flow else {}
    lookup = (TAG_PREFECT, flow) if flow else (TAG_RUN_KEY, key) if key else None
    if lookup:
        found = mlflow_client.search_runs(
            [experiment_id], filter_string=f"tags.`{lookup[0]}` = '{lookup[1]}'",
            order_by=["attributes.start_time ASC"], max_results=1,
        )
        if found:
            log.info("joining MLflow run %s (%s = %s)", found[0].info.run_id, *lookup)
            return found[0].info.run_id
    if key:
        tags[TAG_RUN_KEY] = key
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags)
    log.info("created MLflow run %s in experiment %s", run.info.run_id, experiment_id)
    return run.info.run_id
