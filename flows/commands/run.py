"""`milora run`: the whole pipeline as one Prefect flow run, with no server to start by hand.

With `PREFECT_API_URL` set (a running `prefect server start`, or Prefect Cloud), the run is recorded
there. Otherwise Prefect runs in its ephemeral mode: a temporary local server for the duration of the
command, with its database in `<root>/.prefect/` (git-ignored), so the history of every `milora run`
stays browsable with `PREFECT_HOME=.prefect prefect server start`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from milora.core.errors import EXIT_CODES, UserError, error_kind

HELP = "run the whole pipeline as a Prefect flow (no server needed) and summarise it"
EPHEMERAL_HOME = ".prefect"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora run`."""
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key for this run, e.g. -S adapter.rank=16 (repeatable)")
    p.add_argument("--params", default=None,
                   help="params file to start from instead of params.yaml (its values are used for the run)")
    p.add_argument("--root", default=".", help="project root holding params.yaml and dvc.yaml (default: .)")
    p.add_argument("--model-name", default=None,
                   help="MLflow registered model name (default: register.model_name of the params)")


def prefect_environment(root: Path) -> str | None:
    """Point Prefect at `PREFECT_API_URL` if set, else at an ephemeral server with its home under `root`.

    Must run before Prefect is imported. Returns the ephemeral home, or None when a server is used."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        return None
    home = os.environ.setdefault("PREFECT_HOME", str(root / EPHEMERAL_HOME))
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    # The temporary server migrates its database on first start; a busy 2-core machine needs > 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    return home


SERVER_MARK = b"prefect.server.api.server:create_app"  # in the command line of Prefect's temporary server


def _proc_read(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def stop_orphaned_servers(home: str) -> list[int]:
    """Stop temporary Prefect servers of this project left by a `milora run` that was SIGKILLed.

    Prefect stops its temporary server at exit, which a SIGKILL skips: the server outlives the run,
    reparented to init or a subreaper. Such a server runs with this project's `PREFECT_HOME` and its
    parent is no longer a Python process; a server of a live run (a Python parent) is left alone.
    Linux only (reads /proc); returns the pids stopped.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    want = f"PREFECT_HOME={home}".encode()
    stopped = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if SERVER_MARK not in _proc_read(pid, "cmdline") or want not in _proc_read(pid, "environ").split(b"\0"):
            continue
        stat = _proc_read(pid, "stat").decode(errors="replace")
        ppid = int(stat.rsplit(")", 1)[-1].split()[1]) if ")" in stat else 0
        parent = _proc_read(ppid, "cmdline").split(b"\0")[0] if ppid > 1 else b""
        if b"python" in Path(parent.decode(errors="replace")).name.encode():
            continue  # a live run's server
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            continue
        stopped.append(pid)
        logging.getLogger(__name__).warning(
            "stopped Prefect's temporary server (pid %d) left running by an earlier, killed `milora run`", pid)
    return stopped


class Terminated(BaseException):
    """SIGTERM arrived: unwind like KeyboardInterrupt (not an Exception, so nothing swallows it)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora run`."""
    from flows.params import parse_overrides, validate_run_config
    from milora.pipeline.config import split_sets
    from milora.pipeline.lock import WorkspaceLock

    root = Path(args.root).expanduser().resolve()
    if not (root / "dvc.yaml").exists():
        raise UserError(f"{root}: no dvc.yaml here; run from the project root or pass --root")
    lock = WorkspaceLock(root, command="milora run")
    lock.check_free()  # a busy workspace fails at once, before the config is even read
    overrides = split_sets(args.set)  # as typed: the flow parses them (one parser for -S and `overrides`)
    checked = parse_overrides(overrides)
    if args.model_name:
        checked["register.model_name"] = args.model_name
    validate_run_config(root, args.params, checked)  # fail in seconds, before Prefect's server starts
    # The workspace lock before any server starts (the flow run it starts finds the lock held by this process
    # and names itself in the lock's record).
    lock.acquire()
    try:
        return _run(args, root, overrides)
    finally:
        lock.release()


def _run(args: argparse.Namespace, root: Path, overrides: dict[str, str]) -> int:
    home = prefect_environment(root)
    if home is not None:
        stop_orphaned_servers(home)
    for noisy in ("httpx", "httpcore"):  # one line per API call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from flows.pipeline import milora_pipeline
    from flows.report import load_report, render_summary
    from flows.steps import StageFailed
    from milora.pipeline.paths import Paths

    # `kill` (SIGTERM) ends a run as cleanly as Ctrl-C: the running stage's process group is stopped, the
    # workspace lock released, params.yaml restored, and the flow run marked as crashed.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        state = milora_pipeline(overrides=overrides, model_name=args.model_name, root=str(root),
                                params=args.params, return_state=True)
    except Terminated:
        print("milora run: terminated; run it again (or `prefect flow-run retry`) to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    fid = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    report = load_report(root)
    if report is not None and report.flow_run_id == fid:
        hint = None
        if home is not None:
            hint = (f"Prefect runs are stored in {home}; browse them with "
                    f"`PREFECT_HOME={home} prefect server start` and http://127.0.0.1:4200/runs"
                    + (f"/flow-run/{fid}" if fid else ""))
            report.flow_run_url = None  # the temporary server's address is gone
        adapter = Paths(root).adapter_dir
        print(render_summary(report, adapter_dir=str(adapter) if adapter.exists() else None, runs_hint=hint))
    if state.is_completed():
        return 0
    exc = state.result(raise_on_failure=False)
    message = str(exc) if isinstance(exc, BaseException) else (state.message or state.name)
    if fid and not isinstance(exc, UserError):
        prefix = f"PREFECT_HOME={home} " if home is not None else ""
        print(f"to resume: `milora run` again with the same options, or `{prefix}prefect flow-run retry {fid} "
              f"--entrypoint flows/pipeline.py:milora_pipeline` (completed stages are skipped)")
    print(f"milora run: error: {message}", file=sys.stderr)
    if isinstance(exc, StageFailed):
        return EXIT_CODES[exc.kind]
    return EXIT_CODES[error_kind(exc)] if isinstance(exc, BaseException) else EXIT_CODES["internal"]
