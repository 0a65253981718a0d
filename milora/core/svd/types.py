"""What the SVD engine hands around: triplets, init reports, the cache protocol, shared constants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from milora.core.schema import SOLVERS, Side  # noqa: F401 - the engine's names for the one schema's lists

SOLVER_VERSION = 11  # bump when a solver's output for the same input changes: old cache entries then miss
SEED = 0x5EED  # the solvers' private generators: deterministic, and the global RNG is left alone


@dataclass
class Triplets:
    """`r` singular triplets of one matrix `W = U diag(S) Vh`, singular values in descending order."""

    U: Tensor  # (m, r)
    S: Tensor  # (r,)
    Vh: Tensor  # (r, n)
    spectrum: Tensor | None = None  # all singular values (descending) when the solver produced them
    solver: str = "full"

    @property
    def count(self) -> int:
        """How many triplets are stored."""
        return self.S.numel()

    def take(self, rank: int, side: Side) -> Triplets:
        """The `rank` triplets of `side` (the last ones for minor, the first ones for principal)."""
        if rank > self.S.numel():
            raise ValueError(f"asked for {rank} triplets, only {self.S.numel()} stored")
        sl = slice(self.S.numel() - rank, None) if side == "minor" else slice(0, rank)
        return Triplets(self.U[:, sl], self.S[sl], self.Vh[sl, :], self.spectrum, self.solver)

    def cpu(self) -> Triplets:
        """These triplets on the CPU (where the cache and the factors keep them)."""
        if self.U.device.type == "cpu":
            return self
        spectrum = None if self.spectrum is None else self.spectrum.cpu()
        return Triplets(self.U.cpu(), self.S.cpu(), self.Vh.cpu(), spectrum, self.solver)


@dataclass
class MatrixReport:
    """What happened for one matrix during init."""

    name: str
    shape: tuple[int, int]
    seconds: float
    hit: bool
    key: str | None = None
    solver: str = ""
    device: str | None = None  # where the solve ran ("cpu", "cuda"); None for a cache hit


@dataclass
class InitReport:
    """Per-matrix timings and cache use of one adapter init."""

    matrices: list[MatrixReport] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0  # distributed rank of this process (0 when not distributed)
    world_size: int = 1

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
        where = f" (rank {self.rank}/{self.world_size})" if self.world_size > 1 else ""
        return (
            f"SVD init{where}: {len(self.matrices)} matrices, {self.hits} cache hits, "
            f"{self.misses} misses, {self.seconds:.2f}s"
        )


class TripletCache(Protocol):
    """What `compute_factors` needs of a cache (see `milora.core.cache`)."""

    def get_or_compute(
        self, weight: Tensor, rank: int, side: Side, solver: str, compute: Callable[[], Triplets]
    ) -> tuple[Triplets, str, bool]:
        """Return (triplets, cache key, hit) for this weight, computing and storing on a miss."""
        ...
