"""The `gram` solver: triplets through the Gram matrix of the shorter side, without a full SVD.

An fp32 route (fp32 operator, Krylov, inverse-iteration steps, a residual certificate in fp64) with an
exact fp64 fallback; the triplets come from an SVD of `W X` for the final subspace `X`.
Design: docs/svd_solver.md.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from milora.core.svd.krylov import _krylov, _krylov_width
from milora.core.svd.linalg import _cholesky, _eigh, _Exact, _syrk
from milora.core.svd.operators import _chol_operator, _fast_operator, _Operator
from milora.core.svd.types import Side, Triplets

log = logging.getLogger(__name__)

# The Krylov iteration stops when the extrapolated remaining change of the captured minor energy is below
# this (relative). The extrapolation underestimates what is left on a near-degenerate small end (the
# benchmark's "clustered" rows: 256 singular values within 2%): at 5e-4 it stopped with 1.7e-3-3.4e-3 excess
# over the optimum, at 5e-5 with <= 2.4e-4 (docs/benchmarks.md, "every spectrum"), 4x inside the 1e-3 bar,
# for 2-7 more fp32 blocks (~0.1-0.3 s at 4096 columns).
GRAM_TOL = 5e-5
CERT_TOL = 3e-4  # certified bound on the other side's relative excess energy (the benchmark's bar: 1e-3)
GRAM_EXTRA, GRAM_EXTRA_MIN = 0.25, 8  # Krylov block: rank + max(GRAM_EXTRA_MIN, GRAM_EXTRA * rank) columns
GRAM_MAX_BLOCKS = 60  # fp64 operator applications before giving up on `GRAM_TOL` (then warn)
FAST_MAX_BLOCKS = 30  # fp32 operator applications before handing over to the certificate
INVERSE_STEPS = 3  # fp64-accurate inverse-iteration steps on the wanted vectors before the exact fallback


def _gram(W: Tensor, rank: int, side: Side, tol: float = GRAM_TOL, info: dict | None = None) -> Triplets:
    """Triplets through the Gram matrix of the shorter side; `info` receives the path taken."""
    info = {} if info is None else info
    m, n = W.shape
    wide = m < n
    W32 = W.detach().to(torch.float32)
    A32 = W32.T if wide else W32  # tall (M x N, M >= N): we want its right singular vectors
    A = _Exact(A32)  # fp64 products with W: the certificate's and the triplets'
    N = A.shape[1]
    block = min(N, rank + max(GRAM_EXTRA_MIN, int(rank * GRAM_EXTRA)))
    X = AX = X0 = None
    if not _dense_is_cheaper(N, block):
        X, AX, X0 = _fast_route(A32, A, block, rank, side, tol, info)
    if X is None:
        X = _exact_gram(A.full, rank, side, block, tol, info, X0)
    # Rayleigh-Ritz on W itself: singular values from W (not squared), U orthonormal by construction.
    Uy, Sy, Vyh = torch.linalg.svd(AX if AX is not None else A.mm(X), full_matrices=False)
    sl = slice(Sy.numel() - rank, None) if side == "minor" else slice(0, rank)
    Ua, S, Va = Uy[:, sl], Sy[sl], X @ Vyh[sl].T
    U, Vh = (Va, Ua.T) if wide else (Ua, Va.T)
    f32 = torch.float32
    return Triplets(U.to(f32).contiguous(), S.to(f32).contiguous(), Vh.to(f32).contiguous(), None, "gram")


def _dense_is_cheaper(N: int, block: int) -> bool:
    """Small matrices (or a Krylov space that would span much of the space): a dense eigh beats Krylov."""
    return N <= 256 or 2 * _krylov_width(block) > N


def _fast_route(
    A32: Tensor, A: _Exact, block: int, rank: int, side: Side, tol: float, info: dict
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The fp32 route: (`X`, `A X` or None, None) on success, else (None, None, a start for the exact
    path or None)."""
    op = _fast_operator(A32, side)
    if op is None:
        info["fallback"] = "no fp32 factorization"
        return None, None, None
    X, applied, converged = _krylov(op, block, rank, side, tol, CERT_TOL, FAST_MAX_BLOCKS)
    info.update(path=op.name, blocks=applied)
    if side == "principal":
        return X, None, None
    if not converged:  # a flat minor end: the exact path continues from here
        info["fallback"] = f"{op.name} did not converge"
        return None, None, X
    certified = _inverse_steps(op, A, X, rank, info)
    if certified is None:  # (nor `A X`: the exact path's subspace is a different one)
        info["fallback"] = op.name
        return None, None, None
    return (*certified, None)


