"""DVC as the flow sees it: the stage order from `dvc.yaml`, `dvc repro` as a streamed subprocess,
what ran and what was skipped, and whether a failure is worth retrying.

Nothing here computes pipeline results: every stage is `milora stage <name>` run by DVC.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Outcome = Literal["ran", "skipped", "restored"]
FailureKind = Literal["transient", "user", "error"]

# DVC's own words for what it did with a stage.
_RAN = re.compile(r"^Running stage '([^']+)'", re.M)
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping", re.M)
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run, checking out outputs", re.M)
_EXITED = re.compile(r"failed to run: .*, exited with (-?\d+)")
_STAGE_DONE = re.compile(r"stage (\S+): done in ([0-9.]+)s")

# Output that marks a failure as transient: the network, a store that is briefly unavailable, a lock
# another DVC process holds for a moment. Matched case-insensitively against the stage's output.
TRANSIENT_PATTERNS: tuple[str, ...] = (
    r"EndpointConnectionError", r"Could not connect to the endpoint URL", r"ConnectionRefusedError",
    r"Connection refused", r"Connection reset by peer", r"ConnectTimeout", r"ConnectTimeoutError",
    r"ReadTimeout", r"ReadTimeoutError", r"RemoteDisconnected", r"Max retries exceeded",
    r"Temporary failure in name resolution", r"\b503 Service Unavailable\b", r"\bServiceUnavailable\b",
    r"\bSlowDown\b", r"\bRequestTimeout\b", r"\bThrottling(Exception)?\b", r"API request to .* failed",
    r"Unable to acquire lock", r"Broken pipe", r"\bunreachable\b", r"\bcannot reach\b",
)
_TRANSIENT = re.compile("|".join(TRANSIENT_PATTERNS), re.I)

# Exit code of the `milora` CLI for errors the user can fix (bad params, bad data, missing files).
USER_ERROR_EXIT = 2


class StageFailed(RuntimeError):
    """A stage (or the register step) failed; `kind` says whether retrying can help."""

    def __init__(self, stage: str, returncode: int, kind: FailureKind, detail: str, attempt: int = 1,
                 seconds: float = 0.0):
        self.stage, self.returncode, self.kind, self.detail = stage, returncode, kind, detail
        self.attempt, self.seconds = attempt, seconds
        what = {"transient": "transient failure, retried with backoff",
                "user": "configuration or data error, not retried",
                "error": "error, not retried"}[kind]
        super().__init__(f"stage '{stage}' failed ({what}; exit {returncode}): {detail}")

    def __reduce__(self):  # keep pickling (Prefect may serialise the exception) faithful
        return (StageFailed, (self.stage, self.returncode, self.kind, self.detail, self.attempt, self.seconds))


def venv_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DVC subprocesses: this interpreter's bin dir first on PATH (DVC runs `milora ...`
    through a shell), offline model hubs, no analytics, unbuffered Python output."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("TQDM_MININTERVAL", "5")  # a progress line every 5 s rather than 10 per second
    env.update(extra or {})
    return env


def dvc_command(*args: str) -> list[str]:
    """`python -m dvc ARGS` with this interpreter (works whether or not the venv is on PATH)."""
    return [sys.executable, "-m", "dvc", *args]


# ---------------------------------------------------------------------------------------------------
# the DAG


def _under(path: str, root: str) -> bool:
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")


def _paths(items: Iterable[Any]) -> list[str]:
    out = []
    for item in items or []:
        out.extend(item.keys() if isinstance(item, dict) else [item])
    return [str(p) for p in out]


def stage_order(root: str | os.PathLike[str]) -> list[str]:
    """The stages of `dvc.yaml` in dependency order (file order among independent stages)."""
    path = Path(root) / "dvc.yaml"
    try:
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no dvc.yaml (run from the project root, or pass --root)") from None
    outs = {name: _paths(s.get("outs", [])) + _paths(s.get("metrics", [])) + _paths(s.get("plots", []))
            for name, s in stages.items()}
    needs: dict[str, set[str]] = {}
    for name, s in stages.items():
        deps = _paths(s.get("deps", []))
        needs[name] = {other for other, o in outs.items() if other != name
                       and any(_under(d, out) or _under(out, d) for d in deps for out in o)}
    order: list[str] = []
    pending = list(stages)
    while pending:
        ready = [n for n in pending if needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"{path}: the stages {pending} depend on each other in a cycle")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


def lock_digest(root: str | os.PathLike[str]) -> str | None:
    """sha256 of `dvc.lock` (every stage's deps, params and outs): the pipeline's current version."""
    path = Path(root) / "dvc.lock"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def out_hash(root: str | os.PathLike[str], stage: str, out: str) -> str | None:
    """The md5 DVC recorded in `dvc.lock` for one output of one stage (e.g. the data version)."""
    path = Path(root) / "dvc.lock"
    if not path.exists():
        return None
    lock = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for o in ((lock.get("stages") or {}).get(stage) or {}).get("outs", []):
        if str(o.get("path", "")).rstrip("/") == out.rstrip("/"):
            return o.get("md5")
    return None


# ---------------------------------------------------------------------------------------------------
# running DVC


@dataclass
class DvcResult:
    """One finished DVC command: exit code, combined output, wall time."""

    args: list[str]
    returncode: int
    output: str
    seconds: float
    lines: list[str] = field(default_factory=list)


def _split_lines(buf: str) -> tuple[list[str], str]:
    """Complete lines of `buf` (for a line redrawn with '\\r', its last state) and the unfinished rest."""
    *complete, rest = buf.split("\n")
    return [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
            for line in complete], rest


def run_streamed(cmd: Sequence[str], cwd: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                 on_line: Callable[[str], None] | None = None, on_tick: Callable[[], None] | None = None,
                 tick_seconds: float = 2.0, pass_fds: Sequence[int] = ()) -> DvcResult:
    """Run `cmd`, calling `on_line` for each output line as it arrives (stdout and stderr merged) and
    `on_tick` every `tick_seconds` while it runs; return the exit code, output and wall time.
    Interrupting the caller terminates the subprocess's whole process group."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=str(cwd), env=dict(env) if env else None, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds),
                            start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    buf = ""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    next_tick = time.monotonic() + tick_seconds
    try:
        while True:
            events = sel.select(timeout=min(tick_seconds, 0.5))
            eof = False
            for _ in events:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    eof = True
                    break
                done, buf = _split_lines(buf + chunk.decode("utf-8", errors="replace"))
                for line in done:
                    lines.append(line)
                    if on_line is not None:
                        on_line(line)
            if on_tick is not None and time.monotonic() >= next_tick:
                on_tick()
                next_tick = time.monotonic() + tick_seconds
            if eof:
                break
        if buf:
            last = buf.rsplit("\r", 1)[-1]
            lines.append(last)
            if on_line is not None:
                on_line(last)
        returncode = proc.wait()
    except BaseException:
        _terminate(proc)
        raise
    finally:
        sel.close()
        proc.stdout.close()
    return DvcResult(list(cmd), returncode, "\n".join(lines), time.perf_counter() - t0, lines)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the subprocess's process group, SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait()


def default_remote(root: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> str | None:
    """The name of the DVC default remote (`core.remote`), or None when there is none."""
    out = subprocess.run(dvc_command("remote", "default"), cwd=str(root), env=dict(env or venv_env()),
                         capture_output=True, text=True)
    name = out.stdout.strip()
    return name if out.returncode == 0 and name and " " not in name else None


def dvc_status(root: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`dvc status --json` for the whole pipeline: {} when every stage is up to date."""
    out = subprocess.run(dvc_command("status", "--json"), cwd=str(root), env=dict(env or venv_env()),
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StageFailed("status", out.returncode, classify_failure(out.returncode, out.stderr + out.stdout),
                          tail[0])
    text = out.stdout.strip()
    return json.loads(text) if text else {}


# ---------------------------------------------------------------------------------------------------
# reading what happened


def repro_outcome(stage: str, output: str) -> Outcome:
    """What `dvc repro --single-item STAGE` did with STAGE, from DVC's output."""
    if any(m == stage for m in _RAN.findall(output)):
        return "ran"
    if any(m == stage for m in _RESTORED.findall(output)):
        return "restored"
    if any(m == stage for m in _SKIPPED.findall(output)):
        return "skipped"
    # DVC says nothing about a stage only when it had nothing to do with it.
    return "skipped"


def stage_seconds(output: str) -> float | None:
    """The stage's own compute time, as `milora stage` logs it (`stage X: done in 12.3s`)."""
    found = _STAGE_DONE.findall(output)
    return float(found[-1][1]) if found else None


def stage_exit_code(returncode: int, output: str) -> int:
    """The exit code of the stage command itself (DVC reports it), else DVC's own."""
    found = _EXITED.findall(output)
    return int(found[-1]) if found else returncode


def classify_failure(returncode: int, output: str) -> FailureKind:
    """`transient` (worth a retry: killed by a signal, a connection error in the output), `user` (the
    `milora` CLI's exit 2: bad config or data; never retried) or `error` (anything else; not retried)."""
    code = stage_exit_code(returncode, output)
    if code < 0 or returncode < 0 or code in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
        return "transient"
    if _TRANSIENT.search(output):
        return "transient"
    if code == USER_ERROR_EXIT:
        return "user"
    return "error"


def failure_detail(output: str) -> str:
    """The line of the output that says what went wrong (the CLI's one-line error, an exception, DVC's)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in (r"^milora [\w-]+: error: ", r"^[\w.]*(Error|Exception)\b.*:", r"^ERROR: "):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1]
    return lines[-1] if lines else "no output"
