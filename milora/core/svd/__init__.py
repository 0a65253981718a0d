"""SVD engine: the singular triplets a MiLoRA (minor) or PiSSA (principal) init needs.

`solve` returns the `r` triplets of one matrix; `compute_factors` turns the triplets of every target
matrix into LoRA factors (`B = U_r sqrt(S_r/s)`, `A = sqrt(S_r/s) V_r^T`), through an optional cache,
splitting the work across ranks under `torch.distributed`.

Solvers (`AdapterConfig.svd_solver`):

* `full` / `full64`: `torch.linalg.svd` in fp32 / fp64, the reference (and the full spectrum).
* `gram`: the minor (or principal) triplets through the Gram matrix of the shorter side: fp32
  factorization, block Krylov, a residual certificate in fp64, an exact fp64 fallback (`gram.py`).
* `lowrank`: randomized subspace iteration (principal side only).
* `auto`: `full` for small matrices, else `gram` (minor) or `lowrank` (principal): `resolve_solver`.

Every solver is deterministic and returns fp32 triplets (fp64 for `full64`), exactly what the cache
stores. Design notes: docs/svd_solver.md.
"""

from milora.core.svd.factors import captured_energy, compute_factors, factors
from milora.core.svd.gram import CERT_TOL, GRAM_TOL
from milora.core.svd.krylov import GRAM_KEEP
from milora.core.svd.solvers import AUTO_MAX_RANK_SHARE, AUTO_MIN_SIDE, AUTO_MIN_SQUARE, resolve_solver, solve
from milora.core.svd.types import (
    SOLVER_VERSION,
    SOLVERS,
    InitReport,
    MatrixReport,
    Side,
    TripletCache,
    Triplets,
)

__all__ = [
    "AUTO_MAX_RANK_SHARE", "AUTO_MIN_SIDE", "AUTO_MIN_SQUARE", "CERT_TOL", "GRAM_KEEP", "GRAM_TOL", "SOLVERS", "SOLVER_VERSION",
    "InitReport", "MatrixReport", "Side", "TripletCache", "Triplets", "captured_energy", "compute_factors",
    "factors", "resolve_solver", "solve",
]
