"""The champion gate's lock: a mutex made of a registered model, so that concurrent registrations of one model
(parallel workers sharing one MLflow server) decide one after the other, each against the champion the previous
one left: the champion ends on the best version that passed its guards."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from milora.core.errors import UnavailableError
from milora.tracking.lookups import is_missing

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

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
            if is_missing(exc):
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
