"""The DVC pipeline in a temporary copy of the project: repro, selective re-runs, experiments, remotes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.project import make_project, run, stages_ran, stages_skipped, write_params

pytestmark = pytest.mark.slow
ALL = ["ingest", "base", "prepare", "svd", "train", "evaluate"]
# The README's view for comparing experiments: what changed, without timings, cache counters and data hashes.
EXP_SHOW_ARGS = ["--only-changed", "--drop", "Created|models/|data/|.*seconds|cache_|tokens_per_second|peak_memory_mb|resumed_from_step"]
OUTPUTS = ["data/raw", "data/prepared", "models/base", "models/svd_init", "models/adapter"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("dvc") / "proj")
    out = run(["dvc", "repro"], root, extra_env={"PYTHONHASHSEED": "1"})
    return root, out.stdout + out.stderr


def _outs(root: Path) -> dict[str, dict[str, str]]:
    """The hash dvc.lock records for every output of every stage, but `checkpoints/` (the trainer's run state:
    its trainer_state.json holds wall times; `persist: true`, never a dependency)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {stage: {o["path"]: o["md5"] for o in entry.get("outs", []) if o["path"] != "checkpoints"}
            for stage, entry in lock.items()}


def _set(root: Path, overrides: dict) -> None:
    write_params(root, overrides)


def test_full_repro_from_nothing(project):
    root, out = project
    assert stages_ran(out) == ALL
    for p in OUTPUTS:
        assert (root / p).exists(), p
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    raw = next(o for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert raw["md5"].endswith(".dir")  # the data version every later stage and MLflow refer to
    eval_metrics = json.loads((root / "metrics/eval.json").read_text())
    assert {"average_accuracy", "perplexity", "forgetting"} <= set(eval_metrics)
    # The stages' logs carry no library deprecation noise (PEFT's own calls, transformers' renamed arguments).
    assert "FutureWarning" not in out and "Could not find a config file" not in out, out


def test_stages_are_byte_reproducible_and_registration_is_idempotent_across_workspaces(project,
                                                                                      tmp_path_factory):
    """Every stage, run again in fresh processes with another PYTHONHASHSEED and in another workspace (another
    absolute path, git commit and SVD cache directory), writes byte-identical outputs (dvc.lock records the
    same hash for each of them, metrics, reports and plots included; timings/ are not outputs). Rerunning a
    stage leaves `dvc status` clean (the issue's `milora run; milora stage svd; dvc status`). The same adapter
    registered from the second workspace is the first one's version."""
    root, _ = project
    other = make_project(tmp_path_factory.mktemp("dvc-elsewhere") / "another-workspace")
    run(["dvc", "repro"], other, extra_env={"PYTHONHASHSEED": "2"})
    mine, theirs = _outs(root), _outs(other)
    assert set(mine) == set(ALL)
    # `train.precision: auto`: bf16 autocast on a CPU with AVX512-BF16/AMX (this machine), so the reruns below
    # are byte-identical under the precision this CPU trains at
    from milora.model.precision import resolve_precision

    lineage = json.loads((root / "models/adapter/lineage.json").read_text())
    assert lineage["precision"] == resolve_precision("auto", "cpu")
    for stage in ALL:
        assert theirs[stage] == mine[stage], stage
    for path in ("models/base.json", "models/adapter/lineage.json", "models/adapter/adapter_config.json"):
        text = (other / path).read_text()
        assert str(other) not in text and str(root) not in text, path

    run(["milora", "stage", "svd"], other, extra_env={"PYTHONHASHSEED": "3"})  # cache hits now, new timings
    assert json.loads((other / "timings" / "svd.json").read_text())["cache_hits"] > 0
    status = run(["dvc", "status"], other).stdout
    assert "Data and pipelines are up to date" in status, status

    shared = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path_factory.mktemp('shared-mlflow') / 'mlflow.db'}"}
    first = json.loads(run(["milora", "register"], root, extra_env=shared).stdout.strip().splitlines()[-1])
    second = json.loads(run(["milora", "register"], other, extra_env=shared).stdout.strip().splitlines()[-1])
    assert (first["version"], first["created"], first["reused"]) == ("1", True, False)
    assert (second["version"], second["created"], second["reused"]) == ("1", False, True)
    assert second["run_id"] == first["run_id"]


def test_second_repro_does_nothing(project):
    root, _ = project
    out = run(["dvc", "repro"], root)
    assert stages_ran(out.stdout) == []
    assert set(stages_skipped(out.stdout)) == set(ALL)


def _touch(path: Path) -> bytes:
    before = path.read_bytes()
    path.write_bytes(before + b"\n# an edit\n")
    return before


