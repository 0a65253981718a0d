"""Scale-out (fast): multi-node launch settings, the work-pool deployments of prefect.yaml, the worker image, the
isolated workspaces and the fan-out grid. The real processes are in test_workers.py and test_stages.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from milora.pipeline.config import LAUNCH_KEYS, ConfigError, TrainConfig, load_config
from milora.stages.distributed import torchrun_args

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- multi-node training


def test_multi_node_settings_are_validated():
    cfg = load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 1,
                                             "train.rdzv_endpoint": "node0.cluster:29400"})
    assert (cfg.train.nnodes, cfg.train.node_rank, cfg.train.rdzv_backend) == (2, 1, "c10d")
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.nnodes = 2 needs train\.rdzv_endpoint"):
        load_config(REPO / "params.yaml", {"train.nnodes": 2})
    with pytest.raises(ConfigError, match=r"train\.node_rank = 2 must be below train\.nnodes = 2"):
        load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 2, "train.rdzv_endpoint": "h:1"})
    with pytest.raises(ConfigError, match=r"train\.rdzv_endpoint = 'node0' is not host:port"):
        load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.rdzv_endpoint": "node0"})
    with pytest.raises(ConfigError, match=r"train\.rdzv_backend = 'etcd' is not allowed"):
        load_config(REPO / "params.yaml", {"train.rdzv_backend": "etcd"})


def test_torchrun_arguments_for_one_node_and_for_several():
    one = load_config(REPO / "params.yaml", {"train.processes": 4})
    assert torchrun_args(one, "train") == ["--standalone", "--nproc_per_node", "4"]
    two = load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 1,
                                             "train.rdzv_endpoint": "10.0.0.1:29400"})
    assert torchrun_args(two, "svd") == ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                         "--rdzv_endpoint", "10.0.0.1:29400", "--rdzv_id", "milora-svd"]
    static = load_config(REPO / "params.yaml", {"train.nnodes": 2, "train.node_rank": 1, "train.rdzv_backend":
                                                "static", "train.rdzv_endpoint": "10.0.0.1:29400"})
    assert torchrun_args(static, "train")[-2:] == ["--node_rank", "1"]


def test_the_train_stage_tracks_every_train_param_but_where_it_is_launched():
    """DVC re-runs `train` when a training param changes, not when a node's rank or the rendezvous address does."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    tracked = {p.removeprefix("train.") for p in stages["train"]["params"]}
    assert tracked == set(TrainConfig.model_fields) - set(LAUNCH_KEYS)
    assert set(LAUNCH_KEYS) <= set(TrainConfig.model_fields)


# --------------------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_declares_the_pool_deployments_and_their_workspace_steps():
    import inspect

    from flows import workspace
    from flows.pipeline import FLOW_NAME, milora_pipeline

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly-retrain", "on-demand"}
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file() and func == milora_pipeline.fn.__name__ and FLOW_NAME == "milora-pipeline"
        assert d["work_pool"]["name"] == "milora"
    # nightly-retrain's schedule is params.yaml's, read at deploy time by the build step; on-demand has none
    assert deployments["nightly-retrain"]["schedules"] == [{"cron": "{{ source.cron }}",
                                                           "timezone": "{{ source.timezone }}"}]
    assert "schedules" not in deployments["on-demand"]
    # the build and pull steps are this project's functions, called with parameters they take
    (build,), (pull,) = spec["build"], spec["pull"]
    assert build["flows.workspace.source"]["id"] == "source"
    assert pull == {"flows.workspace.checkout": {"repository": "{{ source.repository }}",
                                                 "commit": "{{ source.commit }}"}}
    for step, fn in ((build["flows.workspace.source"], workspace.source),
                     (pull["flows.workspace.checkout"], workspace.checkout)):
        assert set(step) - {"id"} <= set(inspect.signature(fn).parameters)


# --------------------------------------------------------------------------------------- workspaces


def _git(cwd: Path, *args: str) -> str:
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    import os

    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **env}).stdout.strip()


@pytest.fixture
def source_repo(tmp_path: Path) -> Path:
    """A committed project: params.yaml with a relative svd.cache, a DVC config with a relative local remote."""
    repo = tmp_path / "src"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for name in (".dvc/config", ".dvc/.gitignore", ".gitignore"):
        (repo / name).write_text((REPO / name).read_text())
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "project")
    return repo


def test_the_build_step_names_repository_commit_and_the_params_schedule(source_repo, monkeypatch):
    from flows.workspace import ENV_REPOSITORY, source

    monkeypatch.delenv(ENV_REPOSITORY, raising=False)
    got = source(str(source_repo))
    assert got == {"repository": str(source_repo), "commit": _git(source_repo, "rev-parse", "HEAD"),
                   "cron": "0 3 * * *", "timezone": "UTC"}
    # MILORA_CRON / MILORA_TIMEZONE / MILORA_PARAMS reach it as arguments; empty ones mean "from params.yaml"
    assert source(str(source_repo), params="", cron="30 1 * * 1", timezone="Europe/Paris")["cron"] == "30 1 * * 1"
    _git(source_repo, "remote", "add", "origin", "https://git.example/team/milora.git")
    assert source(str(source_repo))["repository"] == "https://git.example/team/milora.git"
    monkeypatch.setenv(ENV_REPOSITORY, "git@git.example:team/milora.git")
    assert source(str(source_repo))["repository"] == "git@git.example:team/milora.git"
    from milora.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="deployment schedule"):
        source(str(source_repo), cron="61 * * * *")


