"""Distributed SVD init: 2 CPU processes (gloo) split the matrices through a shared cache.

Each rank decomposes the matrices with index % world_size == rank, stores them, waits at a barrier
and reads the rest from the cache: both ranks end with identical adapters, every matrix is
decomposed exactly once, and the adapter equals a single-process init.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import milora
from milora.core.adapter import current_factors
from tests.models import tiny_llama
from tests.servers import free_port

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _config(solver: str) -> milora.AdapterConfig:
    return milora.AdapterConfig(rank=4, dropout=0.0, target_modules=TARGETS, svd_solver=solver)


def _worker(rank: int, world: int, port: int, cache: str | None, solver: str, out: str) -> None:
    """One rank: init the adapter under torch.distributed, dump factors, report and log."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    log_path = Path(out) / f"rank{rank}.log"
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(name)s: %(message)s", force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = milora.init_adapter(tiny_llama(), _config(solver), cache=cache, progress=False)
        factors = current_factors(model)
        tensors = {f"{n}.A": a.contiguous() for n, (a, _) in factors.items()}
        tensors.update({f"{n}.B": b.contiguous() for n, (_, b) in factors.items()})
        save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
        report = model.milora_state.report
        rows = [{"name": m.name, "hit": m.hit, "key": m.key} for m in report.matrices]
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(
            {"rank": report.rank, "world_size": report.world_size, "misses": report.misses, "matrices": rows}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, cache: str | None, solver: str = "full", world: int = 2) -> list[dict]:
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cache, solver, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        log = (tmp_path / f"rank{r}.log").read_text() if (tmp_path / f"rank{r}.log").exists() else ""
        assert p.exitcode == 0, f"rank {r} exited with {p.exitcode}:\n{log}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _factors(tmp_path: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / f"rank{rank}.safetensors"))


@pytest.mark.timeout(600)
def test_two_ranks_split_the_work_and_end_identical(tmp_path):
    solver = "full"
    cache = tmp_path / "shared-cache"
    reports = _run(tmp_path, str(cache), solver)
    names = [m["name"] for m in reports[0]["matrices"]]
    assert len(names) == 2 * len(TARGETS) and [m["name"] for m in reports[1]["matrices"]] == names
    for rep in reports:
        assert rep["world_size"] == 2
        computed = [m["name"] for m in rep["matrices"] if not m["hit"]]
        assert computed == names[rep["rank"]::2], "each rank decomposes its own share, nothing else"
    assert sum(rep["misses"] for rep in reports) == len(names)  # every matrix decomposed exactly once
    assert [m["key"] for m in reports[0]["matrices"]] == [m["key"] for m in reports[1]["matrices"]]

    a, b = _factors(tmp_path, 0), _factors(tmp_path, 1)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks differ on {k}"
    # ... and the same adapter as one process without any cache
    single = current_factors(milora.init_adapter(tiny_llama(), _config(solver), progress=False))
    for name, (A, B) in single.items():
        assert torch.allclose(a[f"{name}.A"], A, atol=1e-5) and torch.allclose(a[f"{name}.B"], B, atol=1e-5)
    assert "waiting for the other ranks" in (tmp_path / "rank0.log").read_text()

    # a second distributed run finds everything in the cache
    (tmp_path / "again").mkdir()
    assert all(rep["misses"] == 0 for rep in _run(tmp_path / "again", str(cache), solver))


@pytest.mark.timeout(600)
def test_without_a_cache_every_rank_computes_everything(tmp_path):
    reports = _run(tmp_path, None)
    for rep in reports:
        assert rep["misses"] == 2 * len(TARGETS)
    log = (tmp_path / "rank0.log").read_text()
    assert "without a cache" in log and "each of the 2 ranks decomposes all 10 matrices" in log
    a, b = _factors(tmp_path, 0), _factors(tmp_path, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_not_distributed_reports_a_single_process(tmp_path):
    assert not torch.distributed.is_initialized()
    model = milora.init_adapter(tiny_llama(), _config("full"), cache=str(tmp_path), progress=False)
    rep = model.milora_state.report
    assert (rep.rank, rep.world_size, rep.misses) == (0, 1, 2 * len(TARGETS))
    assert "rank" not in rep.summary()
    assert os.environ.get("WORLD_SIZE") in (None, "1")
