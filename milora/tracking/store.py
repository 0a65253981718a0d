"""Where MLflow runs and models live, and how the client reaches them.

* Store: `MLFLOW_TRACKING_URI` when set (e.g. the project's `mlflow server`), else the embedded store
  `sqlite:///<root>/mlflow/mlflow.db` with artifacts under `<root>/mlflow/artifacts/` (no server).
* Credentials stay out of URIs: user:password in an http(s) tracking URI is moved to
  `MLFLOW_TRACKING_USERNAME/PASSWORD` before a client opens it.
* An unreachable server is retried by MLflow's own HTTP client (urllib3 retries), configured from
  `register.connect_retries` / `register.retry_backoff_s` (`bounded_http`), then fails with one clear
  `TrackingUnavailableError` naming the server.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from milora.core.errors import InvalidInput, UnavailableError
from milora.pipeline.config import RegisterConfig
from milora.tracking.scrub import redact_uri, scrub

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

ENV_URI = "MLFLOW_TRACKING_URI"
HEALTH_TIMEOUT_S = 10  # one /health request; MLflow's retries come on top
# MLflow refuses retries and backoff factors above these limits unless raised (its own internal settings)
_RETRY_LIMITS = (("_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT", 10), ("_MLFLOW_HTTP_REQUEST_MAX_BACKOFF_FACTOR_LIMIT", 120))


class TrackingUnavailableError(UnavailableError):
    """The MLflow tracking server could not be reached (after bounded retries)."""


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


def client(root: str | os.PathLike[str] = ".") -> MlflowClient:
    """An `MlflowClient` on this project's tracking store (and model registry), credentials kept out of URIs."""
    from mlflow.tracking import MlflowClient

    uri = _move_userinfo_to_env(tracking_uri(root))
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def http_settings(rc: RegisterConfig) -> dict[str, str]:
    """MLflow's HTTP client settings for the register config: `connect_retries` retries, the first at once and
    then about `retry_backoff_s` apart, doubling (urllib3 waits 0, 2f, 4f, ... for MLflow's integer backoff
    factor f, so f = retry_backoff_s / 2, rounded), 120 s per request, no progress bars."""
    factor = math.floor(rc.retry_backoff_s / 2 + 0.5)
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(rc.connect_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    for (name, limit), wanted in zip(_RETRY_LIMITS, (rc.connect_retries, factor), strict=True):
        if wanted > limit:
            settings[name] = str(wanted)
    return settings


@contextlib.contextmanager
def bounded_http(rc: RegisterConfig) -> Iterator[None]:
    """Within the block, MLflow's HTTP client follows `http_settings(rc)` (settings already in the environment
    win)."""
    wanted = http_settings(rc)
    added = [k for k in wanted if k not in os.environ]
    for k in added:
        os.environ[k] = wanted[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a failed request, e.g. `NewConnectionError: ... Connection refused`."""
    while True:
        nxt = getattr(exc, "reason", None) if isinstance(getattr(exc, "reason", None), BaseException) else None
        nxt = nxt or exc.__cause__ or exc.__context__ or (exc.args[0] if exc.args and
                                                          isinstance(exc.args[0], BaseException) else None)
        if nxt is None:
            return f"{type(exc).__name__}: {exc}"
        exc = nxt


def check_reachable(uri: str, retries: int) -> None:
    """For a tracking server, ask `/health` once through MLflow's own HTTP client, which retries it `retries`
    times (backoff as `bounded_http` configures); raise `TrackingUnavailableError` when it never answers."""
    if is_embedded(uri):
        return
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    try:
        resp = http_request(MlflowHostCreds(_move_userinfo_to_env(uri).rstrip("/")), "/health", "GET",
                            max_retries=retries, timeout=HEALTH_TIMEOUT_S, raise_on_status=False)
    except Exception as exc:  # MLflow wraps every failed request (refused, timed out, bad URL) in MlflowException
        raise unavailable(uri, _root_cause(exc), retries) from None
    if resp.status_code >= 500:  # below 500 the server answers (e.g. behind auth): reachable
        raise unavailable(uri, f"HTTP {resp.status_code}", retries)


def unavailable(uri: str, cause: str, retries: int) -> TrackingUnavailableError:
    """The one clear error for an unreachable tracking server."""
    return TrackingUnavailableError(
        f"MLflow tracking server {redact_uri(uri)} is unreachable ({scrub(cause)}) after {retries + 1} "
        f"attempt(s). Start it (make mlflow-server), or point MLFLOW_TRACKING_URI at a running server "
        "(unset it to use the embedded store), then retry: the pipeline outputs are untouched and the "
        "same run will be registered."
    )


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