def _inverse_steps(
    op: _Operator, A: _Exact, X: Tensor, rank: int, info: dict
) -> tuple[Tensor, Tensor] | None:
    """The minor block `X` of the fp32 Krylov, cleaned and certified: (`X`, `A X`) of its `rank` vectors,
    or None if the certificate fails.

    The fp32 solves leave noise along large-sigma directions: cheap in energy on the Gram side but
    amplified by sigma_j / sigma_i on the other (U = W v / sigma). An inverse-iteration step on the block
    damps it by lambda_i / lambda_j, and its Rayleigh-Ritz in fp64 (exact products with W) fixes what the
    fp32 operator mixed; the certificate judges the result. First with the fp32 solve (its noise,
    ~eps32 cond^2, is usually far below the bar), then, if that fails, with fp64-accurate solves
    (iterative refinement) while the excess keeps falling (near-cut mixing decays more slowly).
    """
    lam = op.lambda_max()
    assert op.inv is not None
    Y = op.inv(X.to(op.dtype)).to(torch.float64)
    X, AX, excess, passed = _certify(A, Y, *A.gram(Y), rank, CERT_TOL, lam)
    info.update(inverse_steps=0, certified_excess=excess)
    last = excess
    for step in range(1, INVERSE_STEPS + 1 if not passed else 1):
        solved = op.solve64(X, A)
        if solved is None:
            break
        X, AX, excess, passed = _certify(A, *solved, rank, CERT_TOL, lam)
        info.update(inverse_steps=step, certified_excess=excess)
        if passed or excess > 0.25 * last:
            break
        last = excess
    return (X[:, :rank], AX[:, :rank]) if passed else None


def _certify(
    A: _Exact, Y: Tensor, AY: Tensor, GY: Tensor | None, rank: int, tol: float, lam_max: float
) -> tuple[Tensor, Tensor, float, bool]:
    """fp64 Rayleigh-Ritz of the block `Y` on `W` and a residual certificate for its `rank` minor vectors.

    `AY = A Y` and `GY = A^T A Y` (None: computed here) come with `Y`, from the refinement's last sweep.
    For a Ritz pair (theta, x) of `G = A^T A` with residual `r = G x - theta x`, the energy of `W` on
    the other side's vector (`A x / sqrt(theta)`) exceeds theta by `|r|^2 / theta`; the certificate asks
    that excess, summed, to be below `tol` of the captured energy (or at rounding level). Returns the
    block's Ritz vectors (ascending) and `A` times them, the relative excess, and whether it passed.
    """
    # Orthonormalise Y = X T (columns scaled first: inverse iteration leaves them of uneven norms) and
    # carry the products along: A X = (A Y) T^-1. T is well conditioned (a cond(T) of c costs c eps64
    # relative in the products, far below the tolerances here).
    d = torch.linalg.vector_norm(Y, dim=0).clamp_min(1e-300)
    X, T = torch.linalg.qr(Y / d)
    T = T * d  # Y = X T

    def right(P: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(T, P, upper=True, left=False)

    AX = right(AY)
    theta, Z = _eigh(AX.T @ AX)
    assert Z is not None
    X, AX, th = X @ Z, AX @ Z, theta[:rank].clamp_min(0)
    GX = A.tmm(AX[:, :rank]) if GY is None else right(GY) @ Z[:, :rank]
    R = GX - X[:, :rank] * th
    captured = float(th.sum())
    # |r|^2 / theta is computed to ~(eps sigma_max)^2 per vector (theta ~ 0 included)
    floor = rank * A.shape[1] * (8 * torch.finfo(torch.float64).eps) ** 2 * lam_max
    excess = float((R.pow(2).sum(0) / th.clamp_min(floor / rank)).sum())
    passed = excess <= tol * captured + floor
    if not passed:
        log.debug("certificate failed: other-side excess %.2e of %.2e captured", excess, captured)
    return X, AX, excess / max(captured, floor), passed


def _exact_gram(A: Tensor, rank: int, side: Side, block: int, tol: float, info: dict,
                X0: Tensor | None = None) -> Tensor:
    """The wanted block through the fp64 Gram matrix: Krylov on its Cholesky inverse (from `X0` when
    given), or dense eigh."""
    N = A.shape[1]
    G = _syrk(A)
    L = _cholesky(G, max_shift=1e-8) if side == "minor" else None
    if _dense_is_cheaper(N, block) or (side == "minor" and L is None):
        info["path"] = "dense64"
        _, evecs = _eigh(G)  # ascending
        assert evecs is not None
        return evecs[:, :block] if side == "minor" else evecs[:, -block:]
    op = _chol_operator(G, L, "chol64")
    X, applied, ok = _krylov(op, block, rank, side, tol, CERT_TOL, GRAM_MAX_BLOCKS, X0)
    info.update(path="krylov64", blocks=info.get("blocks", 0) + applied)
    if not ok:
        log.warning(
            "gram solver: no convergence to %.0e after %d block applications on a %s matrix; using the best "
            "subspace found. Set adapter.svd_solver: full for an exact SVD.", tol, applied, tuple(A.shape),
        )
    return X
