"""Scale-out with real processes on 127.0.0.1: a Prefect server, a `process` work pool, the project's prefect.yaml
deployed with `prefect deploy --all --no-prompt`, two `prefect worker` processes, one `mlflow server` (artifacts
on a moto S3 server), a DVC remote in a local directory and one SVD cache shared by every run.

The tests share that cluster, in order: two deployment runs in parallel (one killed during training, then failing,
then retried), the fan-out of a small grid, and `milora deploy --pool`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.faults import SITE
from tests.prefect_fixtures import PREFECT_ENV, flow_run, flow_run_id, log_contains, task_runs
from tests.project import env as project_env
from tests.project import make_project, run
from tests.servers import stop_group

pytestmark = pytest.mark.slow

POOL = "milora"
ON_DEMAND = "milora-pipeline/on-demand"
NIGHTLY = "milora-pipeline/nightly-retrain"
CRON = "0 3 1 1 *"  # the test project's schedule.cron: what nightly-retrain must carry (and never fires in a test)


@dataclass
class Cluster:
    """The project, where its runs' workspaces go, the environment of the clients and workers, the workers."""

    root: Path
    remote: Path
    workspaces: Path
    env: dict[str, str]
    mlflow_url: str
    workers: list[subprocess.Popen] = field(default_factory=list)

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["prefect", *args], self.root, check=check, extra_env=self.env)


@pytest.fixture(scope="module")
def cluster(prefect_server, mlflow_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    (base / "proj").mkdir()
    root = make_project(base / "proj", {"schedule.cron": CRON})
    remote = base / "dvc-remote"
    run(["dvc", "remote", "add", "--default", "--force", "shared", str(remote)], root)
    run(["git", "commit", "-qam", "the team's DVC remote"], root)
    env = {**PREFECT_ENV, "PREFECT_API_URL": prefect_server.api_url, "PREFECT_HOME": str(base / "prefect-client"),
           "MLFLOW_TRACKING_URI": mlflow_server.url, "MILORA_WORKSPACES": str(base / "workspaces"),
           "OMP_NUM_THREADS": "1",  # two workers share the 2 cores
           # the test-only fault hooks (inert unless a run's job variables arm them)
           "PYTHONPATH": os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)}
    c = Cluster(root, remote, base / "workspaces", env, mlflow_server.url)
    c.prefect("work-pool", "create", POOL, "--type", "process")
    c.prefect("deploy", "--all", "--no-prompt")
    try:
        for i in (1, 2):
            log = (base / f"worker-{i}.log").open("wb")
            c.workers.append(subprocess.Popen(
                ["prefect", "worker", "start", "--pool", POOL, "--limit", "1", "--name", f"worker-{i}"],
                cwd=base, env=project_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        yield c
    finally:
        stop_group(*c.workers, grace=10)  # a worker still polling has nothing to finish


def _deployment_run(c: Cluster, name: str, overrides: dict, job_env: dict | None = None) -> str:
    args = ["deployment", "run", name, "--params", json.dumps({"overrides": overrides})]
    if job_env:
        args += ["--job-variable", "env=" + json.dumps(job_env)]
    return flow_run_id(c.prefect(*args).stdout)


def _wait(what: str, ok, timeout: float = 900, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := ok()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def _window(fid: str, end: str) -> tuple:
    """When a flow run first entered RUNNING and then, after that, the state type `end`: one attempt's span."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = sorted(client.read_flow_run_states(fid), key=lambda s: s.timestamp)
    start = next(s.timestamp for s in states if s.type.value == "RUNNING")
    return start, next(s.timestamp for s in states if s.type.value == end and s.timestamp > start)


def _final(fid: str) -> bool:
    return flow_run(fid).state.is_final()


def _task_done(fid: str, name: str) -> bool:
    return any(t.name == name and t.state.is_completed() for t in task_runs(fid))


def _report(fid: str) -> str:
    """The latest run-report artifact of a flow run (a retried run has one per attempt)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[fid]), key=ArtifactFilterKey(any_=["milora-run-report"])))
    return max(arts, key=lambda a: a.created).data


def _mlflow_run(c: Cluster, fid: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=c.mlflow_url)
    (found,) = client.search_runs([client.get_experiment_by_name("milora").experiment_id],
                                  filter_string=f"tags.`milora.prefect_flow_run_id` = '{fid}'")
    return client, found


