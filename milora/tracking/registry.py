"""MLflow model registry: register each pipeline run's model, and move `champion` only to a better one.

`register_stage(cfg, paths)` (the `register` step of the pipeline):

1. logs the run (`milora.tracking.runs.log_pipeline_run`) and an offline-loadable pyfunc model (the
   adapter plus the base carried whole, or a reference to it), plus the plain-LoRA export and/or the
   merged model when configured;
2. registers a version of `register.model_name` for the run and gives it the alias `challenger`;
3. runs the champion gate: the challenger wins when it beats the current `champion` on
   `register.metric` in `register.direction` by more than `register.min_delta` (a tie never wins) and
   passes every guard; with no champion it wins if the guards pass. The decision, both values and
   the reason are written as version tags, as run tags and as a `decisions/` artifact of the run.

Every step is idempotent: a retry finds the same run (by `MLFLOW_RUN_ID`, the Prefect flow run or
the content key of the outputs), the same logged model (run tag) and the same version (looked up by
run id), and never re-decides a recorded decision. `promote` records a manual decision the same way.

Registration is idempotent by content: a version carries its adapter's content key (`milora.model_key`,
`milora.tracking.runs.model_key`); an adapter byte-identical to a registered version (so the same base
identity and data hash, which its lineage holds) returns that version, whatever produced it (a new flow
run, a params round trip, another workspace): nothing is logged or registered again.

The gate is serialised per registered model by a lock in the tracking store itself (`gate_lock`), so that
concurrent registrations (parallel workers sharing one MLflow server) decide one after the other, each
against the champion the previous one left: the champion ends on the best version that passed its guards.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import getpass
import importlib.metadata
import json
import logging
import math
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.core.errors import InvalidInput, MissingInput, UnavailableError
from milora.core.io import read_json, write_json
from milora.pipeline.config import Config, RegisterConfig
from milora.pipeline.paths import Paths
from milora.tracking import runs as tracking

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
TAG_MODEL_URI = "milora.model_uri"
TAG_DECISION = "milora.decision"  # "promoted" | "not_promoted"; written last: it marks a decision as recorded
PYFUNC_FILE = "milora_pyfunc.py"
DEFAULT_EXAMPLE = {"instruction": "What is 2 + 3?", "input": ""}


# ----------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Decision:
    """The outcome of the champion gate for one model version."""

    promote: bool
    reason: str
    metric: str
    challenger_value: float | None = None
    champion_value: float | None = None
    champion_version: str | None = None
    direction: str = "maximize"
    min_delta: float = 0.0
    source: str = "auto"  # auto (the register step) | manual (`milora promote`)
    forced: bool = False

    def tags(self) -> dict[str, str]:
        """The decision as `milora.decision*` / `milora.gate.*` tags (the decision tag itself last)."""
        def fmt(v: Any) -> str:
            return "" if v is None else repr(v) if isinstance(v, float) else str(v)

        return {
            "milora.gate.metric": self.metric,
            "milora.gate.direction": self.direction,
            "milora.gate.min_delta": fmt(self.min_delta),
            "milora.gate.challenger_value": fmt(self.challenger_value),
            "milora.gate.champion_value": fmt(self.champion_value),
            "milora.gate.champion_version": fmt(self.champion_version),
            "milora.decision.reason": self.reason,
            "milora.decision.source": self.source,
            "milora.decision.forced": str(self.forced).lower(),
            "milora.decision.at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            TAG_DECISION: "promoted" if self.promote else "not_promoted",
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Decision:
        """A recorded decision read back from version tags."""
        def num(key: str) -> float | None:
            v = tags.get(key, "")
            return float(v) if v not in ("", None) else None

        return cls(
            promote=tags.get(TAG_DECISION) == "promoted",
            reason=tags.get("milora.decision.reason", ""),
            metric=tags.get("milora.gate.metric", ""),
            challenger_value=num("milora.gate.challenger_value"),
            champion_value=num("milora.gate.champion_value"),
            champion_version=tags.get("milora.gate.champion_version") or None,
            direction=tags.get("milora.gate.direction", "maximize"),
            min_delta=num("milora.gate.min_delta") or 0.0,
            source=tags.get("milora.decision.source", "auto"),
            forced=tags.get("milora.decision.forced") == "true",
        )


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _did_you_mean(name: str, metrics: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, [k for k in metrics if _num(metrics[k]) is not None], n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def gate(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    rc: RegisterConfig,
    champion_version: str | None = None,
) -> Decision:
    """Should the challenger replace the champion? Pure function of both metric sets and the config.

    Wins iff every guard passes and, when there is a champion, the improvement on `rc.metric` in
    `rc.direction` is more than `rc.min_delta` (so a tie never wins). Guards (on any recorded metric):
    `max_value` / `min_value` bound the challenger's value (also with no champion); `max_increase` /
    `max_decrease` bound its change from the champion.
    """
    metric = rc.metric
    base = dict(metric=metric, direction=rc.direction, min_delta=rc.min_delta, champion_version=champion_version)
    c = _num(challenger.get(metric))
    p = _num(champion.get(metric)) if champion is not None else None
    base.update(challenger_value=c, champion_value=p)
    if c is None:
        return Decision(False, f"the challenger has no '{metric}' metric{_did_you_mean(metric, challenger)}: cannot "
                               "gate it (register.metric names any metric of the run: average_accuracy, "
                               "suites_average, suites.<name>.accuracy, lm_eval.<task>.<metric>, ...)", **base)
    failures, notes = [], []
    for g in rc.guards:
        v = _num(challenger.get(g.metric))
        if v is None:
            failures.append(f"guard {g.metric}: the challenger has no such metric{_did_you_mean(g.metric, challenger)}")
            continue
        if g.max_value is not None and v > g.max_value:
            failures.append(f"guard {g.metric}: {v:.6g} > max_value {g.max_value:g}")
        if g.min_value is not None and v < g.min_value:
            failures.append(f"guard {g.metric}: {v:.6g} < min_value {g.min_value:g}")
        for bound, sign, limit in (("max_increase", 1, g.max_increase), ("max_decrease", -1, g.max_decrease)):
            if limit is None or champion is None:
                continue
            prev = _num(champion.get(g.metric))
            if prev is None:
                notes.append(f"guard {g.metric}: the champion has no such metric, {bound} not checked")
            elif sign * (v - prev) > limit + 1e-12:
                failures.append(f"guard {g.metric}: {'rose' if sign > 0 else 'fell'} by {abs(v - prev):.6g} "
                                f"({prev:.6g} -> {v:.6g}) > {bound} {limit:g}")
    note = f" ({'; '.join(notes)})" if notes else ""
    if failures:
        return Decision(False, "; ".join(failures) + note, **base)
    if champion is None:
        return Decision(True, f"no champion yet: {metric} = {c:.6g}{note}", **base)
    if p is None:
        return Decision(False, f"the champion (version {champion_version}) has no '{metric}' metric: cannot "
                               f"compare; use `milora promote --force` to decide by hand{note}", **base)
    gain = c - p if rc.direction == "maximize" else p - c
    eps = 1e-9 * max(1.0, abs(c), abs(p))
    versus = f"{metric} {c:.6g} vs champion {p:.6g} ({rc.direction})"
    if abs(gain) <= eps:
        return Decision(False, f"{versus}: a tie does not promote{note}", **base)
    if gain > rc.min_delta + eps:
        return Decision(True, f"{versus}: better by {gain:.6g} > min_delta {rc.min_delta:g}{note}", **base)
    if gain > 0:
        return Decision(False, f"{versus}: better by only {gain:.6g}, not more than min_delta "
                               f"{rc.min_delta:g}{note}", **base)
    return Decision(False, f"{versus}: worse by {-gain:.6g}{note}", **base)


# ----------------------------------------------------------------------------- the pyfunc model


def pyfunc_code_path(root: str | os.PathLike[str] = ".") -> Path:
    """`mlflow/milora_pyfunc.py`: next to the `milora` package in a checkout, else under the project root."""
    import milora

    for cand in (Path(milora.__file__).resolve().parents[1] / "mlflow" / PYFUNC_FILE,
                 Path(root).resolve() / "mlflow" / PYFUNC_FILE):
        if cand.is_file():
            return cand
    raise MissingInput(
        f"the pyfunc model code mlflow/{PYFUNC_FILE} is missing (looked next to the milora package and under "
        f"{Path(root).resolve()}): run from a checkout of milora-pipeline"
    )


def _requirements(identity: Mapping[str, Any]) -> list[str]:
    """The serving environment: torch and the HF stack at this run's versions (plus `gguf`, which converts a
    GGUF base again on a machine without this pipeline's models/base)."""
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    pkgs = ["transformers", "peft", "safetensors", "tokenizers", *(["gguf"] if identity.get("gguf_sha256") else [])]
    for pkg in pkgs:
        reqs.append(f"{pkg}=={importlib.metadata.version(pkg)}")
    return reqs


