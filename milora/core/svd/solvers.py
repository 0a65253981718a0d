"""The solvers behind `solve`: full SVD, `gram` (see `gram.py`), randomized `lowrank`, and `auto`'s choice."""

from __future__ import annotations

import torch
from torch import Tensor

from milora.core.errors import InvalidInput
from milora.core.svd.gram import _gram
from milora.core.svd.types import SEED, SOLVERS, Side, Triplets

# `auto` uses the full SVD below this shorter side, or when the rank is a large share of it
# (measured crossover on 2 CPU cores: see docs/benchmarks.md, "SVD initialisation").
AUTO_MIN_SIDE = 384
# ... and for square matrices below this side: on SmolLM2's 576x576 attention projections (cond 1.5e3-7.7e5)
# the full SVD takes ~50 ms and `gram` from 0.5x to 2x of it (docs/benchmarks.md, "every spectrum").
AUTO_MIN_SQUARE = 640
AUTO_MAX_RANK_SHARE = 0.125
LOWRANK_NITER = 6

_LOWRANK_MINOR = (
    "svd_solver 'lowrank' finds the largest singular triplets only (PiSSA); MiLoRA needs the smallest: "
    "set adapter.svd_solver to 'auto', 'gram' or 'full'"
)


def solve(W: Tensor, rank: int, side: Side, solver: str = "auto", info: dict | None = None) -> Triplets:
    """The `rank` smallest (`minor`) or largest (`principal`) singular triplets of the 2-D matrix `W`.

    `info`, when given, receives how the solver got there (for benchmarks and debugging).
    """
    if W.ndim != 2:
        raise InvalidInput(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    if not 0 < rank < min(W.shape):
        raise InvalidInput(f"rank must be in [1, {min(W.shape) - 1}] for a {tuple(W.shape)} matrix, got {rank}")
    # A finite sum means finite entries (inf and NaN propagate); only an overflowing sum needs the full check.
    if not torch.isfinite(W.sum()) and not torch.isfinite(W).all():
        raise InvalidInput(f"the {tuple(W.shape)} matrix has NaN or inf entries: is the base model corrupted?")
    name = resolve_solver(solver, side, tuple(W.shape), rank)
    info = {} if info is None else info
    info["solver"] = name
    if name == "full":
        return _full(W, rank, side, torch.float32, name)
    if name == "full64":
        return _full(W, rank, side, torch.float64, name)
    if name == "gram":
        return _gram(W, rank, side, info=info)
    return _lowrank(W, rank, side)


def resolve_solver(solver: str, side: Side, shape: tuple[int, int], rank: int) -> str:
    """The concrete solver `auto` stands for, for this side, shape and rank."""
    if solver not in SOLVERS:
        raise InvalidInput(f"unknown svd_solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver == "lowrank" and side == "minor":
        raise InvalidInput(_LOWRANK_MINOR)
    if solver != "auto":
        return solver
    k = min(shape)
    if k < (AUTO_MIN_SQUARE if shape[0] == shape[1] else AUTO_MIN_SIDE) or rank > AUTO_MAX_RANK_SHARE * k:
        return "full"
    return "gram" if side == "minor" else "lowrank"


def solve_device(requested: str | torch.device | None, shape: tuple[int, int], current: torch.device) -> torch.device:
    """Where a matrix of `shape` (now on `current`) is solved: `requested` when given, else ("auto") on the GPU
    when there is one and the matrix is large enough for the fast solvers (a GPU beats 2-16 CPU cores on
    those by 10-100x, and the transfer of one matrix costs milliseconds); small ones where they are.
    """
    if requested is not None and str(requested) != "auto":
        return torch.device(requested)
    if current.type == "cpu" and torch.cuda.is_available() and min(shape) >= AUTO_MIN_SIDE:
        return torch.device("cuda")
    return current


def _full(W: Tensor, rank: int, side: Side, dtype: torch.dtype, name: str) -> Triplets:
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    t = Triplets(U, S, Vh).take(rank, side)
    return Triplets(t.U.contiguous(), t.S.contiguous(), t.Vh.contiguous(), S.contiguous(), name)


def _lowrank(W: Tensor, rank: int, side: Side, niter: int = LOWRANK_NITER) -> Triplets:
    """Principal triplets by randomized subspace iteration (`niter` power steps, QR after each)."""
    if side != "principal":
        raise InvalidInput(_LOWRANK_MINOR)
    A = W.detach().to(torch.float32)
    m, n = A.shape
    p = min(m, n, rank + max(10, rank // 2))
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    Q = torch.linalg.qr(A @ torch.randn(n, p, generator=gen).to(A.device)).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    U = Q @ Ub[:, :rank]
    return Triplets(U.contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous(), None, "lowrank")
