"""svd, train and evaluate stages on the tiny embedded base: learning, resume, DDP, forgetting, compare."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from milora.cli.compare import compare, link_shared
from milora.pipeline.paths import Paths
from milora.stages import run_stage
from tests.faults import fault_env
from tests.project import env, write_params
from tests.servers import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A project root with ingest, base and prepare done (test-sized)."""
    root = tmp_path_factory.mktemp("stages") / "shared"
    root.mkdir()
    write_params(root)
    for stage in ("ingest", "base", "prepare"):
        run_stage(stage, root / "params.yaml", root)
    return root


def _run_root(shared: Path, dest: Path, overrides: dict | None = None) -> Path:
    dest.mkdir(parents=True)
    write_params(dest, {"svd.cache": str(shared / ".svd_cache"), **(overrides or {})})
    link_shared(Paths(shared), Paths(dest))
    return dest


def _milora(root: Path, *args: str, extra_env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(BIN / "milora"), *args, "--root", str(root), "--params", str(root / "params.yaml")],
                       env=env(extra_env), capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"milora {args} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def test_svd_train_evaluate(shared, tmp_path):
    root = _run_root(shared, tmp_path / "run", {"train.max_steps": 30, "train.learning_rate": 0.003})
    for stage in ("svd", "train", "evaluate"):
        run_stage(stage, root / "params.yaml", root)
    paths = Paths(root)
    svd = json.loads(paths.report("svd").read_text())
    timings = json.loads(paths.timings("svd").read_text())
    assert svd["matrices"] > 0 and timings["cache_misses"] + timings["cache_hits"] == svd["matrices"]
    assert paths.plot("spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert "singular_value" in paths.plot("spectrum.csv").read_text().splitlines()[0]

    train = json.loads(paths.report("train").read_text())
    assert train["eval_loss_end"] < train["eval_loss_start"], train  # training really learns
    assert train["steps"] == 30 and train["trainable_params"] > 0
    assert json.loads(paths.timings("train").read_text())["tokens_per_second"] > 0
    lines = paths.plot("train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,learning_rate" and len(lines) > 5
    lineage = json.loads((paths.adapter_dir / "lineage.json").read_text())
    assert lineage["method"] == "milora" and lineage["rank"] == 4 and lineage["data_hash"]
    assert lineage["base"]["content_hash"] and lineage["svd_cache_keys"]

    ev = json.loads(paths.report("eval").read_text())
    for key in ["math_accuracy", "choice_accuracy", "choice_accuracy_loglik", "average_accuracy",
                "perplexity", "forgetting", "heldout_loss_base", "heldout_loss_tuned"]:
        assert key in ev, key
    preds = [json.loads(x) for x in paths.predictions.read_text().splitlines()]
    assert {p["task"] for p in preds} == {"math", "choice"}
    assert all("prediction" in p and "answer" in p for p in preds if p["task"] == "math")


def test_forgetting_is_zero_for_an_unchanged_model(shared, tmp_path):
    root = _run_root(shared, tmp_path / "run")
    run_stage("svd", root / "params.yaml", root)
    paths = Paths(root)
    shutil.copytree(paths.svd_init_dir, paths.adapter_dir)  # "trained" adapter == its initial state
    run_stage("evaluate", root / "params.yaml", root)
    ev = json.loads(paths.report("eval").read_text())
    assert abs(ev["forgetting"]) < 1e-5, ev


def _adapter_weights(root: Path) -> dict:
    return load_file(str(Paths(root).adapter_dir / "adapter_model.safetensors"))


def test_kill_and_resume_equals_uninterrupted(shared, tmp_path):
    over = {"train.max_steps": 12, "train.save_steps": 4}
    a = _run_root(shared, tmp_path / "straight", over)
    b = _run_root(shared, tmp_path / "killed", over)
    for r in (a, b):
        _milora(r, "stage", "svd")
    _milora(a, "stage", "train")
    killed = _milora(b, "stage", "train", extra_env=fault_env(kill_at_step=8), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no clean shutdown
    assert (Paths(b).checkpoints_dir / "checkpoint-8").exists()
    assert not Paths(b).adapter_dir.exists()
    _milora(b, "stage", "train")
    tb = json.loads(Paths(b).report("train").read_text())
    assert json.loads(Paths(b).timings("train").read_text())["resumed_from_step"] == 8 and tb["steps"] == 12
    wa, wb = _adapter_weights(a), _adapter_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 1e-5, f"resumed adapter differs from uninterrupted by {worst}"  # fp32 CPU tolerance


@pytest.mark.parametrize("launch", ["torchrun", "train.processes"])
def test_ddp_two_processes_agree(shared, tmp_path, launch):
    """2 gloo processes on the CPU: by hand under torchrun, or launched by the stage (`train.processes: 2`)."""
    root = _run_root(shared, tmp_path / "ddp", {"train.max_steps": 6})
    _milora(root, "stage", "svd")
    if launch == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), str(BIN / "milora"), "stage", "train", "--root", str(root), "--params",
               str(root / "params.yaml")]
    else:
        cmd = [str(BIN / "milora"), "stage", "train", "--root", str(root), "--params", str(root / "params.yaml"),
               "-S", "train.processes=2"]
    p = subprocess.run(cmd, env=env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    train = json.loads(Paths(root).report("train").read_text())
    assert train["world_size"] == 2 and train["ranks_agree"] is True
    assert train["eval_loss_end"] < train["eval_loss_start"], train
    init = load_file(str(Paths(root).svd_init_dir / "adapter_model.safetensors"))
    trained = _adapter_weights(root)
    assert max((trained[k] - init[k]).abs().max().item() for k in trained) > 1e-4  # the ranks really trained


def test_compare_has_all_three_methods(shared, tmp_path):
    out = tmp_path / "results"
    result = compare(str(shared / "params.yaml"), shared, ["lora", "pissa", "milora"], [0], tmp_path / "work", out,
                     {"train.max_steps": 4})
    assert set(result["summary"]) == {"lora", "pissa", "milora"}
    table = out.with_suffix(".md").read_text().splitlines()
    assert len(table) == 5 and all(any(f"| {m} |" in row for row in table) for m in ("lora", "pissa", "milora"))
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["lora"]["trainable_params"] == runs["milora"]["trainable_params"] == runs["pissa"]["trainable_params"]