def _input_example(paths: Paths) -> dict[str, str]:
    """A request for the model's input example: a raw prompt of the eval split, else an instruction."""
    p = paths.prepared_dir / "eval.jsonl"
    if p.is_file():
        with p.open(encoding="utf-8") as f:
            for line in f:
                try:
                    prompt = json.loads(line).get("prompt")
                except (ValueError, AttributeError):
                    continue
                if isinstance(prompt, str) and prompt.strip():
                    return {"prompt": prompt[:1000]}
    return dict(DEFAULT_EXAMPLE)


def signature(cfg: Config) -> Any:
    """The pyfunc's MLflow signature: one request per row, `instruction` (+ `input`), chat `messages`
    (`[{role, content}]`) or a raw `prompt`, all optional columns; one string out; the generation params
    with the evaluate stage's values as defaults."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(
        inputs=Schema([ColSpec("string", "instruction", required=False), ColSpec("string", "input", required=False),
                       ColSpec(Array(message), "messages", required=False),
                       ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", cfg.eval.max_new_tokens),
                            ParamSpec("batch_size", "long", cfg.eval.batch_size)]),
    )


def base_identity(paths: Paths) -> dict[str, Any]:
    """`models/base.json`, required to log a model (it says whether the base is carried or referenced)."""
    if not paths.base_json.is_file():
        raise MissingInput(f"{paths.base_json} is missing: run the base stage first (dvc repro base)")
    return json.loads(paths.base_json.read_text(encoding="utf-8"))


def _carries_base(identity: Mapping[str, Any]) -> bool:
    return bool(identity.get("embedded")) or identity.get("name_or_path") == "embedded"


def _dtype_name(identity: Mapping[str, Any], cfg: Config) -> str:
    name = str(identity.get("dtype") or cfg.model.dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "auto"


def _evaluated_precision(cfg: Config, paths: Paths, adapter_dir: str) -> str:
    """The precision the evaluate stage scored at (its report), else `eval.precision` resolved here."""
    from milora.model.precision import inference_precision

    report = paths.report("eval")
    recorded = read_json(report).get("precision") if report.is_file() else None
    return recorded or inference_precision(cfg.eval.precision, adapter_dir)


def save_pyfunc(dest: str | os.PathLike[str], cfg: Config, paths: Paths, run_id: str | None = None,
                adapter_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the pyfunc model directory (models from code, no pickle) for the outputs under `paths`."""
    from mlflow.models import Model
    from mlflow.pyfunc import save_model

    import milora
    identity = base_identity(paths)
    artifacts = {"adapter": str(Path(adapter_dir or paths.adapter_dir).resolve())}
    model_config: dict[str, Any] = {
        "dtype": _dtype_name(identity, cfg),
        "precision": _evaluated_precision(cfg, paths, artifacts["adapter"]),  # served as the evaluate stage scored
        "trust_remote_code": cfg.model.trust_remote_code,
        "max_prompt_tokens": cfg.data.max_length,
        "device": "auto",
        "max_new_tokens": cfg.eval.max_new_tokens,  # the evaluate stage's generation, the serving default
        "batch_size": cfg.eval.batch_size,
    }
    if _carries_base(identity):
        if not (paths.base_dir / "config.json").is_file():
            raise MissingInput(f"the embedded base {paths.base_dir} is missing: run the base stage first")
        artifacts["base"] = str(paths.base_dir.resolve())
    else:
        # A reference to the base: a Hub id at its recorded revision resolves through the loading machine's HF
        # cache (or the Hub); a local directory is also named by its path on this machine.
        from milora.model.base import is_hub_id, resolved_base_path

        name = identity.get("name_or_path") or cfg.model.name_or_path
        model_config.update(base_name_or_path=name, base_revision=identity.get("revision") or cfg.model.revision)
        if identity.get("gguf_sha256"):  # converted here; elsewhere converted again from the same GGUF file
            model_config.update(base_gguf_sha256=identity["gguf_sha256"], base_converter=identity.get("converter"))
        if identity.get("gguf_sha256") or not is_hub_id(name, paths.root):
            model_config["base_load_path"] = str(resolved_base_path(identity, paths.root).resolve())
        model_config.update(base_content_hash=identity.get("content_hash"),  # the pyfunc refuses other weights
                            verify_base_hash=True)  # (False at load time skips that check)
    with tempfile.TemporaryDirectory(prefix="milora-code-") as tmp:
        code = Path(tmp) / "milora"  # the package the model code imports, carried so it loads anywhere
        shutil.copytree(Path(milora.__file__).resolve().parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        save_model(
            str(dest), python_model=str(pyfunc_code_path(paths.root)), artifacts=artifacts,
            code_paths=[str(code)], signature=signature(cfg), input_example=[_input_example(paths)],
            pip_requirements=_requirements(identity), model_config=model_config,
            mlflow_model=Model(run_id=run_id, artifact_path=MODEL_ARTIFACT) if run_id else None,
        )
    return Path(dest)


def _load_base(identity: Mapping[str, Any], cfg: Config, paths: Paths) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from milora.model.base import resolved_base_path

    trust = cfg.model.trust_remote_code
    source = str(paths.base_dir if _carries_base(identity) else resolved_base_path(dict(identity), paths.root, trust))
    dt = _dtype_name(identity, cfg)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust,
                                                 dtype="auto" if dt == "auto" else getattr(torch, dt))
    return model, AutoTokenizer.from_pretrained(source, trust_remote_code=trust)


