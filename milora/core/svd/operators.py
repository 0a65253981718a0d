"""The operators the Krylov iteration runs on: `G = A^T A` as products and, for the minor side, an
(approximate) inverse from an fp32 LU of a square `A` or a Cholesky factor of `G`, with fp64-accurate
solves by iterative refinement."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from milora.core.svd.linalg import _Exact, _potrf, _syrk
from milora.core.svd.types import SEED, Side

REFINE_TOL = 1e-5  # relative residual of the fp64-accurate solves (iterative refinement)
# Tall minor side: the fp32 Gram's Cholesky factor serves while cond(A) is below this (eps32 cond^2 ~ 1e-2: its
# solves still contract and its noise stays far below the certificate's bar); above it, the QR of A.
CHOL_MAX_COND = 400.0


@dataclass
class _Operator:
    """`G = F^T F` (symmetric PSD, `N x N`) as products, and for the minor side an (approximate) inverse.

    With `F` (a square LU'd `A`, or the Cholesky factor `L^T`), Rayleigh quotients are `|F x|^2`:
    accurate to `eps * cond(A)` rather than `eps * cond(A)^2` as with `x^T G x` (the minor end).
    """

    N: int
    dtype: torch.dtype
    device: torch.device
    G: Callable[[Tensor], Tensor]
    F: Callable[[Tensor], Tensor] | None = None
    Ft: Callable[[Tensor], Tensor] | None = None
    inv: Callable[[Tensor], Tensor] | None = None
    inv_f: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # (`G^-1 X`, `F G^-1 X`): a by-product
    name: str = ""
    lu: tuple[Tensor, Tensor] | None = None  # the fp32 LU factors of a square A^T (for `solve64`)
    _lam: float | None = None

    def solve64(self, X: Tensor, A: _Exact) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """`G^-1 X` to fp64 accuracy: iterative refinement on the fp32 factorization, residuals with fp64 `A`.

        Square LU route: `A^T Z = X` then `A Y = Z`, each refined (contraction ~eps32 cond(A)); Gram route:
        `G Y = X` refined (contraction ~eps32 cond(A)^2). Returns (`Y`, `A Y`, `G Y` or None): the
        products of the last refinement sweep, so that `_certify` needs no more. None when the
        refinement does not converge.
        """
        if self.lu is not None:
            LU, piv = self.lu  # of A^T
            Z = _refined(lambda R: torch.linalg.lu_solve(LU, piv, R), A.tmm, X)
            if Z is None:
                return None
            Y = _refined(lambda R: torch.linalg.lu_solve(LU, piv, R, adjoint=True), A.mm, Z[0])
            return None if Y is None else (Y[0], Y[1], None)
        assert self.inv is not None
        last: list[Tensor] = []

        def gram(Y: Tensor) -> Tensor:
            AY, GY = A.gram(Y)
            last[:] = [AY]
            return GY

        out = _refined(self.inv, gram, X)
        return None if out is None else (out[0], last[0], out[1])

    def lambda_max(self) -> float:
        """A lower estimate of the largest eigenvalue of `G` (a few power steps): the scale of rounding."""
        if self._lam is not None:
            return self._lam
        gen = torch.Generator(device="cpu").manual_seed(SEED + 1)
        x = torch.randn(self.N, 1, generator=gen, dtype=self.dtype).to(self.device)
        lam = 0.0
        for _ in range(4):
            y = self.G(x / torch.linalg.vector_norm(x))
            lam, x = float(torch.linalg.vector_norm(y)), y
        self._lam = lam
        return lam


def _refined(
    solve32: Callable[[Tensor], Tensor], matvec: Callable[[Tensor], Tensor], B: Tensor, sweeps: int = 12
) -> tuple[Tensor, Tensor] | None:
    """Solve `M Y = B` (fp64) by iterative refinement: `solve32 ~ M^-1` in fp32, residuals `B - M Y` in fp64.

    Stops at a relative residual of `REFINE_TOL` (what the inverse-iteration step needs) or when a sweep no
    longer halves it. Returns (`Y`, `M Y`: the last `matvec`, which was of the returned `Y`), or None if the
    residual did not get below `REFINE_TOL` (the fp32 factorization is too far off).
    """
    scale = B.abs().amax(0).clamp_min(1e-300)  # column scaling keeps fp32 away from under/overflow
    Y = solve32((B / scale).float()).double() * scale
    norm = float(torch.linalg.matrix_norm(B))
    best = math.inf
    for _ in range(sweeps):
        MY = matvec(Y)
        R = B - MY
        rel = float(torch.linalg.matrix_norm(R)) / norm
        if rel <= REFINE_TOL or rel > 0.5 * best:
            best = min(best, rel)
            break
        best = rel
        rs = R.abs().amax(0).clamp_min(1e-300)
        Y = Y + solve32((R / rs).float()).double() * rs
    return (Y, MY) if best <= REFINE_TOL else None


def _chol_operator(G: Tensor | None, L: Tensor | None, name: str) -> _Operator:
    """`G` as products (`G` itself, or `L L^T` when only its Cholesky factor is kept) and `L`'s inverse."""
    ref = G if G is not None else L
    assert ref is not None
    op = _Operator(ref.shape[0], ref.dtype, ref.device, G=lambda X: G @ X, name=name)
    if L is not None:
        Lt = L.T
        op.F, op.Ft = (lambda X: Lt @ X), (lambda Y: L @ Y)
        if G is None:
            op.G = lambda X: L @ (Lt @ X)

        def inv_f(Y: Tensor) -> tuple[Tensor, Tensor]:
            Z = torch.linalg.solve_triangular(L, Y, upper=False)  # = L^T (G^-1 Y) = F G^-1 Y
            return torch.linalg.solve_triangular(Lt, Z, upper=True), Z

        op.inv_f = inv_f
        op.inv = lambda Y: inv_f(Y)[0]
    return op


def _lu_of_transpose(A: Tensor) -> tuple[Tensor, Tensor, int]:
    """LU factors of `A^T` (`torch.linalg.lu_solve`'s format) and LAPACK's info.

    torch's (MKL) getrf: as fast as OpenBLAS's here, and it leaves no spinning OpenBLAS threads behind to
    slow the solves that follow (see `_one_blas_thread`).
    """
    LU, piv, info = torch.linalg.lu_factor_ex(A.T)
    return LU, piv, int(info)


def _lu_operator(A32: Tensor) -> _Operator | None:
    """Square `A`: its fp32 LU as `G^-1` (accuracy ~eps32 cond(A), not squared); None if nearly singular."""
    N = A32.shape[1]
    LU, piv, info = _lu_of_transpose(A32)  # A^T = P L U: `lu_solve` gives A^-T, with adjoint A^-1
    d = LU.diagonal().abs()  # (W is finite: `solve` checked; a zero pivot is what info reports)
    usable = info == 0 and float(d.min()) > N * 1e-7 * float(d.max())
    if not usable:
        return None

    def inv_f(Y: Tensor) -> tuple[Tensor, Tensor]:
        Z = torch.linalg.lu_solve(LU, piv, Y)  # A^-T Y = A (G^-1 Y) = F G^-1 Y
        return torch.linalg.lu_solve(LU, piv, Z, adjoint=True), Z

    return _Operator(
        N, A32.dtype, A32.device, G=lambda X: A32.T @ (A32 @ X), F=lambda X: A32 @ X,
        Ft=lambda Y: A32.T @ Y, name="lu32", lu=(LU, piv), inv=lambda Y: inv_f(Y)[0], inv_f=inv_f,
    )


def _fast_operator(A32: Tensor, side: Side) -> _Operator | None:
    """fp32 operator for the tall fp32 `A` (`G = A^T A`): a preconditioner whose result `_certify` checks.

    Minor side: the LU of a square `A` itself. A tall one: the Cholesky factor of its fp32 Gram matrix
    (syrk: half a matmul), accurate to ~eps32 cond(A)^2, while cond(A) (estimated on the factor) is below
    `CHOL_MAX_COND`; above that (or where it fails, or the square LU is nearly singular) the R of an fp32
    Householder QR of `A`: `G = R^T R`, accurate to ~eps32 cond(A), never squared, at about twice the
    syrk's time (before, a power-law tall matrix fell to the fp64 path at 1.1-3x the full SVD's speed;
    docs/benchmarks.md, "every spectrum"). Principal side: the fp32 Gram matrix.
    """
    M, N = A32.shape
    if side == "minor" and M == N:
        op = _lu_operator(A32)
        if op is not None:
            return op
    if side == "principal":
        return _chol_operator(_syrk(A32), None, "gram32")
    if M > N:
        L = _potrf(_syrk(A32, full=False), overwrite=True)  # in place: no second N x N matrix
        if L is not None and _cond_estimate(L) < CHOL_MAX_COND:
            return _chol_operator(None, L, "chol32")
        del L
    return _qr_operator(A32)


def _cond_estimate(L: Tensor, steps: int = 4) -> float:
    """cond(L) (= cond(A) for the Cholesky factor of A^T A) from a few power steps on `L L^T` and on its
    inverse (products and triangular solves with one vector: O(N^2) each). (The factor's diagonal
    underestimates it by orders of magnitude when the small singular directions are spread over all
    coordinates, as in a power-law spectrum with random singular vectors.)"""
    gen = torch.Generator(device="cpu").manual_seed(SEED + 2)
    x = y = torch.randn(L.shape[0], 1, generator=gen, dtype=L.dtype).to(L.device)
    big = small = 0.0
    for _ in range(steps):
        x = L @ (L.T @ (x / torch.linalg.vector_norm(x)))
        big = float(torch.linalg.vector_norm(x))
        z = torch.linalg.solve_triangular(L, y / torch.linalg.vector_norm(y), upper=False)
        y = torch.linalg.solve_triangular(L.T, z, upper=True)
        small = float(torch.linalg.vector_norm(y))
    ratio = big * small  # ~ lambda_max(G) / lambda_min(G) = cond(L)^2
    return math.sqrt(ratio) if math.isfinite(ratio) else math.inf


def _qr_operator(A32: Tensor) -> _Operator | None:
    """The tall `A`'s fp32 QR as `G = R^T R`: `F = R` and `G^-1 = R^-1 R^-T` by triangular solves; None
    if `R` is numerically singular (a rank-deficient `A`: the exact path handles it)."""
    R = torch.linalg.qr(A32, mode="r").R
    d = R.diagonal().abs()
    if not float(d.min()) > A32.shape[1] * 1e-7 * float(d.max()):
        return None
    return _chol_operator(None, R.T, "qr32")
