"""svd, train and evaluate stages on the tiny embedded base: learning, resume, DDP, forgetting, compare."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


def _rank_tensors(directory: Path, world: int) -> list[dict]:
    return [load_file(str(directory / f"rank{r}.safetensors")) for r in range(world)]


def _assert_ranks_equal(ranks: list[dict]) -> None:
    """Every rank holds the same trainable tensors, compared one by one, exactly."""
    assert len(ranks) > 1 and ranks[0]
    for other in ranks[1:]:
        assert other.keys() == ranks[0].keys()
        differ = [k for k in ranks[0] if not torch.equal(ranks[0][k], other[k])]
        assert differ == [], f"ranks differ in {differ}"


@pytest.mark.parametrize("launch,quantization", [("torchrun", "none"), ("train.processes", "nf4")])
def test_ddp_two_processes_agree(shared, tmp_path, launch, quantization):
    """2 gloo processes on the CPU: by hand under torchrun (full-precision frozen weights), or launched by the stage
    (`train.processes: 2`) with nf4-quantized ones (what that launch does is the same for both: one case each).
    Each rank's trainable tensors are dumped (test hook) and compared tensor by tensor."""
    root = _run_root(shared, tmp_path / "ddp", {"train.max_steps": 6, "adapter.quantization": quantization})
    _milora(root, "stage", "svd")
    if launch == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), str(BIN / "milora"), "stage", "train", "--root", str(root), "--params",
               str(root / "params.yaml")]
    else:
        cmd = [str(BIN / "milora"), "stage", "train", "--root", str(root), "--params", str(root / "params.yaml"),
               "-S", "train.processes=2"]
    dump = tmp_path / "ranks"
    p = subprocess.run(cmd, env=env({"OMP_NUM_THREADS": "1", **fault_env(), "MILORA_TEST_DUMP_RANKS": str(dump)}),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    train = json.loads(Paths(root).report("train").read_text())
    assert train["world_size"] == 2 and train["ranks_agree"] is True
    assert train["eval_loss_end"] < train["eval_loss_start"], train
    ranks = _rank_tensors(dump, 2)
    _assert_ranks_equal(ranks)
    assert train["ranks_compared_tensors"] == len(ranks[0])
    init = load_file(str(Paths(root).svd_init_dir / "adapter_model.safetensors"))
    trained = _adapter_weights(root)
    assert len(trained) == len(ranks[0])  # the saved adapter is those tensors
    assert max((trained[k] - init[k]).abs().max().item() for k in trained) > 1e-4  # the ranks really trained


NODE = ("import sys\nfrom milora.stages import run_stage\n"
        "for stage in sys.argv[2:]:\n    run_stage(stage, sys.argv[1] + '/params.yaml', sys.argv[1])\n")


def _nodes(roots: list[Path], *stages: str, dump: Path) -> None:
    """Run `stages` (each launching itself under torchrun) on every node at once, as a cluster's job would."""
    extra = {"OMP_NUM_THREADS": "1", **fault_env(), "MILORA_TEST_DUMP_RANKS": str(dump)}
    procs = [subprocess.Popen([sys.executable, "-c", NODE, str(root), *stages], env=env(extra),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for root in roots]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-6000:]


def test_two_nodes_train_like_one_process_on_the_same_global_batch(shared, tmp_path):
    """Two torchrun agents on 127.0.0.1 (`train.nnodes: 2`, c10d rendezvous, gloo), each node in its own
    workspace: the svd stage splits the matrices across the nodes through the shared cache, and training ends
    with the adapter one process trains on the same global batch (2 nodes x batch 4 == batch 4 x 2 accumulation
    steps), compared tensor by tensor."""
    budget = {"train.max_steps": 4, "train.save_steps": 2, "train.batch_size": 4, "adapter.dropout": 0.0}
    single = _run_root(shared, tmp_path / "single", {**budget, "train.gradient_accumulation_steps": 2})
    for stage in ("svd", "train"):
        run_stage(stage, single / "params.yaml", single)

    cache, port = tmp_path / "node-cache", free_port()
    nodes = [_run_root(shared, tmp_path / f"node{k}", {
        **budget, "svd.cache": str(cache), "train.nnodes": 2, "train.node_rank": k,
        "train.rdzv_endpoint": f"127.0.0.1:{port}"}) for k in (0, 1)]
    dump = tmp_path / "ranks"
    _nodes(nodes, "svd", "train", dump=dump)
    matrices = json.loads(Paths(nodes[0]).report("svd").read_text())["matrices"]
    svd = [json.loads(Paths(n).timings("svd").read_text()) for n in nodes]  # cache hits are run facts
    # each matrix decomposed once, by one of the nodes (c10d ranks the nodes in the order they join)
    assert sorted(s["cache_misses"] for s in svd) == [matrices // 2, (matrices + 1) // 2]
    assert all(s["cache_hits"] + s["cache_misses"] == matrices for s in svd)
    init = [load_file(str(Paths(r).svd_init_dir / "adapter_model.safetensors")) for r in (single, *nodes)]
    _assert_ranks_equal(init)  # the same initial adapter everywhere

    reports = [json.loads(Paths(n).report("train").read_text()) for n in nodes]
    assert all(r["world_size"] == 2 and r["ranks_agree"] for r in reports)
    _assert_ranks_equal(_rank_tensors(dump, 2))
    assert all(sorted(Paths(n).checkpoints_dir.glob("checkpoint-*")) for n in nodes)  # each node can resume
    want = _adapter_weights(single)
    for node in nodes:
        got = _adapter_weights(node)
        assert got.keys() == want.keys()
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        assert worst <= 1e-5, f"two-node adapter differs from one process by {worst}"


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
