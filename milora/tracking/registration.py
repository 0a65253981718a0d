"""Register each pipeline run's model, and promote: the `register` step and `milora promote`.

`register_stage(cfg, paths)` (the `register` step of the pipeline):

1. logs the run (`milora.tracking.runlog.log_pipeline_run`) and an offline-loadable pyfunc model
   (`milora.tracking.packaging`), plus the plain-LoRA export and/or the merged model when configured;
2. registers a version of `register.model_name` for the run and gives it the alias `challenger`;
3. runs the champion gate (`milora.tracking.gate`), holding the model's gate lock (`milora.tracking.gate_lock`).

Every step is idempotent: a retry finds the same run (by `MLFLOW_RUN_ID`, the Prefect flow run or the content
key of the outputs), the same logged model (run tag) and the same version (looked up by run id), and never
re-decides a recorded decision. `promote` records a manual decision the same way.

Registration is idempotent by content: a version carries its adapter's content key (`milora.model_key`,
`milora.tracking.identity.model_key`); an adapter byte-identical to a registered version (so the same base
identity and data hash, which its lineage holds) returns that version, whatever produced it (a new flow run, a
params round trip, another workspace): nothing is logged or registered again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.core.errors import InvalidInput, MissingInput
from milora.core.io import write_json
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths
from milora.tracking.gate import CHALLENGER, Decision, decide, recorded_or_decide
from milora.tracking.gate_lock import gate_lock
from milora.tracking.identity import (
    ENV_RUN_ID,
    TAG_MODEL_KEY,
    TAG_PREFECT,
    TAG_RUN_KEY,
    ensure_run,
    model_key,
    prefect_flow_run_id,
    run_key,
)
from milora.tracking.lineage import lineage_tags, read_lineage, run_name
from milora.tracking.lookups import (
    alias_version,
    is_missing,
    version_metrics,
    versions_of_key,
    versions_of_model,
    versions_of_run,
)
from milora.tracking.packaging import base_identity, log_model
from milora.tracking.runlog import log_pipeline_run
from milora.tracking.scrub import redact_uri
from milora.tracking.store import (
    TrackingUnavailableError,
    bounded_http,
    check_reachable,
    client,
    ensure_experiment,
    is_embedded,
    tracking_uri,
    unavailable,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """What the register step did: which version, of which run, and the gate's decision."""

    model_name: str
    version: str
    run_id: str
    created: bool
    decision: Decision
    reused: bool = False  # a byte-identical adapter was already registered: this is that version

    @property
    def summary(self) -> str:
        """One line: what registration did."""
        if self.reused:
            return (f"already registered: {self.model_name} version {self.version} holds this exact adapter "
                    "(same weights, base and data); nothing new registered")
        return f"{self.model_name} version {self.version} ({'new' if self.created else 'already registered'})"

    @property
    def model_uri(self) -> str:
        """`models:/<name>/<version>`."""
        return f"models:/{self.model_name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able summary."""
        return {"model_name": self.model_name, "version": self.version, "run_id": self.run_id,
                "created": self.created, "reused": self.reused, "model_uri": self.model_uri,
                "decision": asdict(self.decision)}


def ensure_version(mlflow_client: MlflowClient, name: str, run_id: str, source: str,
                   tags: Mapping[str, str]) -> tuple[ModelVersion, bool]:
    """The version of `name` for `run_id` or for the same outputs (run key tag), registering one if there
    is none; returns (version, created).

    Looking up by run key too makes registration idempotent across flow runs: a run that died between
    registering and recording it, run again by a new flow run (a new MLflow run), finds its version.
    """
    from mlflow.exceptions import MlflowException

    existing = versions_of_run(mlflow_client, name, run_id)
    if existing:
        log.info("run %s is already registered as %s version %s", run_id, name, existing[0].version)
        return existing[0], False
    mkey = tags.get(TAG_MODEL_KEY)
    if mkey and (same := versions_of_model(mlflow_client, name, mkey)):
        log.info("this adapter (model key %s) is already registered as %s version %s (run %s): not registering "
                 "it again", mkey[:12], name, same[0].version, same[0].run_id)
        return same[0], False
    key = tags.get(TAG_RUN_KEY)
    if key and (same := versions_of_key(mlflow_client, name, key)):
        log.info("these outputs (run key %s) are already registered as %s version %s (run %s): not registering "
                 "them again", key[:12], name, same[0].version, same[0].run_id)
        return same[0], False
    try:
        mlflow_client.create_registered_model(name, description="MiLoRA fine-tunes (milora-pipeline)")
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags))
    log.info("registered %s version %s from run %s", name, mv.version, run_id)
    return mv, True


def _check_outputs(paths: Paths) -> None:
    adapter = paths.adapter_dir
    if not (adapter / "milora.json").is_file():
        raise MissingInput(f"no trained adapter at {adapter}: run the train stage first (dvc repro train)")
    if not paths.metrics("eval").is_file():
        raise MissingInput(
            f"{paths.metrics('eval')} is missing: run the evaluate stage first (dvc repro evaluate); "
            "the champion gate needs its metrics"
        )
    base_identity(paths)


def _probe(uri: str) -> bool:
    try:
        check_reachable(uri, retries=0)
        return True
    except TrackingUnavailableError:
        return False


