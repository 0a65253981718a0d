"""MLflow tracking: where runs live, one MLflow run per pipeline run, and what gets logged to it.

* Store: `MLFLOW_TRACKING_URI` when set (e.g. the project's `mlflow server`), else the embedded store
  `sqlite:///<root>/mlflow/mlflow.db` with artifacts under `<root>/mlflow/artifacts/` (no server).
* One run per pipeline run: the register step joins `MLFLOW_RUN_ID` when the caller sets it (the Prefect
  flow creates it with `ensure_run` and exports it); without one, the run is found again by the
  Prefect flow-run id, or by the content key of the outputs being logged, so a retry never forks it.
* `log_pipeline_run` logs the flattened params, the metrics JSON files, the training-loss curve,
  lineage tags (git commit, DVC data hash, base identity, SVD cache keys, method, Prefect flow run)
  and the artifacts (adapter, dvc.lock, plots, eval predictions). Missing optional files are skipped
  with a log line. It is idempotent: a run already logged with the same outputs is left as is.
* Credentials never reach MLflow or the logs: user:password in an http(s) tracking URI is moved to
  `MLFLOW_TRACKING_USERNAME/PASSWORD`; every logged string, and every text artifact, is scrubbed of
  URL passwords and of the values of secret environment variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.core.errors import InvalidInput, UnavailableError
from milora.core.io import file_digest
from milora.pipeline.config import Config, RegisterConfig, flatten
from milora.pipeline.paths import Paths

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_RUN_ID = "MLFLOW_RUN_ID"
ENV_PREFECT_FLOW_RUN = "PREFECT__FLOW_RUN_ID"
TAG = "milora."
TAG_RUN_KEY = "milora.run_key"
TAG_MODEL_KEY = "milora.model_key"
TAG_LOGGED = "milora.logged"
TAG_PREFECT = "milora.prefect_flow_run_id"
PREFIXED = ("data", "base", "svd", "train")  # logged as `<name>.<key>`; eval metrics are unprefixed
LOSS_METRIC = "train_loss"
PARAM_PRECISION = "train.precision_resolved"  # what train.precision resolved to (lineage `precision`)

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL|SESSION_KEY", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]+@")
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /:]")
_TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".lock", ".dvc", ".yaml", ".yml", ".txt", ".md", ".py"}


class TrackingUnavailableError(UnavailableError):
    """The MLflow tracking server could not be reached (after bounded retries)."""


# ----------------------------------------------------------------------------- credentials


def _secret_values() -> dict[str, str]:
    """Values of secret-looking environment variables (name -> value), long enough to be real secrets."""
    out = {}
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) and not name.upper().endswith("_ID") and len(value) >= 8:
            out[name] = value
    return out


def scrub(text: str) -> str:
    """`text` with URL user:password parts and secret environment values replaced by `***`."""
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    for value in sorted(_secret_values().values(), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def redact_uri(uri: str) -> str:
    """A URI safe to print: any user:password part replaced by `***`."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", uri)


def _move_userinfo_to_env(uri: str) -> str:
    """For http(s) URIs, move `user:password@` into MLflow's credential env vars; return the clean URI."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    if user:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(password))
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def scrubbed_copy(src: Path, workdir: Path) -> Path:
    """`src` (file or directory) if no text file in it holds a credential, else a copy in `workdir` with them scrubbed."""
    import shutil

    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    dirty: dict[Path, bytes] = {}
    for f in files:
        if f.suffix.lower() in _TEXT_SUFFIXES:
            raw = f.read_bytes()
            text = raw.decode("utf-8", errors="surrogateescape")
            clean = scrub(text)
            if clean != text:
                dirty[f] = clean.encode("utf-8", errors="surrogateescape")
    if not dirty:
        return src
    workdir.mkdir(parents=True, exist_ok=True)
    dst = Path(tempfile.mkdtemp(prefix="scrubbed-", dir=workdir)) / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    for f, data in dirty.items():
        (dst / f.relative_to(src) if src.is_dir() else dst).write_bytes(data)
        log.warning("%s holds a credential: logging a copy with it replaced by ***", f)
    return dst


# ----------------------------------------------------------------------------- store


def tracking_uri(root: str | os.PathLike[str] = ".") -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded store `sqlite:///<abs root>/mlflow/mlflow.db`."""
    env = os.environ.get(ENV_URI, "").strip()
    if env:
        return env
    return "sqlite:///" + str((Path(root) / "mlflow" / "mlflow.db").resolve())