def test_checkout_makes_a_wired_workspace_per_flow_run_and_finds_it_again(source_repo, tmp_path, monkeypatch):
    import os

    from configobj import ConfigObj

    from flows.workspace import MARKER, checkout, is_workspace, keep_after_failure, remove_after_success

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    commit = _git(source_repo, "rev-parse", "HEAD")
    (source_repo / "later.txt").write_text("a later commit the workspace must not have\n")
    _git(source_repo, "add", "-A")
    _git(source_repo, "commit", "-qm", "later")

    out = checkout(str(source_repo), commit, workspaces=str(tmp_path / "ws"))
    ws = tmp_path / "ws" / "run-1"
    assert out == {"directory": str(ws)} and Path.cwd() == ws and is_workspace(ws)
    assert _git(ws, "rev-parse", "HEAD") == commit and not (ws / "later.txt").exists()
    assert os.environ["PYTHONPATH"] == f"{ws}{os.pathsep}/elsewhere"  # the stages run the checkout's code
    local = ConfigObj(str(ws / ".dvc" / "config.local"))
    assert local['remote "local"']["url"] == str((source_repo / ".dvcstore").resolve())  # the shared remote
    assert local["cache"]["dir"] == str(tmp_path / "ws" / ".dvc-cache")
    assert (ws / ".svd_cache").resolve() == tmp_path / "ws" / ".svd_cache"  # one SVD cache for the machine
    assert _git(ws, "status", "--porcelain") == ""  # wiring leaves the checkout clean

    (ws / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    assert checkout(str(source_repo), commit, workspaces=str(tmp_path / "ws")) == out  # a retry: same workspace
    assert (ws / "checkpoints").is_dir() and (ws / MARKER).is_file()

    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    run = FlowRun(id=uuid.uuid4(), name="brave-fox", flow_id=uuid.uuid4(), parameters={"root": str(ws)})
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: False}):  # the hooks log to the flow run's log
        keep_after_failure(None, run, None)
        assert ws.is_dir()
        remove_after_success(None, run, None)
    assert not ws.exists() and (tmp_path / "ws" / ".svd_cache").is_dir()


def test_checkout_refuses_without_a_flow_run_or_a_shared_mlflow(source_repo, tmp_path, monkeypatch):
    from flows.workspace import checkout
    from milora.core.errors import MissingInput

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    with pytest.raises(MissingInput, match="PREFECT__FLOW_RUN_ID is not set"):
        checkout(str(source_repo), "HEAD", workspaces=str(tmp_path / "ws"))
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bare = tmp_path / "bare.git"
    _git(tmp_path, "clone", "-q", "--bare", str(source_repo), str(bare))
    with pytest.raises(MissingInput, match="needs a shared MLflow: set MLFLOW_TRACKING_URI"):
        checkout(f"file://{bare}", _git(source_repo, "rev-parse", "HEAD"), workspaces=str(tmp_path / "ws"))


# --------------------------------------------------------------------------------------- fan-out


def test_fanout_grid_labels_threads_and_table():
    from flows.fanout import _axis, grid, render_table, thread_env

    trials = grid({"adapter.method": ["lora", "pissa", "milora"], "train.seed": [0, 1]}, {"train.max_steps": 4})
    assert len(trials) == 6 and trials[0] == {"train.max_steps": 4, "adapter.method": "lora", "train.seed": 0}
    assert trials[-1] == {"train.max_steps": 4, "adapter.method": "milora", "train.seed": 1}
    assert _axis("adapter.rank=4,8") == ("adapter.rank", [4, 8])
    assert _axis("train.learning_rate=0.0003,0.001") == ("train.learning_rate", [0.0003, 0.001])
    with pytest.raises(ValueError, match="has no values"):
        grid({"adapter.rank": []})
    assert thread_env(2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    assert thread_env(None) == {}
    table = render_table([
        {"trial": 0, "overrides": {"adapter.method": "lora"}, "state": "Completed", "run_id": "r0",
         "metrics": {"average_accuracy": 0.25, "train.cpu_threads": 1.0}},
        {"trial": 1, "overrides": {"adapter.method": "milora"}, "state": "Failed"}])
    lines = table.splitlines()
    assert lines[0] == "| trial | overrides | state | average_accuracy | train.cpu_threads | MLflow run |"
    assert lines[2] == "| 0 | adapter.method=lora | Completed | 0.25 | 1 | r0 |"
    assert lines[3] == "| 1 | adapter.method=milora | Failed |  |  |  |"


# --------------------------------------------------------------------------------------- worker image


def test_the_worker_image_builds_cpu_torch_by_default_then_the_pinned_project():
    import re

    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), base  # a pinned release, not `latest`
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    lock = dict(line.split("==", 1) for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    assert args["TORCH_VERSION"] == lock["torch"] and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert "nvidia/cuda:" in text  # the CUDA build is documented as a build arg
    steps = [line for line in text.splitlines() if line.startswith(("RUN", "COPY", "CMD", "USER"))]
    torch_at = next(i for i, s in enumerate(steps) if "torch==${TORCH_VERSION}" in s)
    copy_at = steps.index("COPY . .")
    install_at = next(i for i, s in enumerate(steps) if "pip install -c requirements.lock ." in s)
    assert torch_at < copy_at < install_at  # torch first, then the project with the lock's pins
    assert "git" in text.split("apt-get install", 1)[1].split("\n")[0]  # the workspaces clone the project
    assert steps[-1] == 'CMD ["prefect", "worker", "start", "--pool", "milora"]'
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "models", "mlflow/mlflow.db", ".dvc/config.local"} <= set(ignored)


def test_the_kubernetes_job_template_declares_every_variable_it_uses():
    import json
    import re

    template = json.loads((REPO / "deploy" / "kubernetes-job-template.json").read_text())
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["volumeMounts"] == [{"name": "workspaces", "mountPath": "/workspaces"}]
