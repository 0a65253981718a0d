"""SVD engine: the singular triplets a MiLoRA (minor) or PiSSA (principal) init needs.

`solve` returns the `r` triplets of one matrix; `compute_factors` turns the triplets of every target
matrix into LoRA factors (`B = U_r sqrt(S_r/s)`, `A = sqrt(S_r/s) V_r^T`), through an optional cache.
Whatever the base dtype, the decomposition runs in fp32 or fp64.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Side = Literal["minor", "principal"]
SOLVER_VERSION = 1


@dataclass
class Triplets:
    """`r` singular triplets of one matrix `W = U diag(S) Vh`, singular values in descending order."""

    U: Tensor  # (m, r)
    S: Tensor  # (r,)
    Vh: Tensor  # (r, n)
    spectrum: Tensor | None = None  # all singular values (descending) when the solver produced them
    solver: str = "full"

    def take(self, rank: int, side: Side) -> Triplets:
        """The `rank` triplets of `side` (the last ones for minor, the first ones for principal)."""
        if rank > self.S.numel():
            raise ValueError(f"asked for {rank} triplets, only {self.S.numel()} stored")
        sl = slice(self.S.numel() - rank, None) if side == "minor" else slice(0, rank)
        return Triplets(self.U[:, sl], self.S[sl], self.Vh[sl, :], self.spectrum, self.solver)


@dataclass
class MatrixReport:
    """What happened for one matrix during init."""

    name: str
    shape: tuple[int, int]
    seconds: float
    hit: bool
    key: str | None = None
    solver: str = ""


@dataclass
class InitReport:
    """Per-matrix timings and cache use of one adapter init."""

    matrices: list[MatrixReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def hits(self) -> int:
        """Matrices served from the cache."""
        return sum(m.hit for m in self.matrices)

    @property
    def misses(self) -> int:
        """Matrices decomposed in this process."""
        return len(self.matrices) - self.hits

    def summary(self) -> str:
        """One line: matrices, hits, misses, seconds."""
        return (
            f"SVD init: {len(self.matrices)} matrices, {self.hits} cache hits, "
            f"{self.misses} misses, {self.seconds:.2f}s"
        )


class TripletCache(Protocol):
    """What `compute_factors` needs of a cache (see `milora.cache`)."""

    def get_or_compute(
        self, weight: Tensor, rank: int, side: Side, solver: str, compute: Callable[[], Triplets]
    ) -> tuple[Triplets, str, bool]:
        """Return (triplets, cache key, hit) for this weight, computing and storing on a miss."""
        ...


def _full(W: Tensor, rank: int, side: Side, dtype: torch.dtype, name: str) -> Triplets:
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    t = Triplets(U, S, Vh, spectrum=S.clone(), solver=name).take(rank, side)
    return Triplets(t.U.contiguous(), t.S.contiguous(), t.Vh.contiguous(), S, name)


def resolve_solver(solver: str, side: Side, shape: tuple[int, int], rank: int) -> str:
    """The concrete solver `auto` stands for, for this side and shape."""
    if solver != "auto":
        return solver
    return "full"


def solve(W: Tensor, rank: int, side: Side, solver: str = "auto") -> Triplets:
    """The `rank` smallest (`minor`) or largest (`principal`) singular triplets of the 2-D matrix `W`."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    if not 0 < rank < min(W.shape):
        raise ValueError(f"rank must be in [1, {min(W.shape) - 1}] for a {tuple(W.shape)} matrix, got {rank}")
    name = resolve_solver(solver, side, tuple(W.shape), rank)
    if name == "full":
        return _full(W, rank, side, torch.float32, name)
    if name == "full64":
        return _full(W, rank, side, torch.float64, name)
    raise ValueError(f"unknown svd_solver {solver!r}")


def factors(t: Triplets, scale: float) -> tuple[Tensor, Tensor]:
    """LoRA factors (A, B) in fp32 from triplets, so that `scale * B @ A = U diag(S) Vh`."""
    root = torch.sqrt(t.S.to(torch.float64) / scale)
    B = (t.U.to(torch.float64) * root).to(torch.float32)
    A = (root[:, None] * t.Vh.to(torch.float64)).to(torch.float32)
    return A.contiguous(), B.contiguous()


def compute_factors(
    weights: Mapping[str, Tensor],
    rank: int,
    side: Side,
    scale: float,
    solver: str = "auto",
    cache: TripletCache | None = None,
    progress: bool = True,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Triplets], InitReport]:
    """Factors (A, B) for every named 2-D weight (`out x in`), via the cache when one is given."""
    from tqdm.auto import tqdm

    out: dict[str, tuple[Tensor, Tensor]] = {}
    trips: dict[str, Triplets] = {}
    report = InitReport()
    t_all = time.perf_counter()
    bar = tqdm(weights.items(), desc=f"SVD init ({side})", unit="matrix", disable=not progress, leave=False)
    for name, W in bar:
        t0 = time.perf_counter()
        compute = (lambda W=W: solve(W, rank, side, solver))  # noqa: E731
        if cache is None:
            t, key, hit = compute(), None, False
        else:
            t, key, hit = cache.get_or_compute(W, rank, side, solver, compute)
        t = t.take(rank, side) if t.S.numel() != rank else t
        out[name] = factors(t, scale)
        trips[name] = t
        dt = time.perf_counter() - t0
        report.matrices.append(MatrixReport(name, tuple(W.shape), dt, hit, key, t.solver))
        log.debug("%s %s: %s in %.3fs", name, tuple(W.shape), "hit" if hit else t.solver, dt)
    report.seconds = time.perf_counter() - t_all
    log.info(report.summary())
    return out, trips, report