def log_model(mlflow_client: MlflowClient, run_id: str, cfg: Config, paths: Paths) -> str:
    """Log the pyfunc model (and the configured exports) to the run once; return the model's artifact URI."""
    import milora

    run = mlflow_client.get_run(run_id)
    done = run.data.tags.get(TAG_MODEL_URI)
    if done:
        log.info("run %s already has its model at %s", run_id, done)
        return done
    with tempfile.TemporaryDirectory(prefix="milora-model-") as tmp_dir:
        tmp = Path(tmp_dir)
        adapter = tracking.scrubbed_copy(paths.adapter_dir, tmp / "clean")
        model_dir = save_pyfunc(tmp / MODEL_ARTIFACT, cfg, paths, run_id, adapter_dir=adapter)
        mlflow_client.log_artifacts(run_id, str(tracking.scrubbed_copy(model_dir, tmp / "clean")), MODEL_ARTIFACT)
        rc = cfg.register
        if rc.log_lora_export or rc.log_merged:
            base, tokenizer = _load_base(base_identity(paths), cfg, paths)
            peft_model = milora.load_adapter(base, paths.adapter_dir)
            exports = []
            if rc.log_lora_export:
                exports.append(("lora_export", milora.to_lora(peft_model, tmp / "lora_export")))
            if rc.log_merged:
                out = tmp / "merged"
                milora.merge(peft_model, inplace=True).save_pretrained(out, safe_serialization=True)
                tokenizer.save_pretrained(out)
                exports.append(("merged", out))
            for name, out in exports:
                mlflow_client.log_artifacts(run_id, str(tracking.scrubbed_copy(out, tmp / "clean")), name)
    uri = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    mlflow_client.set_tag(run_id, TAG_MODEL_URI, uri)
    log.info("logged the pyfunc model of run %s", run_id)
    return uri


