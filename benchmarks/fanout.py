"""Fan-out wall time with 1 vs 2 process workers on this machine: the same grid, the same work, side by side.

    .venv/bin/python benchmarks/fanout.py          # 3 methods x 2 seeds, tiny budget; updates docs/benchmarks.md

Starts a Prefect server and an `mlflow server` on 127.0.0.1 (stopped at the end), then for N = 1 and 2: a fresh
copy of the project (test-sized params, its own DVC remote and SVD cache) with `ingest`, `base` and `prepare`
already run and pushed to the remote (untimed, so that every trial restores them from the DVC run cache in both
settings), deployed with `milora deploy --pool bench-N`, N `prefect worker` processes, and
`python -m flows.fanout` over adapter.method x train.seed with `--max-parallel N --threads <cores / N>`, timed
from submission to the table. Each setting has its own remote, caches and MLflow experiment, so neither
benefits from the other's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from docs_section import write_section  # noqa: E402

SECTION = "## Fan-out: 1 vs 2 workers"
GRID = ["--grid", "adapter.method=lora,pissa,milora", "--grid", "train.seed=0,1"]


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def one_setting(workers: int, base: Path, env: dict[str, str]) -> dict:
    """Deploy a fresh project copy to its own pool, start `workers` workers, time the fan-out of the grid."""
    from tests.project import env as project_env
    from tests.project import make_project, run
    from tests.servers import stop_group

    tag = f"bench-{workers}"
    root = base / tag / "proj"
    root.mkdir(parents=True)
    make_project(root, {"register.experiment": tag, "schedule.cron": "0 3 1 1 *"})
    run(["dvc", "remote", "add", "--default", "--force", "shared", str(base / tag / "remote")], root)
    run(["git", "commit", "-qam", "remote"], root)
    env = {**env, "MILORA_WORKSPACES": str(base / tag / "workspaces")}
    run(["dvc", "repro", "prepare"], root, extra_env=env, timeout=1800)  # untimed: the same head start for both
    run(["dvc", "push", "--run-cache"], root, extra_env=env)
    run(["milora", "deploy", "--pool", tag], root, extra_env=env)
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [subprocess.Popen(["prefect", "worker", "start", "--pool", tag, "--limit", "1", "--name", f"{tag}-{i}"],
                              cwd=base / tag, env=project_env(env), stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True) for i in range(workers)]
    try:
        out = base / tag / "fanout.json"
        load_before = _load()
        t0 = time.perf_counter()
        run([sys.executable, "-m", "flows.fanout", *GRID, "--max-parallel", str(workers), "--threads", str(threads),
             "--experiment", tag, "--model-name", tag, "--out", str(out)], base, extra_env=env, timeout=7200)
        seconds = time.perf_counter() - t0
        rows = json.loads(out.read_text())
    finally:
        for p in procs:
            stop_group(p)
    durations = [(_ts(r["end"]) - _ts(r["start"])) for r in rows if r.get("start") and r.get("end")]
    return {"workers": workers, "threads": threads, "trials": len(rows),
            "completed": sum(r["state"] == "Completed" for r in rows), "seconds": seconds,
            "trial_seconds": sorted(durations), "load": f"{load_before} -> {_load()}"}


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def render(results: list[dict], cores: int) -> str:
    from tests.project import TEST_OVERRIDES

    steps, examples = TEST_OVERRIDES["train.max_steps"], TEST_OVERRIDES["eval.max_examples"]
    one, two = results
    ratio = one["seconds"] / two["seconds"]
    rows = [f"| {r['workers']} | {r['threads']} | {r['completed']}/{r['trials']} | {r['seconds']:.0f} s | "
            f"{min(r['trial_seconds']):.0f}-{max(r['trial_seconds']):.0f} s | {r['load']} |" for r in results]
    return f"""{SECTION}

`python benchmarks/fanout.py`: the fan-out flow (`python -m flows.fanout`) over a grid of 3 methods x 2
seeds (6 trials: LoRA, PiSSA, MiLoRA x `train.seed` 0, 1) on the test-sized pipeline (tiny embedded base,
{steps} training steps, {examples} eval examples per task), each trial a run of the `on-demand` deployment in its own
workspace, with 1 and then 2 `prefect worker` processes of a process pool on this machine ({cores} CPU cores,
no GPU). Each setting starts from a fresh project copy with `base` and `prepare` already in its DVC remote
(every trial restores them from the run cache), its own SVD cache and MLflow experiment; `--threads` gives
each trial cores / workers CPU threads. Wall time is from submitting the grid to the table (trials'
registration in MLflow included).

| workers | threads per trial | trials completed | fan-out wall time | one trial (min-max) | load average before -> after (1/5/15 min) |
|---:|---:|---:|---:|---:|---|
{chr(10).join(rows)}

**1 worker / 2 workers: {ratio:.2f}x** (wall time of the same 6 trials). Side by side, each trial takes longer (the two
share the cores) but two run at once; much of a trial is fixed cost that does not shrink with threads
(a process start and imports per stage, DVC hashing, pulls and pushes, MLflow logging). With 1 worker the
second seed of each method restores the `svd` stage from the run cache the first seed left (the seed only
changes `train`), which 2 workers running both seeds at once cannot: this favours 1 worker a little. The
machine was shared with other jobs (load averages in the table).
"""


def main(argv: list[str] | None = None) -> int:
    """Run both settings and write the section."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--workdir", type=Path, default=None, help="keep the projects and logs here")
    args = p.parse_args(argv)
    from tests.prefect_fixtures import PrefectServer
    from tests.servers import ServerProcess, free_port

    base = args.workdir or Path(tempfile.mkdtemp(prefix="milora-fanout-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    (base / "prefect").mkdir(exist_ok=True)
    prefect = PrefectServer(base / "prefect").start()
    port = free_port()
    mlflow = ServerProcess(["bash", str(ROOT / "mlflow" / "serve.sh")], port, "/health", env={
        "MLFLOW_PORT": str(port), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{base / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(base / "mlartifacts"), "MLFLOW_WORKERS": "1"},
        log_path=base / "mlflow.log", timeout=240).start()
    env = {"PREFECT_API_URL": prefect.api_url, "PREFECT_HOME": str(base / "prefect-client"), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": mlflow.url}
    try:
        results = [one_setting(n, base, env) for n in (1, 2)]
    finally:
        mlflow.stop()
        prefect.stop()
    text = render(results, os.cpu_count() or 1)
    print(text)
    write_section(args.out, SECTION, text)
    print(f"wrote the '{SECTION[3:]}' section of {args.out} (work directory {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