@pytest.mark.parametrize(("edited", "changed"), [
    ("milora/core/svd.py", {"svd", "train", "evaluate"}),  # the SVD engine: everything that runs it
    ("milora/stages/evaluate.py", {"evaluate"}),  # the evaluation code: evaluate only
    ("milora/model/scoring.py", {"ingest", "prepare", "evaluate"}),  # reading qa rows normalises their answers
    ("milora/data/formats.py", {"ingest", "prepare", "evaluate"}),  # evaluate reads the benchmark suites
])
def test_code_edits_invalidate_exactly_the_stages_that_run_the_code(project, edited, changed):
    root, _ = project
    path = root / edited
    if not path.exists():  # a module that became a package
        path = root / edited.removesuffix(".py") / "__init__.py"
    before = _touch(path)
    try:
        status = json.loads(run(["dvc", "status", "--json"], root).stdout or "{}")
        assert set(status) == changed, status
    finally:
        path.write_bytes(before)
    assert json.loads(run(["dvc", "status", "--json"], root).stdout or "{}") == {}


def test_train_params_rerun_train_and_evaluate_only(project):
    """Also: the learning rate written the way everybody writes it (YAML 1.2 `3e-4`, read by DVC and the
    stages alike)."""
    root, _ = project
    _set(root, {})
    params = root / "params.yaml"
    text, n = re.subn(r"(?m)^(\s+)learning_rate: .*$", r"\1learning_rate: 3e-4", params.read_text())
    assert n == 1
    params.write_text(text)
    out = run(["dvc", "repro"], root)
    assert stages_ran(out.stdout) == ["train", "evaluate"]
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"][
        "train.learning_rate"] == 0.0003
    assert json.loads((root / "models" / "adapter" / "lineage.json").read_text())["params"]["train"][
        "learning_rate"] == 0.0003


def test_adapter_params_rerun_from_svd(project):
    root, _ = project
    _set(root, {"train.learning_rate": 0.001, "adapter.method": "pissa"})
    out = run(["dvc", "repro"], root)
    assert stages_ran(out.stdout) == ["svd", "train", "evaluate"]
    _set(root, {"train.learning_rate": 0.001, "adapter.method": "pissa", "adapter.rank": 2})
    out = run(["dvc", "repro"], root)
    assert stages_ran(out.stdout) == ["svd", "train", "evaluate"]
    _set(root, {})
    run(["dvc", "repro"], root)


def test_metrics_and_plots(project, tmp_path):
    root, _ = project
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = next(iter(shown.values()))["data"]
    for name in ["data", "base", "svd", "train", "eval"]:
        assert f"metrics/{name}.json" in files, files.keys()
    diff = run(["dvc", "metrics", "diff", "--all"], root)
    assert diff.returncode == 0
    html = run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], root)
    assert html.returncode == 0
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "train_loss.csv" in page and "spectrum" in page


def test_exp_run_with_overrides(project):
    root, _ = project
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline"], root)
    run(["dvc", "exp", "run", "-S", "adapter.method=pissa", "-S", "adapter.rank=2", "-S", "train.learning_rate=3e-4",
         "-n", "pissa-r2"], root)
    shown = run(["dvc", "exp", "show", "--json"], root).stdout
    assert "pissa-r2" in shown
    exps = json.loads(shown)
    found = json.dumps(exps)
    # What a person compares fits a 120-column terminal (the README's command): the key metrics and the
    # changed params of both runs, with no column folded into `…`.
    table = run(["dvc", "exp", "show", "--no-pager", *EXP_SHOW_ARGS], root, extra_env={"COLUMNS": "120"}).stdout
    assert max(len(line) for line in table.splitlines()) <= 120, table
    assert "…" not in table, table
    for column in ("pissa-r2", "train_loss", "forgetting", "perplexity", "adapter.method", "adapter.rank"):
        assert column in table, table
    assert '"pissa"' in found and "average_accuracy" in found and '"learning_rate": 0.0003' in found


def _wipe_outputs(root: Path) -> None:
    for p in OUTPUTS + [".dvc-cache"]:
        shutil.rmtree(root / p, ignore_errors=True)


def test_push_wipe_pull_local_remote(project, tmp_path):
    root, _ = project
    run(["dvc", "remote", "add", "-f", "--local", "-d", "testlocal", str(tmp_path / "remote")], root)
    run(["dvc", "push"], root)
    _wipe_outputs(root)
    assert "deleted" in run(["dvc", "status"], root).stdout
    run(["dvc", "pull"], root)
    status = run(["dvc", "status"], root).stdout
    assert "up to date" in status.lower(), status


def test_push_wipe_pull_s3_remote(project, s3_bucket, moto_server):
    root, _ = project
    run(["dvc", "remote", "add", "-f", "--local", "-d", "s3test", f"s3://{s3_bucket}/dvcstore"], root)
    run(["dvc", "remote", "modify", "--local", "s3test", "endpointurl", moto_server], root)
    run(["dvc", "push"], root)
    import boto3

    keys = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="dvcstore/")
    assert keys.get("KeyCount", 0) > 0
    _wipe_outputs(root)
    run(["dvc", "pull"], root)
    status = run(["dvc", "status"], root).stdout
    assert "up to date" in status.lower(), status