def artifacts_dir(root: str | os.PathLike[str] = ".") -> Path:
    """Where the embedded store keeps artifacts: `<abs root>/mlflow/artifacts`."""
    return (Path(root) / "mlflow" / "artifacts").resolve()


def is_embedded(uri: str) -> bool:
    """True for a local store MLflow opens in-process (SQLite or a directory), false for a server."""
    return urllib.parse.urlsplit(uri).scheme not in ("http", "https", "databricks")


def client(root: str | os.PathLike[str] = ".") -> MlflowClient:
    """An `MlflowClient` on this project's tracking store (and model registry), credentials kept out of URIs."""
    from mlflow.tracking import MlflowClient

    uri = _move_userinfo_to_env(tracking_uri(root))
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str, retries: int = 3, backoff_s: float = 2.0) -> None:
    """For a tracking server, wait until `/health` answers (bounded retries); raise `TrackingUnavailableError`."""
    if is_embedded(uri):
        return
    clean = _move_userinfo_to_env(uri).rstrip("/")
    last = ""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(clean + "/health", timeout=10) as resp:
                if resp.status < 500:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return  # the server answers (e.g. behind auth): reachable
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = type(exc).__name__ + (f": {exc.reason}" if isinstance(exc, urllib.error.URLError) else "")
        if attempt < retries:
            wait = backoff_s * 2**attempt
            log.warning("MLflow at %s not reachable (%s); retry %d/%d in %.1fs",
                        redact_uri(uri), scrub(last), attempt + 1, retries, wait)
            time.sleep(wait)
    raise unavailable(uri, last, retries)


def unavailable(uri: str, cause: str, retries: int) -> TrackingUnavailableError:
    """The one clear error for an unreachable tracking server."""
    return TrackingUnavailableError(
        f"MLflow tracking server {redact_uri(uri)} is unreachable ({scrub(cause)}) after {retries + 1} "
        f"attempt(s). Start it (make mlflow-server), or point MLFLOW_TRACKING_URI at a running server "
        "(unset it to use the embedded store), then retry: the pipeline outputs are untouched and the "
        "same run will be registered."
    )


@contextlib.contextmanager
def bounded_http(rc: RegisterConfig) -> Iterator[None]:
    """Within the block, MLflow's HTTP retries follow the register config and its progress bars stay off (unless set)."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(rc.connect_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(max(1, round(rc.retry_backoff_s))),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def ensure_experiment(mlflow_client: MlflowClient, name: str, root: str | os.PathLike[str] = ".") -> str:
    """The id of experiment `name`, created if needed (embedded store: artifacts in `<root>/mlflow/artifacts/<name>`)."""
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise InvalidInput(
                f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore) or set "
                "register.experiment to another name in params.yaml"
            )
        return exp.experiment_id
    location = None
    if is_embedded(mlflow_client.tracking_uri):
        location = (artifacts_dir(root) / re.sub(r"[^\w.\-]", "_", name)).as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another stage
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------- the pipeline run


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


# ----------------------------------------------------------------------------- what gets logged


def metric_key(key: str) -> str:
    """A valid MLflow metric/param key (characters MLflow refuses become `_`)."""
    return _BAD_KEY_CHARS.sub("_", key)[:250]


def numeric_metrics(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics mapping as `prefix + dotted.key -> float` (bools as 0/1)."""
    out = {}
    for k, v in flatten(data).items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, int | float) and not (isinstance(v, float) and math.isinf(v)):
            out[metric_key(prefix + k)] = float(v)
    return out


