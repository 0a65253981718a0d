"""Where the test suite's CPU goes: pytest run as `make test` runs it, with every Python process logging at exit
its command line, CPU seconds, peak RSS and the test it ran under; then the sums by kind of process and by test.

    .venv/bin/python benchmarks/suite_profile.py                        # the whole suite (~13 min on 2 cores)
    .venv/bin/python benchmarks/suite_profile.py -- tests/test_dvc.py   # pytest arguments after --

The logger is a `sitecustomize` module put first on PYTHONPATH for the run only; nothing in the project or the
venv changes. Processes ended by a signal (servers at teardown, a killed stage) do not log, so the sums are a
lower bound of the CPU the run used (`/usr/bin/time -v` around it gives the total). It prints markdown; `--out`
writes it to a file too. Issue 25's figures in the README (Development) came from this.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_VAR = "MILORA_SUITE_PROFILE_LOG"

SITECUSTOMIZE = f'''
import atexit, json, os, resource, sys, time
_log = os.environ.get({LOG_VAR!r})
if _log:
    _t0 = time.time()

    def _done():
        try:
            me = resource.getrusage(resource.RUSAGE_SELF)
            with open(_log, "a") as f:
                f.write(json.dumps({{"argv": sys.argv[:8], "wall": round(time.time() - _t0, 2),
                                    "cpu": round(me.ru_utime + me.ru_stime, 2), "rss_kb": me.ru_maxrss,
                                    "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                                    "pytest": "pytest" in sys.modules}}) + "\\n")
        except Exception:
            pass

    atexit.register(_done)
'''


def kind(argv: list[str], is_pytest: bool = False) -> str:
    """A short name for what a process was: `milora stage train`, `dvc repro`, `prefect worker`..."""
    if is_pytest:  # the controller and the xdist workers (their argv is just `-c`): the tests run in-process here
        return "pytest (controller, xdist workers)"
    words = [os.path.basename(a) if a.startswith("/") else a for a in argv]
    joined = " ".join(words)
    if "stage" in words and words.index("stage") + 1 < len(words):
        return "milora stage " + words[words.index("stage") + 1]
    for name in ("register", "eval", "run", "deploy", "compare", "cache"):
        if name in words[:3] and ("milora" in joined or "__main__.py" in joined):
            return f"milora {name}"
    if "huey" in joined:
        return "mlflow job runner (huey)"
    for tool in ("dvc", "prefect", "mlflow", "lm_eval", "moto_server", "torchrun"):
        if any(w.startswith(tool) for w in words[:2]) or f"{tool}/__main__.py" in " ".join(argv[:2]):
            rest = [w for w in words[1:3] if not w.startswith("-")]
            return " ".join([tool, *rest[:1]])
    if words and words[0] == "-c":
        return "python -c"
    return " ".join(words[:2])


def table(title: str, rows: dict[str, list[float]], total: float, limit: int) -> str:
    lines = [f"### {title}", "", "| | processes | CPU s | share |", "|---|---:|---:|---:|"]
    for name, (n, cpu) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:limit]:
        lines.append(f"| {name} | {int(n)} | {cpu:.1f} | {100 * cpu / total:.0f} % |")
    return "\n".join(lines)


def summarize(records: list[dict], seconds: float, limit: int = 25) -> str:
    total = sum(r["cpu"] for r in records)
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    by_test: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for r in records:
        what = kind(r["argv"], r.get("pytest", False))
        by_kind[what][0] += 1
        by_kind[what][1] += r["cpu"]
        if r["test"] and not r.get("pytest"):
            test = r["test"].rsplit(" (", 1)[0]
            by_test[test][0] += 1
            by_test[test][1] += r["cpu"]
    return "\n\n".join([
        f"## Test suite CPU by process (`benchmarks/suite_profile.py`, {os.cpu_count()} cores)",
        f"{len(records)} processes logged {total:.0f} CPU seconds in {seconds / 60:.1f} min of wall time (a lower "
        "bound: processes ended by a signal do not log). A process started by a test's fixture counts for that "
        "test, a server's for the test that started it.",
        table("By kind of process", by_kind, total, limit),
        table("By test (its subprocesses; the pytest process itself not included)", by_test, total, limit),
    ]) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist processes (make test: 2)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    p.add_argument("--log", default=None, help="keep the per-process log (JSON lines) here")
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument("pytest_args", nargs="*", help="after --: what pytest runs (default: the whole suite)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="suite-profile-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        log = Path(a.log) if a.log else Path(tmp) / "processes.jsonl"
        log.unlink(missing_ok=True)
        env = {**os.environ, LOG_VAR: str(log),
               "PYTHONPATH": os.pathsep.join(x for x in (tmp, os.environ.get("PYTHONPATH")) if x)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        if a.workers > 1:
            cmd += ["-n", str(a.workers), "--dist", "loadfile", "--no-loadscope-reorder"]
        start = time.monotonic()
        rc = subprocess.run(cmd + (a.pytest_args or []), cwd=ROOT, env=env).returncode
        seconds = time.monotonic() - start
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    text = summarize(records, seconds, a.top)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
