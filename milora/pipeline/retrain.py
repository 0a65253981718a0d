"""Is there anything to retrain? The "nothing to retrain" decision of a scheduled run.

After each registration the flow remembers, in `.milora/registered.json`, the pipeline state it registered:
the digest of `dvc.lock` (the data version, params, code and outputs of every stage), the model name and
the registration. A later run in the same workspace whose stages are all up to date and whose `dvc.lock` and
model name are those ends as "nothing to retrain", registering nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from milora.core.io import read_json, write_json
from milora.pipeline.dvcstate import lock_digest

REGISTERED_FILE = Path(".milora") / "registered.json"
NOTHING_TO_RETRAIN = "nothing to retrain"


def last_registered(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The pipeline state last registered from this workspace (`REGISTERED_FILE`), or None."""
    path = Path(root) / REGISTERED_FILE
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None


def already_registered(root: str | os.PathLike[str], model_name: str) -> dict[str, Any] | None:
    """The last registration when this exact pipeline state (`dvc.lock`) was last registered from this workspace
    under `model_name` (then there is nothing to retrain), else None. Ask it with every stage up to date."""
    last = last_registered(root) or {}
    if last and last.get("lock") == lock_digest(root) and last.get("model_name") == model_name:
        return last
    return None


def remember_registered(root: str | os.PathLike[str], model_name: str, registration: dict[str, Any],
                        data_version: str | None, flow_run_id: str | None) -> Path:
    """Write `REGISTERED_FILE`: the pipeline state (`dvc.lock`'s digest) just registered as `registration`."""
    return write_json(Path(root) / REGISTERED_FILE, {
        "lock": lock_digest(root), "model_name": model_name, "version": registration.get("version"),
        "data_version": data_version, "flow_run_id": flow_run_id,
        "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "registration": registration})