def register_run(cfg: Config, paths: Paths) -> Registration:
    """Log, register and gate this project's pipeline outputs; idempotent and safe to retry."""
    from mlflow.exceptions import MlflowException

    _check_outputs(paths)
    rc = cfg.register
    uri = tracking_uri(paths.root)
    key = run_key(paths)
    with bounded_http(rc):
        check_reachable(uri, rc.connect_retries)
        try:
            return _register(cfg, paths, key)
        except (MlflowException, OSError) as exc:
            if isinstance(exc, TrackingUnavailableError) or is_embedded(uri) or _probe(uri):
                raise
            raise unavailable(uri, f"lost during registration: {type(exc).__name__}", rc.connect_retries) from None


def _own_version(mlflow_client: MlflowClient, mv: ModelVersion) -> bool:
    """Whether `mv` was registered by this very pipeline run (`MLFLOW_RUN_ID`, or a run of this Prefect flow
    run): then registering is a retry, which goes the whole way again (idempotently) to finish its run."""
    from mlflow.exceptions import MlflowException

    if not mv.run_id:
        return False
    if mv.run_id == os.environ.get(ENV_RUN_ID, "").strip():
        return True
    flow = prefect_flow_run_id()
    if not flow:
        return False
    try:
        return mlflow_client.get_run(mv.run_id).data.tags.get(TAG_PREFECT) == flow
    except MlflowException:
        return False


def _register(cfg: Config, paths: Paths, key: str) -> Registration:
    rc = cfg.register
    c = client(paths.root)
    mkey = model_key(paths)
    same = versions_of_model(c, rc.model_name, mkey)
    if same and not _own_version(c, same[0]):
        mv = same[0]
        with gate_lock(c, rc.model_name):
            decision = recorded_or_decide(c, rc.model_name, str(mv.version), version_metrics(c, mv), rc)
        reg = Registration(rc.model_name, str(mv.version), mv.run_id or "", False, decision, reused=True)
        log.info("register: %s", reg.summary)
        return reg
    experiment_id = ensure_experiment(c, rc.experiment, paths.root)
    lineage = read_lineage(paths)
    tags = lineage_tags(cfg, paths, lineage)  # once: it hashes data/prepared
    run_id = ensure_run(c, experiment_id, key, run_name=run_name(cfg, lineage, key))
    log_pipeline_run(c, run_id, cfg, paths, key, tags)
    source = log_model(c, run_id, cfg, paths)
    version_tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.") and k != "milora.svd_cache_keys"}
    version_tags[TAG_RUN_KEY] = key
    version_tags[TAG_MODEL_KEY] = mkey
    # Find-or-create the version and decide, holding the gate: two registrations of one model at once decide
    # one after the other (and two of the same adapter make one version).
    with gate_lock(c, rc.model_name):
        mv, created = ensure_version(c, rc.model_name, run_id, source, version_tags)
        version = str(mv.version)
        c.set_registered_model_alias(rc.model_name, CHALLENGER, version)
        decision = recorded_or_decide(c, rc.model_name, version, version_metrics(c, mv), rc)
    c.set_tag(run_id, "milora.model_version", f"{rc.model_name}/{version}")
    if not os.environ.get(ENV_RUN_ID) and c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, "FINISHED")  # a run joined through MLFLOW_RUN_ID is ended by its owner
    return Registration(rc.model_name, version, run_id, created, decision)


def write_registration(paths: Paths, reg: Registration) -> Path:
    """`metrics/register.json`: the version, run and decision of this project's last registration."""
    d = reg.decision
    return write_json(paths.metrics("register"), {
        **{k: v for k, v in reg.to_dict().items() if k != "decision"},
        "promoted": d.promote, "reason": d.reason, "metric": d.metric,
        "challenger_value": d.challenger_value, "champion_value": d.champion_value,
        "champion_version": d.champion_version,
        "tracking_uri": redact_uri(tracking_uri(paths.root)),
    })


def register_stage(cfg: Config, paths: Paths) -> Registration:
    """The `register` step: log + register + gate the outputs under `paths`, then write `metrics/register.json`."""
    t0 = time.perf_counter()
    reg = register_run(cfg, paths)
    out = write_registration(paths, reg)
    log.info("register: %s in %.1fs: %s; wrote %s", reg.summary, time.perf_counter() - t0, reg.decision.reason,
             out)
    return reg


def promote(
    model_name: str,
    version: str | None = None,
    force: bool = False,
    cfg: Config | None = None,
    root: str | os.PathLike[str] = ".",
) -> Decision:
    """A manual decision: gate `version` (default: the `challenger`) against the champion, or force it."""
    from mlflow.exceptions import MlflowException

    cfg = cfg or Config()
    rc = cfg.register
    uri = tracking_uri(root)
    with bounded_http(rc):
        check_reachable(uri, rc.connect_retries)
        c = client(root)
        try:
            c.get_registered_model(model_name)
        except MlflowException as exc:
            if is_missing(exc):
                raise InvalidInput(f"no registered model {model_name!r} on {redact_uri(uri)}: check --model "
                                 "and MLFLOW_TRACKING_URI") from None
            raise
        if version is None:
            mv = alias_version(c, model_name, CHALLENGER)
            if mv is None:
                raise InvalidInput(f"model {model_name!r} has no '{CHALLENGER}' alias: pass --version")
        else:
            try:
                mv = c.get_model_version(model_name, str(version))
            except MlflowException as exc:
                if is_missing(exc):
                    raise InvalidInput(f"model {model_name!r} has no version {version}") from None
                raise
        return decide(c, model_name, str(mv.version), version_metrics(c, mv), rc, source="manual", force=force)
