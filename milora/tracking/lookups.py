"""Lookups in the model registry: the version an alias points at, the versions of a run or of a content key
(run key, model key), and the metrics of the run a version came from."""

from __future__ import annotations

from typing import TYPE_CHECKING

from milora.tracking.identity import TAG_MODEL_KEY, TAG_RUN_KEY

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient


def is_missing(exc: Exception) -> bool:
    """Whether an `MlflowException` says that what was asked for does not exist."""
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def alias_version(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_missing(exc) or "alias" in str(exc).lower():
            return None
        raise


def versions_of_run(mlflow_client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """Versions of model `name` registered from `run_id` (oldest first)."""
    found = mlflow_client.search_model_versions(f"run_id='{run_id}'")
    return sorted((v for v in found if v.name == name), key=lambda v: int(v.version))


def versions_of_key(mlflow_client: MlflowClient, name: str, key: str,
                    tag: str = TAG_RUN_KEY) -> list[ModelVersion]:
    """Versions of model `name` whose `tag` (default: the run key of their outputs) is `key` (oldest first)."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client.search_model_versions(f"name='{name}' and tags.`{tag}` = '{key}'")
    except MlflowException as exc:
        if is_missing(exc):
            return []
        raise
    return sorted(found, key=lambda v: int(v.version))


def versions_of_model(mlflow_client: MlflowClient, name: str, model_key: str) -> list[ModelVersion]:
    """Versions of model `name` holding the adapter with content key `model_key` (oldest first)."""
    return versions_of_key(mlflow_client, name, model_key, TAG_MODEL_KEY)


def version_metrics(mlflow_client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """The metrics of the run a version came from (empty if it has no run)."""
    from mlflow.exceptions import MlflowException

    if not mv.run_id:
        return {}
    try:
        return dict(mlflow_client.get_run(mv.run_id).data.metrics)
    except MlflowException as exc:
        if is_missing(exc):
            return {}
        raise
