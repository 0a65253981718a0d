"""The workspace lock: one pipeline run at a time per project root.

Two runs in one workspace would interleave stage outputs, `params.yaml` and `dvc.lock`, so a run holds
an exclusive `flock` on `.milora/workspace.lock` for its whole duration, and records who holds it
(pid, host, flow-run id, start time) in `.milora/workspace.lock.json`. A second run fails at once with
"another run holds the workspace since ...".

The kernel releases an `flock` when its holder dies, so a run that was killed never blocks the next
one: the next run finds the lock free, reports the stale record left behind (its pid is gone) and takes
over. The lock file itself is never deleted (deleting it would let two processes lock two different
inodes); only the record is. Stage subprocesses can inherit the lock's descriptor (`fileno()`), so a
stage still running after its orchestrator was killed keeps the workspace locked until it exits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from milora.core.errors import UserError
from milora.core.io import atomic_write_text

log = logging.getLogger(__name__)

LOCK_DIR = ".milora"
LOCK_FILE = "workspace.lock"
RECORD_FILE = "workspace.lock.json"


# The locks this process holds, by resolved root (for subprocesses that must inherit them).
_HELD: dict[Path, WorkspaceLock] = {}


class WorkspaceBusy(UserError):
    """Another run holds the workspace lock; the message says who and since when."""


@dataclass(frozen=True)
class LockRecord:
    """Who holds (or last held) the workspace: process `pid` on `host` since `started_at` (local time, ISO
    8601), running `command` (e.g. `milora run`), for Prefect flow run `flow_run_id` once it is known."""

    pid: int
    host: str
    started_at: str
    command: str | None = None
    flow_run_id: str | None = None

    def describe(self) -> str:
        """`since <time> (pid P on host H, flow run F)`."""
        who = f"pid {self.pid} on host {self.host}"
        if self.flow_run_id:
            who += f", flow run {self.flow_run_id}"
        if self.command:
            who += f", {self.command}"
        return f"since {self.started_at} ({who})"

    def pid_alive(self) -> bool | None:
        """Whether the holder's pid still runs; None when the holder is on another host (unknowable)."""
        if self.host != socket.gethostname():
            return None
        return pid_alive(self.pid)


def held_lock(root: str | os.PathLike[str]) -> WorkspaceLock | None:
    """The lock this process holds on `root`, if any."""
    return _HELD.get(Path(root).resolve())


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def read_record(root: str | os.PathLike[str]) -> LockRecord | None:
    """The current lock record under `root`, or None (no record, or unreadable)."""
    path = Path(root) / LOCK_DIR / RECORD_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return LockRecord(**{k: data.get(k) for k in LockRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


class WorkspaceLock:
    """Exclusive, non-blocking lock on a project root; use as a context manager or acquire()/release()."""

    def __init__(self, root: str | os.PathLike[str], flow_run_id: str | None = None,
                 command: str | None = None):
        self.root = Path(root).resolve()
        self.flow_run_id = flow_run_id
        self.command = command
        self.lock_path = self.root / LOCK_DIR / LOCK_FILE
        self.record_path = self.root / LOCK_DIR / RECORD_FILE
        self._fd: int | None = None
        self.stale: LockRecord | None = None  # record left by a holder that died without releasing

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def fileno(self) -> int:
        """The locked descriptor (pass it to subprocesses that must keep the workspace locked)."""
        if self._fd is None:
            raise RuntimeError("workspace lock is not held")
        return self._fd

    def acquire(self) -> WorkspaceLock:
        """Take the lock or raise `WorkspaceBusy` naming the holder."""
        if self._fd is not None:
            return self
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise WorkspaceBusy(self._busy_message()) from None
        self._fd = fd
        _HELD[self.root] = self
        previous = read_record(self.root)
        if previous is not None:
            # The lock was free, so whoever wrote this record is gone without releasing.
            self.stale = previous
            log.warning("taking over a stale workspace lock left %s: that process is gone",
                        previous.describe())
        self._write_record(_now())
        return self

    def check_free(self) -> None:
        """Raise `WorkspaceBusy` now if another process holds the lock, creating nothing: a busy workspace fails
        at once, before slower checks (`acquire` still decides: the lock may be taken in between)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return  # never locked here
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise WorkspaceBusy(self._busy_message()) from None
        finally:
            os.close(fd)  # (releases the probe's flock when it got one)

    def annotate(self, flow_run_id: str | None = None, command: str | None = None) -> None:
        """Name the flow run (and command) holding the lock in its record, once known: `milora run` takes the
        lock before Prefect starts, and the flow run it then starts fills in its id."""
        if self._fd is None:
            raise RuntimeError("workspace lock is not held")
        self.flow_run_id = flow_run_id or self.flow_run_id
        self.command = command or self.command
        record = read_record(self.root)
        started = record.started_at if record is not None and record.pid == os.getpid() else _now()
        self._write_record(started)

    def _write_record(self, started_at: str) -> None:
        record = LockRecord(pid=os.getpid(), host=socket.gethostname(), started_at=started_at,
                            flow_run_id=self.flow_run_id, command=self.command)
        atomic_write_text(self.record_path, json.dumps(asdict(record), indent=2) + "\n")

    def release(self) -> None:
        """Drop the record and the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD.pop(self.root, None)

    def _busy_message(self) -> str:
        record = read_record(self.root)
        where = f"{self.root}"
        if record is None:
            return (f"another run holds the workspace {where} (no holder record yet); wait for it to "
                    f"finish, or use another clone of the project")
        alive = record.pid_alive()
        note = ""
        if alive is False:
            note = " (that process is gone, but a stage it started still runs and holds the lock)"
        return (f"another run holds the workspace {where} {record.describe()}{note}; wait for it to "
                f"finish (or stop it), or use another clone of the project")

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
