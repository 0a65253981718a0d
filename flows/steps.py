"""A step of the flow as a subprocess (`dvc repro`, `milora register`, the data push), streamed, and what happened,
read from structured sources only: each step's result file (`milora.pipeline.results`), DVC's own record of the
pipeline (`milora.pipeline.dvcstate`: stage graph, `dvc.lock`, status) and exit codes. Nothing here parses log text.

(Not named `dvc.py`: Prefect loads a flow by its file path with this folder on `sys.path`, where a `dvc.py`
would shadow DVC itself for the flow's in-process DVC API calls.)

Nothing here computes pipeline results: every stage is `milora stage <name>` run by DVC.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from milora.core.errors import EXIT_CODES, ErrorKind, error_kind, kind_of_exit
from milora.pipeline import dvcstate
from milora.pipeline.results import StepResult, one_line

Outcome = Literal["ran", "skipped", "restored"]


class StageFailed(RuntimeError):
    """A stage (or the register step) failed; `kind` (see `milora.core.errors`) says whether retrying helps."""

    def __init__(self, stage: str, returncode: int, kind: ErrorKind, detail: str, attempt: int = 1,
                 seconds: float = 0.0, max_attempts: int | None = None):
        self.stage, self.returncode, self.kind, self.detail = stage, returncode, kind, detail
        self.attempt, self.seconds, self.max_attempts = attempt, seconds, max_attempts
        tries = f"attempt {attempt} of {max_attempts}" if max_attempts else f"attempt {attempt}"
        what = {"transient": f"transient failure, retried with backoff; {tries}",
                "user": "configuration or data error, not retried",
                "internal": "internal error (a bug), not retried"}[kind]
        # The step's own message comes last: it is the last thing `milora run`, the flow run's state message
        # and the run summary say.
        super().__init__(f"stage '{stage}' failed ({what}; exit {returncode}): {detail}")

    def __reduce__(self):  # keep pickling (Prefect may serialise the exception) faithful
        return (StageFailed, (self.stage, self.returncode, self.kind, self.detail, self.attempt, self.seconds,
                              self.max_attempts))


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


def pipeline_status(root: str | os.PathLike[str]) -> dict[str, Any]:
    """What `dvc status` finds out of date (`milora.pipeline.dvcstate.status`): {} when every stage is up to date.
    A failure is the `status` step's `StageFailed`, of its error's kind."""
    try:
        return dvcstate.status(root)
    except Exception as exc:
        kind = error_kind(exc)
        raise StageFailed("status", EXIT_CODES[kind], kind, one_line(exc)) from exc


# ---------------------------------------------------------------------------------------------------
# what happened


# DVC's hints after each stage (about git, autostage, push): noise in a task log (display only).
_DVC_HINTS = ("To track the changes with git, run:", "git add ", "To enable auto staging, run:",
              "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")


def shown(line: str) -> bool:
    """Whether an output line belongs in the task log: not blank, not one of DVC's hints (display only)."""
    text = line.strip()
    return bool(text) and not text.startswith(_DVC_HINTS)


def last_line(output: str) -> str:
    """The last non-empty line of a command's output: shown when a command failed without a structured
    result (DVC itself failed before or around the stage); never used to decide anything."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def step_failure(step: str, returncode: int, result: StepResult | None, output: str, attempt: int = 1,
                 seconds: float = 0.0, max_attempts: int | None = None) -> StageFailed:
    """The failure of one step, from its structured result when it wrote one.

    * a result `failed`: the step's own error kind, exit code and message;
    * a result still `running`: the step's process died without finishing (a signal, an OOM kill): transient;
    * no result: DVC (or the launcher) failed around the step: the kind of its exit code."""
    if result is not None and result.status == "failed":
        return StageFailed(step, result.exit_code or returncode, result.error_kind or "internal",
                           result.message or "failed", attempt, seconds, max_attempts)
    if result is not None and result.status == "running":
        return StageFailed(step, returncode, "transient",
                           f"the {step} process (pid {result.pid}) died before finishing (killed?)", attempt, seconds,
                           max_attempts)
    return StageFailed(step, returncode, kind_of_exit(returncode), last_line(output), attempt, seconds, max_attempts)


def repro_outcome(result: StepResult | None, lock_before: dict[str, Any] | None,
                  lock_after: dict[str, Any] | None) -> Outcome:
    """What a successful `dvc repro --single-item STAGE` did with STAGE: `ran` when the stage wrote a result
    under this run's token, else `restored` (DVC checked its outputs out of the run cache: its `dvc.lock`
    record changed) or `skipped` (nothing changed)."""
    if result is not None:
        return "ran"
    return "skipped" if lock_before == lock_after else "restored"