def collect_metrics(paths: Paths) -> dict[str, float]:
    """Every numeric result of a run, from each stage's `reports/<name>.json` (all its numbers; the DVC
    metrics file when there is no report) and `timings/<name>.json` (its run facts): eval unprefixed, the
    other stages as `<name>.<key>`."""
    out: dict[str, float] = {}
    for stage in (*PREFIXED, "eval"):
        p = paths.report(stage) if paths.report(stage).is_file() else paths.metrics(stage)
        for f in (p, paths.timings(stage)):
            if not f.is_file():
                log.info("no %s: skipping its metrics", f)
                continue
            data = _read_json_or_none(f)
            if isinstance(data, Mapping):
                out.update(numeric_metrics(data, "" if stage == "eval" else f"{stage}."))
    return out


def read_loss_curve(path: Path) -> list[tuple[int, float]]:
    """`(step, loss)` rows of `plots/train_loss.csv` (header `step,loss`); bad rows are skipped."""
    import csv

    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                rows.append((int(float(row["step"])), float(row["loss"])))
            except (KeyError, TypeError, ValueError):
                continue
    return rows


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s): skipped", path, exc)
        return None


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def dvc_data_hashes(root: Path) -> dict[str, str]:
    """DVC content hashes: `data_hash` (the `data/prepared` out of `prepare` in dvc.lock), `raw_data_hash` (data/raw.dvc)."""
    import yaml

    out: dict[str, str] = {}
    lock = root / "dvc.lock"
    if lock.is_file():
        try:
            stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
            # the prepared data (prepare's out) and the raw data version (ingest's out)
            for stage, path, key in (("prepare", "data/prepared", "data_hash"), ("ingest", "data/raw", "raw_data_hash"),
                                     ("ingest", "data/suites", "suites_data_hash")):
                for o in (stages.get(stage) or {}).get("outs", []) or []:
                    if str(o.get("path", "")).rstrip("/") == path and o.get("md5"):
                        out[key] = str(o["md5"])
        except (yaml.YAMLError, AttributeError) as exc:
            log.warning("cannot read %s (%s): no DVC data hash from it", lock, exc)
    else:
        log.info("no %s: no DVC data hash from it", lock)
    raw = root / "data" / "raw.dvc"
    if raw.is_file():
        with contextlib.suppress(yaml.YAMLError, AttributeError, IndexError, TypeError):
            outs = (yaml.safe_load(raw.read_text(encoding="utf-8")) or {}).get("outs") or []
            if outs and outs[0].get("md5"):
                out["raw_data_hash"] = str(outs[0]["md5"])
    return out


def read_lineage(paths: Paths) -> dict[str, Any]:
    """`models/adapter/lineage.json` (empty if missing), with `base` filled from `models/base.json` when absent."""
    p = paths.adapter_dir / "lineage.json"
    lineage = _read_json_or_none(p) if p.is_file() else None
    if lineage is None:
        log.info("no %s: lineage comes from the other outputs only", p)
        lineage = {}
    if not lineage.get("base") and paths.base_json.is_file():
        lineage["base"] = _read_json_or_none(paths.base_json) or {}
    return lineage


