"""LoRA factors from triplets, and a whole model's init: every target matrix through the cache, the work
split across ranks under `torch.distributed`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from milora.core.svd.solvers import resolve_solver, solve, solve_device
from milora.core.svd.types import InitReport, MatrixReport, Side, TripletCache, Triplets

log = logging.getLogger(__name__)


def factors(t: Triplets, scale: float) -> tuple[Tensor, Tensor]:
    """LoRA factors (A, B) in fp32 from triplets, so that `scale * B @ A = U diag(S) Vh`."""
    root = torch.sqrt(t.S.to(torch.float64) / scale)
    B = (t.U.to(torch.float64) * root).to(torch.float32)
    A = (root[:, None] * t.Vh.to(torch.float64)).to(torch.float32)
    return A.contiguous(), B.contiguous()


def captured_energy(W: Tensor, Vh: Tensor) -> float:
    """`||W V||_F^2` in fp64: the energy of `W` on the row space of `Vh` (benchmarks and tests)."""
    return float((W.to(torch.float64) @ Vh.to(torch.float64).T).pow(2).sum())


def compute_factors(
    weights: Mapping[str, Tensor],
    rank: int,
    side: Side,
    scale: float,
    solver: str = "auto",
    cache: TripletCache | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Triplets], InitReport]:
    """Factors (A, B) for every named 2-D weight (`out x in`), via the cache when one is given.

    The weights are solved one at a time, each converted (to fp32/fp64, and moved to `device`) only while
    it is solved: memory holds the model as it is plus one matrix in flight. `device`: where to solve
    (`None`/"auto": `solve_device`'s choice, the GPU for large matrices when there is one); the triplets
    and factors come back on the CPU.

    Under `torch.distributed` with a cache shared by the ranks (a shared directory or S3), rank `i`
    decomposes the matrices with index `% world_size == i`, stores them, waits at a barrier, then reads
    the others' share from the cache: N ranks take ~1/N of the time and end with identical factors.
    """
    for W in weights.values():  # fail on a bad solver/side pairing before any work
        resolve_solver(solver, side, tuple(W.shape), rank)
    me, world = _dist_info()
    report = InitReport(rank=me, world_size=world)
    items = list(weights.items())
    if world > 1 and cache is None:
        log.info(
            "SVD init under torch.distributed without a cache: each of the %d ranks decomposes all %d "
            "matrices (set svd.cache to a shared directory or s3:// URI to split the work)", world, len(items),
        )
    split = world > 1 and cache is not None
    mine = [i for i in range(len(items)) if not split or i % world == me]
    rest = [i for i in range(len(items)) if split and i % world != me]

    done: dict[int, tuple[Triplets, MatrixReport]] = {}
    t_all = time.perf_counter()
    bar = tqdm(total=len(items), desc=f"SVD init ({side})", unit="matrix", disable=not progress, leave=False)

    def one(i: int, expect_hit: bool) -> None:
        done[i] = _decompose(*items[i], rank, side, solver, cache, expect_hit, device)
        bar.update(1)

    for i in mine:
        one(i, expect_hit=False)
    if rest:
        log.info("rank %d/%d: decomposed its %d matrices; waiting for the other ranks", me, world, len(mine))
        dist.barrier()
        for i in rest:
            one(i, expect_hit=True)
    bar.close()

    out: dict[str, tuple[Tensor, Tensor]] = {}
    trips: dict[str, Triplets] = {}
    for i, (name, _) in enumerate(items):
        t, mrep = done[i]
        out[name] = factors(t, scale)
        trips[name] = t
        report.matrices.append(mrep)
    report.seconds = time.perf_counter() - t_all
    log.info(report.summary())
    return out, trips, report


def _dist_info() -> tuple[int, int]:
    """(rank, world size) when `torch.distributed` is initialised with more than one process, else (0, 1)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _decompose(
    name: str, W: Tensor, rank: int, side: Side, solver: str, cache: TripletCache | None, expect_hit: bool,
    device: str | torch.device | None = None,
) -> tuple[Triplets, MatrixReport]:
    """The `rank` triplets of one matrix (from the cache, or solved and stored) and its report line."""
    t0 = time.perf_counter()
    concrete = resolve_solver(solver, side, tuple(W.shape), rank)
    where = solve_device(device, tuple(W.shape), W.device)

    def compute() -> Triplets:
        return solve(W.to(where), rank, side, concrete).cpu()

    if cache is None:
        t, key, hit = compute(), None, False
    else:
        t, key, hit = cache.get_or_compute(W, rank, side, concrete, compute)
    if t.count != rank:
        t = t.take(rank, side)
    dt = time.perf_counter() - t0
    if hit:
        log.debug("%s %s: cache hit in %.3fs", name, tuple(W.shape), dt)
    else:
        if expect_hit:
            log.warning("%s: not in the cache after the barrier (is svd.cache shared by all ranks?): "
                        "decomposed here", name)
        log.info("%s %s: %s solver on %s %.2fs", name, tuple(W.shape), t.solver, where.type, dt)
    return t, MatrixReport(name, tuple(W.shape), dt, hit, key, t.solver, None if hit else where.type)