def test_two_workers_run_two_deployment_runs_in_parallel_each_in_its_own_workspace(cluster, prefect_api, tmp_path):
    c = cluster
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        nightly, on_demand = client.read_deployment_by_name(NIGHTLY), client.read_deployment_by_name(ON_DEMAND)
    assert nightly.work_pool_name == on_demand.work_pool_name == POOL
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [(CRON, "UTC")]  # params.yaml's
    assert on_demand.schedules == []
    head = run(["git", "rev-parse", "HEAD"], c.root).stdout.strip()
    assert nightly.pull_steps == [{"flows.workspace.checkout": {"repository": str(c.root), "commit": head}}]

    # Run A is killed once during training (retried in place: resumes from its checkpoint), then its evaluate
    # fails (a bug: not retried), so the flow run fails and keeps its workspace.
    faults = {"MILORA_TEST_KILL_AT_STEP": "4", "MILORA_TEST_FAULT": "evaluate",
              "MILORA_TEST_FAULT_ONCE": str(c.root.parent / "faults-fired")}
    a = _deployment_run(c, ON_DEMAND, {"train.max_steps": 8, "train.save_steps": 2}, faults)
    _wait("run A's svd stage", lambda: _task_done(a, "svd"), every=2)
    # Run B, other params (same SVD triplets: adapter.dropout does not change them), starts on the other worker.
    b = _deployment_run(c, ON_DEMAND, {"adapter.dropout": 0.0, "train.learning_rate": 0.004})
    _wait("run A to fail", lambda: _final(a), every=0.5)
    assert flow_run(a).state.is_failed() and "fault injected into stage 'evaluate'" in flow_run(a).state.message
    kept = c.workspaces / a
    assert (kept / "models" / "adapter").is_dir() and sorted(kept.glob("checkpoints/checkpoint-*"))
    assert log_contains(a, "resuming from checkpoints/checkpoint-4")  # the killed train resumed in place
    (train_a,) = [t for t in task_runs(a) if t.name == "train"]
    assert train_a.run_count == 2

    # Retrying the failed flow run brings it back to its workspace: train is not run again, evaluate completes.
    c.prefect("flow-run", "retry", a)
    _wait("runs A (retried) and B", lambda: _final(a) and _final(b), every=0.5)
    # They ran in parallel (each worker takes one run at a time): run A's first attempt and run B overlap in the
    # state history the server keeps.
    a_start, a_end = _window(a, "FAILED")
    b_start, b_end = _window(b, "COMPLETED")
    assert b_start < a_end and a_start < b_end, (a_start, a_end, b_start, b_end)
    for fid in (a, b):
        assert flow_run(fid).state.is_completed(), flow_run(fid).state.message
        _wait("the workspace removed after success", lambda fid=fid: not (c.workspaces / fid).exists(), 120)
    report_a = _report(a)
    assert f"Workspace: `{c.workspaces / a}`" in report_a and "| train | skipped (unchanged) |" in report_a
    assert "| evaluate | ran |" in report_a
    assert f"Workspace: `{c.workspaces / b}`" in _report(b)

    # Both registered in the one MLflow server; the DVC remote holds both runs' data; B hit the SVD cache.
    runs = {fid: _mlflow_run(c, fid) for fid in (a, b)}
    for fid, (client, r) in runs.items():
        versions = client.search_model_versions(f"run_id = '{r.info.run_id}'")
        assert versions and versions[0].tags["milora.prefect_flow_run_id"] == fid
        (tmp_path / fid).mkdir()
        lock = yaml.safe_load(Path(client.download_artifacts(r.info.run_id, "lineage/dvc.lock",
                                                             str(tmp_path / fid))).read_text())
        for stage, out in (("ingest", "data/raw"), ("prepare", "data/prepared"), ("svd", "models/svd_init"),
                           ("train", "models/adapter"), ("evaluate", "eval/predictions.jsonl")):
            (md5,) = [o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out]
            assert (c.remote / "files" / "md5" / md5[:2] / md5[2:]).exists(), (fid, stage, out)
    metrics_a, metrics_b = runs[a][1].data.metrics, runs[b][1].data.metrics
    assert metrics_a["svd.cache_misses"] == metrics_a["svd.matrices"] > 0
    assert metrics_b["svd.cache_hits"] == metrics_b["svd.matrices"] and metrics_b["svd.cache_misses"] == 0
    assert runs[a][1].data.params["train.max_steps"] == "8" and runs[b][1].data.params["adapter.dropout"] == "0.0"


def test_fanout_of_a_grid_on_two_workers(cluster, prefect_api, tmp_path):
    c = cluster
    out = tmp_path / "fanout.json"
    p = subprocess.run([sys.executable, "-m", "flows.fanout", "--grid", "adapter.method=lora,milora", "--grid",
                        "train.seed=1", "-S", "train.max_steps=4", "-S", "eval.max_examples=4", "-S",
                        "register.log_lora_export=false", "--max-parallel",
                        "2", "--threads", "1", "--model-name", "milora-sweep", "--out", str(out)],
                       cwd=tmp_path, env=project_env(c.env), capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    rows = json.loads(out.read_text())
    assert [(r["overrides"]["adapter.method"], r["overrides"]["train.seed"]) for r in rows] == [("lora", 1), ("milora", 1)]
    assert all(r["state"] == "Completed" and r["run_id"] for r in rows)
    assert all(r["metrics"]["train.cpu_threads"] == 1 for r in rows)  # each trial set its threads
    assert "| trial | overrides | state | average_accuracy |" in p.stdout
    spans = sorted((r["start"], r["end"]) for r in rows)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans  # trials overlapped

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=c.mlflow_url)
    (parent,) = client.search_runs([client.get_experiment_by_name("milora").experiment_id],
                                   filter_string="tags.`milora.fanout` = 'parent'")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(r["run_id"] for r in rows)
    assert parent.data.metrics["trials_completed"] == 2
    table = Path(client.download_artifacts(parent.info.run_id, "fanout.md", str(tmp_path))).read_text()
    assert table.count("| Completed |") == 2


def test_milora_deploy_to_another_pool(cluster, prefect_api):
    c = cluster
    out = run(["milora", "deploy", "--pool", "gpu-box", "-S", "train.max_steps=3"], c.root, extra_env=c.env)
    assert "created work pool 'gpu-box'" in out.stdout
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_work_pool("gpu-box").type == "process"
        for name in (NIGHTLY, ON_DEMAND):
            d = client.read_deployment_by_name(name)
            assert d.work_pool_name == "gpu-box" and d.parameters == {"overrides": {"train.max_steps": 3}}
    bad = run(["milora", "deploy", "--pool", "gpu-box", "--no-schedule"], c.root, extra_env=c.env, check=False)
    assert bad.returncode == 2 and "--name and --no-schedule apply to the local mode only" in bad.stderr