def lineage_tags(cfg: Config, paths: Paths, lineage: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The lineage tags of a run: git commit, DVC data hashes, base identity, SVD cache keys, method, suites'
    content hashes, Prefect run."""
    lin = dict(lineage if lineage is not None else read_lineage(paths))
    tags: dict[str, str] = {}
    commit = lin.get("git_commit") or _git_commit(paths.root)
    if commit:
        tags["milora.git_commit"] = str(commit)
        tags["mlflow.source.git.commit"] = str(commit)
    dvc = dvc_data_hashes(paths.root)
    content = lin.get("data_hash")  # sha256 over data/prepared's files, recorded by the train stage
    data_hash = dvc.get("data_hash") or content  # the DVC version of data/prepared when there is one
    if data_hash:
        tags["milora.data_hash"] = str(data_hash)
    if content:
        tags["milora.data_sha256"] = str(content)
        if paths.prepared_dir.is_dir() and file_digest(paths.prepared_dir) != content:
            log.warning("the adapter was trained on other data than data/prepared holds now (stale outputs? "
                        "`dvc repro` retrains): tagging the run milora.data_stale=true")
            tags["milora.data_stale"] = "true"
    if dvc.get("raw_data_hash"):
        tags["milora.raw_data_hash"] = dvc["raw_data_hash"]
    if dvc.get("suites_data_hash"):
        tags["milora.suites_data_hash"] = dvc["suites_data_hash"]
    tags.update(suite_tags(paths))
    for k, v in sorted((lin.get("base") or {}).items()):
        if v is not None and not isinstance(v, Mapping | list):
            tags[f"milora.base.{k}"] = str(v)
    keys = lin.get("svd_cache_keys") or {}
    if isinstance(keys, Mapping):
        blob = json.dumps(dict(keys), sort_keys=True, separators=(",", ":"))
        tags["milora.svd_cache_keys.count"] = str(len(keys))
        tags["milora.svd_cache_keys.sha256"] = hashlib.sha256(blob.encode()).hexdigest()
        if len(blob) <= 5000:
            tags["milora.svd_cache_keys"] = blob
    tags["milora.method"] = str(lin.get("method") or cfg.adapter.method)
    if lin.get("precision"):
        tags["milora.precision"] = str(lin["precision"])  # what train.precision resolved to: fp32 | bf16 | fp16
    tags["milora.rank"] = str(lin.get("rank") or cfg.adapter.rank)
    flow = prefect_flow_run_id()
    if flow:
        tags[TAG_PREFECT] = flow
    return {k: scrub(v) for k, v in tags.items()}


def suite_tags(paths: Paths) -> dict[str, str]:
    """The content hash of each benchmark suite the evaluate stage scored (`milora.suite.<name>.sha256`) and of
    the lm-eval task directory (`milora.lm_eval_include_sha256`), from `reports/eval.json`."""
    report = _read_json_or_none(paths.report("eval")) if paths.report("eval").is_file() else None
    if not isinstance(report, Mapping):
        return {}
    tags = {f"milora.suite.{name}.sha256": str(s["sha256"]) for name, s in sorted((report.get("suites") or {}).items())
            if isinstance(s, Mapping) and s.get("sha256")}
    if report.get("lm_eval_include_sha256"):
        tags["milora.lm_eval_include_sha256"] = str(report["lm_eval_include_sha256"])
    return tags


def run_params(cfg: Config, lineage: Mapping[str, Any]) -> dict[str, str]:
    """Flattened params: the config, overridden by the adapter's lineage params (what trained it), and
    `train.precision_resolved`, what `train.precision` (e.g. `auto`) resolved to when it trained; scrubbed."""
    merged = {**cfg.flat(), **flatten(lineage.get("params") or {})}
    if lineage.get("precision"):
        merged[PARAM_PRECISION] = lineage["precision"]
    out = {}
    for k, v in merged.items():
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        out[metric_key(k)] = scrub(text)[:6000]
    return out


ARTIFACTS: tuple[tuple[str, str], ...] = (
    # (path relative to the root, artifact directory)
    ("models/adapter", "adapter"),
    ("dvc.lock", "lineage"),
    ("data/raw.dvc", "lineage"),
    ("models/base.json", "lineage"),
    ("metrics/data.json", "metrics"),
    ("metrics/base.json", "metrics"),
    ("metrics/svd.json", "metrics"),
    ("metrics/train.json", "metrics"),
    ("metrics/eval.json", "metrics"),
    ("reports/data.json", "reports"),
    ("reports/base.json", "reports"),
    ("reports/svd.json", "reports"),
    ("reports/train.json", "reports"),
    ("reports/eval.json", "reports"),
    ("timings/base.json", "timings"),
    ("timings/svd.json", "timings"),
    ("timings/svd_matrices.json", "timings"),
    ("timings/train.json", "timings"),
    ("timings/eval.json", "timings"),
    ("plots/train_loss.csv", "plots"),
    ("plots/spectrum.png", "plots"),
    ("eval/predictions.jsonl", "eval"),
    ("eval/suites", "eval/suites"),
)


def log_pipeline_run(mlflow_client: MlflowClient, run_id: str, cfg: Config, paths: Paths,
                     key: str | None = None, tags: Mapping[str, str] | None = None) -> bool:
    """Log params, metrics, lineage tags (`tags` when the caller has them) and artifacts of the outputs
    under `paths` into `run_id`.

    Idempotent: returns False without logging when the run is already marked logged for the same
    outputs (`key`); raises ValueError if it was logged for different outputs.
    """
    from mlflow.entities import Metric, Param, RunTag

    key = key or run_key(paths)
    run = mlflow_client.get_run(run_id)
    done = run.data.tags.get(TAG_LOGGED)
    if done == key:
        log.info("MLflow run %s already holds these outputs: not logging them again", run_id)
        return False
    if done:
        raise InvalidInput(
            f"MLflow run {run_id} already holds other pipeline outputs (key {done[:12]}, these are {key[:12]}): "
            f"unset {ENV_RUN_ID} (or start a new pipeline run) so that these outputs get their own run"
        )
    lineage = read_lineage(paths)
    tags = {**(tags if tags is not None else lineage_tags(cfg, paths, lineage)), TAG_RUN_KEY: key}
    params = run_params(cfg, lineage)
    existing = run.data.params
    params = {k: v for k, v in params.items() if k not in existing}
    metrics = collect_metrics(paths)
    now = int(time.time() * 1000)
    batch_metrics = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
    loss = paths.plot("train_loss.csv")
    if LOSS_METRIC in run.data.metrics:
        log.info("run %s already has %s (logged live by the train stage): not re-logging the CSV", run_id, LOSS_METRIC)
    elif loss.is_file():
        batch_metrics += [Metric(LOSS_METRIC, v, now, s) for s, v in read_loss_curve(loss)]
    else:
        log.info("no %s: no per-step training loss", loss)
    for i in range(0, len(batch_metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=batch_metrics[i : i + 1000], synchronous=True)
    plist = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(plist), 100):
        mlflow_client.log_batch(run_id, params=plist[i : i + 100], synchronous=True)
    tlist = [RunTag(k, v) for k, v in sorted(tags.items())]
    for i in range(0, len(tlist), 100):
        mlflow_client.log_batch(run_id, tags=tlist[i : i + 100], synchronous=True)
    mlflow_client.log_dict(run_id, {**tags, "svd_cache_keys": lineage.get("svd_cache_keys") or {}},
                           "lineage/lineage.json")
    with tempfile.TemporaryDirectory(prefix="milora-artifacts-") as tmp:
        for src, dest in ARTIFACTS:
            p = paths.root / src
            if not p.exists():
                log.info("no %s: not logged", p)
                continue
            p = scrubbed_copy(p, Path(tmp))
            if p.is_dir():
                mlflow_client.log_artifacts(run_id, str(p), dest)
            else:
                mlflow_client.log_artifact(run_id, str(p), dest)
    mlflow_client.set_tag(run_id, TAG_LOGGED, key)
    log.info("logged %d params, %d metrics, %d tags and the artifacts to MLflow run %s",
             len(plist), len(batch_metrics), len(tlist), run_id)
    return True