# ----------------------------------------------------------------------------- registry


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


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def alias_version(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _is_missing(exc) or "alias" in str(exc).lower():
            return None
        raise


def versions_of_run(mlflow_client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """Versions of model `name` registered from `run_id` (oldest first)."""
    found = mlflow_client.search_model_versions(f"run_id='{run_id}'")
    return sorted((v for v in found if v.name == name), key=lambda v: int(v.version))


def versions_of_key(mlflow_client: MlflowClient, name: str, key: str,
                    tag: str = tracking.TAG_RUN_KEY) -> list[ModelVersion]:
    """Versions of model `name` whose `tag` (default: the run key of their outputs) is `key` (oldest first)."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client.search_model_versions(f"name='{name}' and tags.`{tag}` = '{key}'")
    except MlflowException as exc:
        if _is_missing(exc):
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def versions_of_model(mlflow_client: MlflowClient, name: str, model_key: str) -> list[ModelVersion]:
    """Versions of model `name` holding the adapter with content key `model_key` (oldest first)."""
    return versions_of_key(mlflow_client, name, model_key, tracking.TAG_MODEL_KEY)


# ----------------------------------------------------------------------------- the gate lock

GATE_LOCK_SUFFIX = "--champion-gate-lock"
TAG_LOCK_HOLDER = "milora.lock.holder"
TAG_LOCK_EXPIRES = "milora.lock.expires_at"
GATE_LOCK_WAIT_S = 300.0  # give up waiting for another registration's gate after this long (transient)
GATE_LOCK_LEASE_S = 600.0  # a holder that died leaves the lock; after this long it is taken over


class GateBusy(UnavailableError):
    """Another registration holds the champion gate of this model for longer than we wait (try again later)."""


@contextlib.contextmanager
def gate_lock(mlflow_client: MlflowClient, name: str, wait_s: float = GATE_LOCK_WAIT_S,
              lease_s: float = GATE_LOCK_LEASE_S) -> Iterator[None]:
    """Hold the champion gate of registered model `name`: one registration or promotion at a time, across
    processes and machines sharing the tracking store.

    The lock is a registered model `<name>--champion-gate-lock` in the tracking store itself: creating a
    registered model is atomic there (a unique name, in the store's database), so exactly one of several
    concurrent creators succeeds; the holder deletes it when done. Its tags name the holder and the lease's
    end: a holder that died (kill -9) is taken over once its lease has run out. Why not a compare-and-set
    of the alias: MLflow has no conditional alias update, so two gates could both read the old champion and
    the slower, worse one would win; and a Prefect concurrency limit would not cover `milora register` /
    `milora promote` run by hand."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{GATE_LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        expires = time.time() + lease_s
        try:
            mlflow_client.create_registered_model(
                lock, tags={TAG_LOCK_HOLDER: holder, TAG_LOCK_EXPIRES: f"{expires:.3f}"},
                description=f"milora: the champion gate of {name!r} is being decided (a lock; deleted when done)")
            break
        except MlflowException as exc:
            if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        try:
            tags = mlflow_client.get_registered_model(lock).tags or {}
        except MlflowException as exc:
            if _is_missing(exc):
                continue  # released meanwhile: try again at once
            raise
        if float(tags.get(TAG_LOCK_EXPIRES) or 0) < time.time():
            log.warning("taking over the champion gate of %s: its holder (%s) let the lease run out", name,
                        tags.get(TAG_LOCK_HOLDER))
            with contextlib.suppress(MlflowException):
                mlflow_client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise GateBusy(f"the champion gate of model {name!r} has been held by {tags.get(TAG_LOCK_HOLDER)} for "
                           f"more than {wait_s:.0f} s; retry later (the pipeline outputs are untouched)")
        if not waited:
            log.info("waiting for the champion gate of %s (held by %s)", name, tags.get(TAG_LOCK_HOLDER))
            waited = True
        time.sleep(random.uniform(0.2, 0.6))
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            current = mlflow_client.get_registered_model(lock).tags or {}
            if current.get(TAG_LOCK_HOLDER) == holder:
                mlflow_client.delete_registered_model(lock)


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
    mkey = tags.get(tracking.TAG_MODEL_KEY)
    if mkey and (same := versions_of_model(mlflow_client, name, mkey)):
        log.info("this adapter (model key %s) is already registered as %s version %s (run %s): not registering "
                 "it again", mkey[:12], name, same[0].version, same[0].run_id)
        return same[0], False
    key = tags.get(tracking.TAG_RUN_KEY)
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


def version_metrics(mlflow_client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """The metrics of the run a version came from (empty if it has no run)."""
    from mlflow.exceptions import MlflowException

    if not mv.run_id:
        return {}
    try:
        return dict(mlflow_client.get_run(mv.run_id).data.metrics)
    except MlflowException as exc:
        if _is_missing(exc):
            return {}
        raise


def decide(
    mlflow_client: MlflowClient,
    name: str,
    version: str,
    challenger_metrics: Mapping[str, Any],
    rc: RegisterConfig,
    source: str = "auto",
    force: bool = False,
    locked: bool = False,
) -> Decision:
    """Gate `version` against the current champion, move `champion` if it wins, and record the decision,
    holding the model's gate lock (`gate_lock`; `locked`: the caller holds it already)."""
    with contextlib.nullcontext() if locked else gate_lock(mlflow_client, name):
        champ = alias_version(mlflow_client, name, CHAMPION)
        fields = dict(metric=rc.metric, direction=rc.direction, min_delta=rc.min_delta, source=source)
        if champ is not None and str(champ.version) == str(version):
            value = _num(challenger_metrics.get(rc.metric))
            d = Decision(True, f"version {version} is already the champion", challenger_value=value,
                         champion_value=value, champion_version=str(version), **fields)
        else:
            champ_metrics = version_metrics(mlflow_client, champ) if champ is not None else None
            d = replace(gate(challenger_metrics, champ_metrics, rc, str(champ.version) if champ else None), source=source)
            if force and not d.promote:
                d = replace(d, promote=True, forced=True, reason=f"forced by hand; the gate said: {d.reason}")
            if d.promote:
                mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
        record(mlflow_client, name, str(version), d)
        log.info("%s version %s: %s (%s)", name, version, "promoted to champion" if d.promote else "not promoted",
                 d.reason)
        return d


def record(mlflow_client: MlflowClient, name: str, version: str, d: Decision) -> None:
    """Write a decision as version tags, as tags of the version's run and as a run artifact."""
    from mlflow.exceptions import MlflowException

    tags = {k: tracking.scrub(v) for k, v in d.tags().items()}
    for k, v in tags.items():  # the decision tag comes last: it marks the decision as recorded
        mlflow_client.set_model_version_tag(name, version, k, v)
    mv = mlflow_client.get_model_version(name, version)
    if not mv.run_id:
        return
    try:
        for k, v in tags.items():
            mlflow_client.set_tag(mv.run_id, k, v)
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = "unknown"
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")  # one file per decision
        mlflow_client.log_dict(mv.run_id, {**asdict(d), "model_name": name, "version": version, "by": who,
                                           "at": tags["milora.decision.at"]},
                               f"decisions/v{version}-{d.source}-{stamp}.json")
    except MlflowException as exc:
        if not _is_missing(exc):
            raise
        log.warning("the run %s of %s version %s is gone: decision recorded on the version only",
                    mv.run_id, name, version)


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
        tracking.check_reachable(uri, retries=0)
        return True
    except tracking.TrackingUnavailableError:
        return False


def register_run(cfg: Config, paths: Paths) -> Registration:
    """Log, register and gate this project's pipeline outputs; idempotent and safe to retry."""
    from mlflow.exceptions import MlflowException

    _check_outputs(paths)
    rc = cfg.register
    uri = tracking.tracking_uri(paths.root)
    key = tracking.run_key(paths)
    with tracking.bounded_http(rc):
        tracking.check_reachable(uri, rc.connect_retries, rc.retry_backoff_s)
        try:
            return _register(cfg, paths, key)
        except (MlflowException, OSError) as exc:
            if isinstance(exc, tracking.TrackingUnavailableError) or tracking.is_embedded(uri) or _probe(uri):
                raise
            raise tracking.unavailable(uri, f"lost during registration: {type(exc).__name__}",
                                       rc.connect_retries) from None


def _own_version(mlflow_client: MlflowClient, mv: ModelVersion) -> bool:
    """Whether `mv` was registered by this very pipeline run (`MLFLOW_RUN_ID`, or a run of this Prefect flow
    run): then registering is a retry, which goes the whole way again (idempotently) to finish its run."""
    from mlflow.exceptions import MlflowException

    if not mv.run_id:
        return False
    if mv.run_id == os.environ.get(tracking.ENV_RUN_ID, "").strip():
        return True
    flow = tracking.prefect_flow_run_id()
    if not flow:
        return False
    try:
        return mlflow_client.get_run(mv.run_id).data.tags.get(tracking.TAG_PREFECT) == flow
    except MlflowException:
        return False


def _recorded_or_decide(mlflow_client: MlflowClient, name: str, version: str, metrics: Mapping[str, Any],
                        rc: RegisterConfig) -> Decision:
    """The decision recorded on `version`, else the gate's (the caller holds the gate lock)."""
    recorded = mlflow_client.get_model_version(name, version).tags
    if TAG_DECISION in recorded:
        decision = Decision.from_tags(recorded)
        log.info("%s version %s was already decided: %s", name, version, decision.reason)
        return decision
    return decide(mlflow_client, name, version, metrics, rc, locked=True)


def _register(cfg: Config, paths: Paths, key: str) -> Registration:
    rc = cfg.register
    c = tracking.client(paths.root)
    mkey = tracking.model_key(paths)
    same = versions_of_model(c, rc.model_name, mkey)
    if same and not _own_version(c, same[0]):
        mv = same[0]
        with gate_lock(c, rc.model_name):
            decision = _recorded_or_decide(c, rc.model_name, str(mv.version), version_metrics(c, mv), rc)
        reg = Registration(rc.model_name, str(mv.version), mv.run_id or "", False, decision, reused=True)
        log.info("register: %s", reg.summary)
        return reg
    experiment_id = tracking.ensure_experiment(c, rc.experiment, paths.root)
    lineage = tracking.read_lineage(paths)
    lineage_tags = tracking.lineage_tags(cfg, paths, lineage)  # once: it hashes data/prepared
    run_name = f"{lineage_tags['milora.method']}-r{lineage_tags['milora.rank']}-{key[:8]}"
    run_id = tracking.ensure_run(c, experiment_id, key, run_name=run_name)
    tracking.log_pipeline_run(c, run_id, cfg, paths, key, lineage_tags)
    source = log_model(c, run_id, cfg, paths)
    version_tags = {k: v for k, v in lineage_tags.items() if not k.startswith("mlflow.") and k != "milora.svd_cache_keys"}
    version_tags[tracking.TAG_RUN_KEY] = key
    version_tags[tracking.TAG_MODEL_KEY] = mkey
    # Find-or-create the version and decide, holding the gate: two registrations of one model at once decide
    # one after the other (and two of the same adapter make one version).
    with gate_lock(c, rc.model_name):
        mv, created = ensure_version(c, rc.model_name, run_id, source, version_tags)
        version = str(mv.version)
        c.set_registered_model_alias(rc.model_name, CHALLENGER, version)
        decision = _recorded_or_decide(c, rc.model_name, version, version_metrics(c, mv), rc)
    c.set_tag(run_id, "milora.model_version", f"{rc.model_name}/{version}")
    if not os.environ.get(tracking.ENV_RUN_ID) and c.get_run(run_id).info.status == "RUNNING":
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
        "tracking_uri": tracking.redact_uri(tracking.tracking_uri(paths.root)),
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
    uri = tracking.tracking_uri(root)
    with tracking.bounded_http(rc):
        tracking.check_reachable(uri, rc.connect_retries, rc.retry_backoff_s)
        c = tracking.client(root)
        try:
            c.get_registered_model(model_name)
        except MlflowException as exc:
            if _is_missing(exc):
                raise InvalidInput(f"no registered model {model_name!r} on {tracking.redact_uri(uri)}: check --model "
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
                if _is_missing(exc):
                    raise InvalidInput(f"model {model_name!r} has no version {version}") from None
                raise
        return decide(c, model_name, str(mv.version), version_metrics(c, mv), rc, source="manual", force=force)
