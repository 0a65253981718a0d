"""SVD engine: the singular triplets a MiLoRA (minor) or PiSSA (principal) init needs.

`solve` returns the `r` triplets of one matrix; `compute_factors` turns the triplets of every target
matrix into LoRA factors (`B = U_r sqrt(S_r/s)`, `A = sqrt(S_r/s) V_r^T`), through an optional cache,
splitting the work across ranks under `torch.distributed`.

Solvers (`AdapterConfig.svd_solver`):

* `full` / `full64`: `torch.linalg.svd` in fp32 / fp64, the reference (and the full spectrum).
* `gram`: the minor triplets without a full SVD (W is `m x n`; `A` is W or W^T, whichever is tall, and
  `G = A^T A` the Gram matrix of the shorter side, whose smallest eigenpairs are wanted).
  1. An fp32 operator `~G^-1`: the LU of W when W is square (accuracy ~eps32 cond(W)), else the
     Cholesky factor of the fp32 Gram matrix (syrk: half a matmul; accuracy ~eps32 cond(W)^2, so it
     is only used where that is below ~1).
  2. Thick-restarted block Krylov on that operator (blocks of `rank + rank/4` columns, `GRAM_DEPTH`
     blocks per cycle, the best `GRAM_KEEP` blocks of Ritz vectors kept at a restart); the Rayleigh-
     Ritz problem in fp64 (the projected eigenvalues span cond(W)^2; the basis itself is fp32 with a
     factored fp32 operator, its ~eps32 loss of orthogonality moving them as little), the projection from
     `|F x|^2` with `G = F^T F` (F = W or the Cholesky factor), `F` times a new block taken from the
     solve that made it where that is accurate. Stops when the captured minor energy has converged
     (extrapolated remaining change below `GRAM_TOL`).
  3. The fp32 solves leave noise along large-sigma directions, cheap in energy on the Gram side but
     amplified by sigma_j / sigma_i on the other side (recovered as `A v / sigma`). So: an inverse-
     iteration step on the block, Rayleigh-Ritz with fp64 products with W, and a residual certificate
     in fp64: the other side's excess energy `sum |r_i|^2 / theta_i` must be below `CERT_TOL` of the
     captured energy. The step's solve is fp32 first (its noise is usually far below the bar); if the
     certificate fails, steps with fp64-accurate solves (iterative refinement of the fp32
     factorization, residuals with W in fp64) follow. fp64 products with W go by row blocks converted
     on the fly (`_Exact`): no fp64 copy of W.
  4. If the fp32 factorization, the refinement or the certificate fails (cond(W) beyond fp32), the
     exact path: fp64 Gram matrix, its Cholesky factor, the same Krylov iteration with the residual
     test in it (or a dense eigh for small matrices).
  The triplets come from an SVD of `A X` for the final subspace `X`: singular values from W itself
  (not squared), `A V = U S` to rounding, U orthonormal even where sigma ~ 0. Principal side: the
  Krylov iteration on the fp32 Gram matrix itself, then the same final SVD in fp64.
* `lowrank`: randomized subspace iteration on `W` (principal side only: it finds the largest triplets).
* `auto`: `full` for small matrices (where it is fastest anyway), `gram` (minor) or `lowrank`
  (principal) for large ones; see `resolve_solver`. Thresholds are from `benchmarks/svd_init.py`.

Whatever the solver, the caller computes the residual `W - s B A` from the factors actually used, so
the step-0 model is exact. Every solver is deterministic (fixed seeds on a private generator) and
returns fp32 triplets (fp64 for `full64`) that are exactly what the cache stores.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from milora.core.errors import InvalidInput

log = logging.getLogger(__name__)

# `OPENBLAS_THREAD_TIMEOUT` (short spins of scipy's idle OpenBLAS threads) is set by `milora/__init__.py`,
# so that it is in the environment before anything loads scipy's OpenBLAS; see there.

Side = Literal["minor", "principal"]
SOLVERS = ("auto", "full", "full64", "gram", "lowrank")
SOLVER_VERSION = 8  # bump when a solver's output for the same input changes: old cache entries then miss

# `auto` uses the full SVD below this shorter side, or when the rank is a large share of it
# (measured crossover on 2 CPU cores: see docs/benchmarks.md, "SVD initialisation").
AUTO_MIN_SIDE = 384
AUTO_MAX_RANK_SHARE = 0.125
# The Krylov iteration stops when the extrapolated remaining change of the captured minor energy is below
# this (relative): half the benchmark's 1e-3 bar on the final excess, which the last inverse-iteration step
# and Rayleigh-Ritz on W then lower further (measured: <= 4.1e-4, docs/benchmarks.md).
GRAM_TOL = 5e-4
CERT_TOL = 3e-4  # certified bound on the other side's relative excess energy (the benchmark's bar: 1e-3)
GRAM_DEPTH = 5  # Krylov blocks per restart cycle
RATE_WINDOW = 4  # convergence rate: geometric mean of the last this many step ratios (~a restart cycle)
GRAM_KEEP = 2  # Ritz vectors kept at a restart, in blocks
GRAM_CHECK = 1  # Rayleigh-Ritz (convergence test) every this many blocks, and at the end of each cycle
F_RECUR_CANCEL = 10.0  # largest cancellation |F Y| / |F Y - F Q C| at which `F X` comes from the solve
GRAM_EXTRA, GRAM_EXTRA_MIN = 0.25, 8  # Krylov block: rank + max(GRAM_EXTRA_MIN, GRAM_EXTRA * rank) columns
GRAM_MAX_BLOCKS = 60  # fp64 operator applications before giving up on `GRAM_TOL` (then warn)
FAST_MAX_BLOCKS = 30  # fp32 operator applications before handing over to the certificate
REFINE_TOL = 1e-5  # relative residual of the fp64-accurate solves (iterative refinement)
INVERSE_STEPS = 3  # fp64-accurate inverse-iteration steps on the wanted vectors before the exact fallback
LOWRANK_NITER = 6
SEED = 0x5EED


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


# ----------------------------------------------------------------------------- solvers


def _full(W: Tensor, rank: int, side: Side, dtype: torch.dtype, name: str) -> Triplets:
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    t = Triplets(U, S, Vh).take(rank, side)
    return Triplets(t.U.contiguous(), t.S.contiguous(), t.Vh.contiguous(), S.contiguous(), name)


def _syrk(A: Tensor, full: bool = True) -> Tensor:
    """`A^T A` for a tall `A`: BLAS syrk on CPU (half a matmul's work).

    `full=False` skips mirroring the lower triangle into the upper one (all a Cholesky needs).
    """
    if A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64):
        try:
            from scipy.linalg import blas
        except ImportError:  # pragma: no cover - scipy ships with the pipeline's dependencies
            return A.T @ A
        syrk = blas.ssyrk if A.dtype == torch.float32 else blas.dsyrk
        a = A.numpy()
        # syrk wants a column-major operand: `a.T` of a row-major `a` is one, without a copy.
        with _small_blas(A.shape[1]):
            c = syrk(1.0, a.T, trans=0, lower=1) if a.flags.c_contiguous else syrk(1.0, a, trans=1, lower=1)
        G = torch.from_numpy(c)  # column-major, lower triangle filled
        return torch.tril(G) + torch.tril(G, -1).T if full else G
    return A.T @ A


def _potrf(G: Tensor, overwrite: bool = False) -> Tensor | None:
    """Lower Cholesky factor of the SPD `G` (only its lower triangle is read), or None if not (numerically) SPD.

    `overwrite`: factor in `G`'s own storage (LAPACK's in-place potrf), which `G` then no longer holds,
    whether or not it succeeded: no second matrix of its size (for N = 4096, 64 MB of fresh memory,
    which on this VM costs more to fault in than the copy itself).
    """
    if G.device.type == "cpu":
        try:
            from scipy.linalg import lapack
        except ImportError:  # pragma: no cover
            lapack = None
        if lapack is not None:  # OpenBLAS potrf is ~2x faster than torch's here
            potrf = lapack.spotrf if G.dtype == torch.float32 else lapack.dpotrf
            g = G.numpy()
            with _small_blas(G.shape[0]):
                if g.flags.f_contiguous:
                    c, info = potrf(g, lower=1, clean=1, overwrite_a=int(overwrite))
                    return torch.from_numpy(c) if info == 0 else None
                c, info = potrf(g.T, lower=0, clean=1, overwrite_a=int(overwrite))  # row-major: its transpose is column-major, upper = our lower
            return torch.from_numpy(c).T if info == 0 else None
    L, info = torch.linalg.cholesky_ex(G)
    return L if int(info) == 0 else None


def _cholesky(G: Tensor, max_shift: float, remake: Callable[[], Tensor] | None = None) -> Tensor | None:
    """Cholesky factor of `G + shift I` for the smallest shift in `[0, max_shift * ||G||]` that works.

    A shift keeps the eigenvectors, so inverse iteration still finds the minor subspace (the spectrum
    below the shift is only flattened); None when even the largest shift fails. With `remake` (which
    builds `G` again), the first try factors `G` in place, and only a shifted retry rebuilds it.
    """
    L = _potrf(G, overwrite=remake is not None)
    if L is not None:
        return L
    if remake is not None:
        G = remake()
    scale = float(G.diagonal().abs().max()) or 1.0
    shift = G.shape[0] * torch.finfo(G.dtype).eps * scale
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    while shift <= max_shift * scale:
        L = _potrf(G + shift * eye)
        if L is not None:
            log.debug("Gram matrix (%s) is numerically singular: Cholesky with shift %.1e", G.dtype, shift / scale)
            return L
        shift *= 10
    return None


class _Exact:
    """fp64 products with the fp32 matrix `A` (exact in fp64), without an fp64 copy of `A`.

    Blocks of `A`'s storage are converted as they are used (they stay in cache for the product), which
    costs no more than products with a stored fp64 copy, and saves making one (an fp64 copy of an
    11008 x 4096 matrix: ~0.1 s and 360 MB). The blocks are rows of the row-major matrix behind `A`:
    rows of `A` itself, or of `W` when `A = W^T` is the transpose of a wide row-major `W` (its rows are
    `A`'s columns: no strided gather, which costs more than the products). `full` makes the copy, for
    the exact path only.
    """

    BLOCK = 512 * 4096  # elements per block: 16 MB of fp64 (measured: 256-512 rows of 4096 best, 1024+ slower)

    def __init__(self, A32: Tensor) -> None:
        self.A32 = A32
        self.shape = A32.shape
        self._full: Tensor | None = None
        # Row blocks of `S`, with `A = S` (tall storage) or `A = S^T` (the transpose of a wide `W`).
        self.transposed = not A32.is_contiguous() and A32.T.is_contiguous()
        self.S = A32.T if self.transposed else A32

    @property
    def full(self) -> Tensor:
        """`A` in fp64 (made on first use)."""
        if self._full is None:
            self._full = self.A32.to(torch.float64)
        return self._full

    def _blocks(self):  # noqa: ANN202 - a generator of (slice, fp64 rows of `S`), a block valid until the next
        rows, cols = self.S.shape
        step = max(1, min(rows, self.BLOCK // cols))
        buf = torch.empty(step, cols, dtype=torch.float64, device=self.S.device)  # one buffer: no page faults
        for i in range(0, rows, step):
            sl = slice(i, min(i + step, rows))
            yield sl, buf[: sl.stop - i].copy_(self.S[sl])

    def _s_mm(self, Y: Tensor) -> Tensor:
        """`S Y`, one block of rows at a time."""
        out = torch.empty(self.S.shape[0], Y.shape[1], dtype=torch.float64, device=Y.device)
        for sl, Si in self._blocks():
            torch.mm(Si, Y, out=out[sl])
        return out

    def _s_tmm(self, Z: Tensor) -> Tensor:
        """`S^T Z`, accumulated over the blocks."""
        out = torch.zeros(self.S.shape[1], Z.shape[1], dtype=torch.float64, device=Z.device)
        for sl, Si in self._blocks():
            out.addmm_(Si.T, Z[sl])
        return out

    def mm(self, Y: Tensor) -> Tensor:
        """`A Y`."""
        if self._full is not None:
            return self._full @ Y
        return self._s_tmm(Y) if self.transposed else self._s_mm(Y)

    def tmm(self, Z: Tensor) -> Tensor:
        """`A^T Z`."""
        if self._full is not None:
            return self._full.T @ Z
        return self._s_mm(Z) if self.transposed else self._s_tmm(Z)

    def gram(self, Y: Tensor) -> tuple[Tensor, Tensor]:
        """(`A Y`, `A^T A Y`): one pass over `A`'s rows (two over a wide `W`'s)."""
        if self._full is not None or self.transposed:
            AY = self.mm(Y)
            return AY, self.tmm(AY)
        AY = torch.empty(self.shape[0], Y.shape[1], dtype=torch.float64, device=Y.device)
        GY = torch.zeros(self.shape[1], Y.shape[1], dtype=torch.float64, device=Y.device)
        for sl, Ai in self._blocks():
            torch.mm(Ai, Y, out=AY[sl])
            GY.addmm_(Ai.T, AY[sl])
        return AY, GY


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

    def products(self, X: Tensor) -> tuple[Tensor | None, Tensor]:
        """(`F X` or None, `G X`)."""
        if self.F is not None and self.Ft is not None:
            FX = self.F(X)
            return FX, self.Ft(FX)
        return None, self.G(X)

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


def _lu_of_transpose(A: Tensor) -> tuple[Tensor, Tensor, int]:
    """LU factors of `A^T` (`torch.linalg.lu_solve`'s format) and LAPACK's info.

    torch's (MKL) getrf: as fast as OpenBLAS's here, and it leaves no spinning OpenBLAS threads behind to
    slow the solves that follow (see `_one_blas_thread`).
    """
    LU, piv, info = torch.linalg.lu_factor_ex(A.T)
    return LU, piv, int(info)


def _fast_operator(A32: Tensor, side: Side) -> _Operator | None:
    """fp32 operator for the tall fp32 `A` (`G = A^T A`): a preconditioner whose result `_certify` checks.

    Minor side, square `A`: LU of `A` itself (accuracy follows cond(A), not cond(A)^2). Otherwise the
    fp32 Gram matrix, with (minor side) its Cholesky factor, shifted by up to 1e-5 of its norm.
    """
    M, N = A32.shape
    if side == "minor" and M == N:
        LU, piv, info = _lu_of_transpose(A32)  # A^T = P L U: `lu_solve` gives A^-T, with adjoint A^-1
        d = LU.diagonal().abs()  # (W is finite: `solve` checked; a zero pivot is what info reports)
        if info == 0 and float(d.min()) > N * 1e-7 * float(d.max()):
            def inv_f(Y: Tensor) -> tuple[Tensor, Tensor]:
                Z = torch.linalg.lu_solve(LU, piv, Y)  # A^-T Y = A (G^-1 Y) = F G^-1 Y
                return torch.linalg.lu_solve(LU, piv, Z, adjoint=True), Z

            return _Operator(
                N, A32.dtype, A32.device, G=lambda X: A32.T @ (A32 @ X), F=lambda X: A32 @ X,
                Ft=lambda Y: A32.T @ Y, name="lu32", lu=(LU, piv), inv=lambda Y: inv_f(Y)[0], inv_f=inv_f,
            )
    if side == "principal":
        return _chol_operator(_syrk(A32), None, "gram32")
    def gram32() -> Tensor:
        return _syrk(A32, full=False)

    L = _cholesky(gram32(), max_shift=1e-5, remake=gram32)
    return None if L is None else _chol_operator(None, L, "chol32")


def _extend(Q: Tensor, Y: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """An orthonormal basis `X` of `Y` orthogonal to the orthonormal `Q` (block CGS2, then Cholesky QR
    twice), as (`X`, `C`, `R`) with `X = (Y - Q C) R^-1` (`R` upper triangular; None on the Householder
    path, where `X` is not tracked that way); None if `Y` is in span(Q).

    Cholesky QR (two Gram matrices and two triangular solves: a few large BLAS-3 calls, where Householder
    QR is many small ones) is orthonormal to rounding after its second pass when cond(Y) is below ~1e6;
    otherwise (or when most of `Y` was in span(Q)) Householder QR and a third pass against `Q`.
    """
    # Cholesky QR's limits, ~sqrt(eps)-scaled: fp64, or an fp32 basis (see `_krylov`)
    lost, flat = (1e-4, 1e-6) if Y.dtype == torch.float64 else (1e-2, 1e-3)
    norm = float(torch.linalg.matrix_norm(Y)) or 1.0
    C = Q.T @ Y
    Y = Y - Q @ C
    C2 = Q.T @ Y
    Y = Y - Q @ C2
    C += C2
    left = float(torch.linalg.matrix_norm(Y))
    if left <= 100 * torch.finfo(Y.dtype).eps * norm:
        return None  # span(Q) is invariant: the Krylov space is exhausted
    if left >= lost * norm:
        L, info = torch.linalg.cholesky_ex(Y.T @ Y)
        d = L.diagonal()
        if int(info) == 0 and float(d.min()) >= flat * float(d.max()):
            X = torch.linalg.solve_triangular(L.T, Y, upper=True, left=False)
            L2, info = torch.linalg.cholesky_ex(X.T @ X)
            if int(info) == 0:
                return torch.linalg.solve_triangular(L2.T, X, upper=True, left=False), C, L2.T @ L.T
    X, R = torch.linalg.qr(Y)
    d = R.diagonal().abs()
    if left < lost * norm or float(d.min()) < flat * float(d.max()):
        # Columns of Y that were ~0 come back from QR as arbitrary directions: orthogonalise once more.
        X = torch.linalg.qr(X - Q @ (Q.T @ X)).Q
    return X, C, None


def _converged(history: list[float], tol: float, noise: float) -> bool:
    """Geometric extrapolation of a converging sequence: is the remaining change below `tol` (relative)?

    The rate is the geometric mean of the last `RATE_WINDOW` step ratios, about a restart cycle: progress
    is uneven within a cycle (the first block after a thick restart gains least), so a single step's
    ratio swings both ways. Capped at 0.99: a slowly converging sequence (a flat minor end) must not
    look converged early.
    """
    if len(history) < 3:
        return False
    h = history[-(RATE_WINDOW + 2):]
    d = [abs(h[i] - h[i + 1]) for i in range(len(h) - 1)]
    if d[-1] <= noise:
        return True
    rho = min((d[-1] / d[0]) ** (1 / (len(d) - 1)) if d[0] > 0 else 1.0, 0.99)
    return d[-1] * rho / (1.0 - rho) <= tol * abs(history[-1])


def _sym(H: Tensor) -> Tensor:
    return (H + H.T) / 2


_OPENBLAS: list = []  # [threadpoolctl controller of scipy's OpenBLAS, or None], made on first use


def _one_blas_thread():  # noqa: ANN202 - a context manager
    """Context: scipy's OpenBLAS on one thread, for its small calls.

    After a multithreaded call, OpenBLAS's idle threads spin for ~0.1 s, taking a core from the torch
    (MKL) work that follows: ~2x slower triangular solves after each small eigh. Small problems lose
    nothing on one thread. A no-op without threadpoolctl.
    """
    import contextlib

    if not _OPENBLAS:
        try:
            from threadpoolctl import ThreadpoolController

            _OPENBLAS.append(ThreadpoolController().select(internal_api="openblas"))
        except Exception:  # pragma: no cover - threadpoolctl is optional (scikit-learn brings it)
            _OPENBLAS.append(None)
    ctl = _OPENBLAS[0]
    return ctl.limit(limits=1) if ctl is not None else contextlib.nullcontext()


def _small_blas(n: int):  # noqa: ANN202 - a context manager
    """`_one_blas_thread` for problems of order <= 1024 (where waking OpenBLAS's threads, which the short
    `OPENBLAS_THREAD_TIMEOUT` puts to sleep, costs more than the second thread gains)."""
    import contextlib

    return _one_blas_thread() if n <= 1024 else contextlib.nullcontext()


def _eigh(H: Tensor, vectors: bool = True) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (ascending) and, with `vectors`, eigenvectors of the symmetric `H` (its mean with `H^T`).

    On CPU through scipy's LAPACK (divide and conquer, one thread): 2-4x faster than torch's on the
    few-hundred-wide projected problems here.
    """
    H = _sym(H)
    if H.device.type == "cpu" and H.dtype == torch.float64:
        try:
            from scipy.linalg import eigh
        except ImportError:  # pragma: no cover
            eigh = None
        if eigh is not None:
            with _one_blas_thread():
                if not vectors:
                    w = eigh(H.numpy(), eigvals_only=True, driver="evd", check_finite=False)
                    return torch.from_numpy(w), None
                w, v = eigh(H.numpy(), driver="evd", check_finite=False)
            return torch.from_numpy(w), torch.from_numpy(v)
    if not vectors:
        return torch.linalg.eigvalsh(H), None
    w, v = torch.linalg.eigh(H)
    return w, v


def _start_block(N: int, block: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    return torch.linalg.qr(torch.randn(N, block, generator=gen, dtype=dtype).to(device)).Q


def _ritz_converged(
    history: list[float], theta: Tensor, top: slice, tol: float, noise: float,
    residual: Callable[[], Tensor] | None, res_floor: float,
) -> bool:
    """Have the wanted Ritz pairs converged? Appends their energy to `history`.

    The Ritz energy must have stopped moving (geometric extrapolation of its change below `tol`, or a
    change at rounding level `noise`). With `residual` (fp64 products), also a residual certificate:
    the energy of `W` on the other side's vectors (`A x / sqrt(theta)`) exceeds theta by `|r|^2 / theta`,
    errors there being amplified by sigma_j / sigma_i; it must stay below `CERT_TOL` of the captured
    energy. (With fp32 products the residuals are noise-bound: `_certify` judges them in fp64 after.)
    """
    th = theta[top]
    history.append(float(th.sum()))
    if not _converged(history, tol, noise):
        return False
    if residual is None:
        return True
    R = residual()
    excess = float((R.pow(2).sum(0) / th.clamp_min(res_floor / th.numel() + 1e-300)).sum())
    return excess <= CERT_TOL * abs(history[-1]) + res_floor


def _krylov_width(block: int) -> int:
    """Columns of the Krylov basis at its largest: the Ritz vectors kept at a restart plus a cycle's blocks."""
    return (GRAM_KEEP + GRAM_DEPTH) * block


def _krylov(
    op: _Operator, block: int, rank: int, side: Side, tol: float, max_blocks: int, X0: Tensor | None = None
) -> tuple[Tensor, int, bool]:
    """Thick-restarted block Krylov: an orthonormal `N x block` basis whose Ritz vectors hold the wanted ones.

    The operator is `op.inv` (~`G^-1`) for the minor side and `G` for the principal side. A cycle adds
    `GRAM_DEPTH` blocks, the first one from the best `block` Ritz vectors, the others from the block
    before; a restart keeps the best `GRAM_KEEP * block` Ritz vectors (with their products and a
    diagonal projected matrix: no operator work), so the captured energy moves monotonically and
    little of the Krylov space is lost. The Rayleigh-Ritz problem (and `F Q`) is fp64 whatever the
    operator's precision: the eigenvalues of the projected `Q^T G Q` span cond(A)^2, which fp32 cannot
    resolve at the minor end even when the fp32 operator has already found the right subspace. The
    basis `Q` is fp32 on the minor side with a factored fp32 operator (its orthogonalization is half
    of a block's work; a loss of orthogonality of ~eps32 moves the Ritz values by ~eps32 relative, far
    below `GRAM_TOL`), fp64 otherwise. With a factor `F` (`G = F^T F`) the projection is
    `(F Q)^T (F Q)`; products with `G` itself are only formed when needed (the principal side's next block, the residual test of fp64 operators).
    Rayleigh-Ritz every `GRAM_CHECK` blocks and at the end of each cycle (where the restart needs it
    anyway); stops when `_ritz_converged`. Returns (fp64 basis, operator applications, converged).
    """
    f64 = torch.float64
    eps = torch.finfo(op.dtype).eps  # the precision of the products sets the noise floors
    exact = eps < 1e-10
    factored = op.F is not None and op.Ft is not None
    need_g = side == "principal" or exact or not factored
    lam_max = op.lambda_max()
    N, width = op.N, _krylov_width(block)
    keep = GRAM_KEEP * block
    X = _start_block(N, block, f64, op.device) if X0 is None else torch.linalg.qr(X0.to(f64)).Q
    # Minor side, factored fp32 operator (`recur`: `F` times a new block comes from the solve that made it):
    # the basis in fp32 (its ~eps32 loss of orthogonality moves the Ritz values by as little), `F Q` and
    # the Rayleigh-Ritz in fp64 (they carry the spread of cond(A)^2).
    recur = side == "minor" and not need_g and op.inv_f is not None
    bdt = op.dtype if recur else f64
    Q = torch.empty(N, width, dtype=bdt, device=op.device)
    FQ = torch.empty(N, width, dtype=f64, device=op.device) if factored else None
    GQ = torch.empty(N, width, dtype=f64, device=op.device) if need_g else None
    H = torch.empty(width, width, dtype=f64, device=op.device)

    def add(Xj: Tensor, k: int, FX64: Tensor | None = None) -> None:
        """Append the block `Xj` at column `k`: its products (`F Xj` given or computed) and its part of `H`."""
        n = Xj.shape[1]
        Q[:, k:k + n] = Xj
        if factored:
            assert FQ is not None and op.F is not None and op.Ft is not None
            if FX64 is None:
                FX = op.F(Xj.to(op.dtype))
                FX64 = FX.to(f64)
                if GQ is not None:
                    GQ[:, k:k + n] = op.Ft(FX).to(f64)
            FQ[:, k:k + n] = FX64
            C = FQ[:, :k + n].T @ FQ[:, k:k + n]
        else:
            assert GQ is not None
            GQ[:, k:k + n] = op.G(Xj.to(op.dtype)).to(f64)
            C = Q[:, :k + n].T @ GQ[:, k:k + n]
        H[:k + n, k:k + n] = C
        H[k:k + n, :k] = C[:k].T

    def inv(Y: Tensor) -> Tensor:
        assert op.inv is not None
        return op.inv(Y.to(op.dtype)).to(f64)

    if factored:  # |F x|^2 is good to ~eps sigma_max sigma_i, relative ~eps cond(A) / sqrt(N) (measured:
        def noise(th: Tensor) -> float:  # rounding errors of N-term sums average out)
            return eps * lam_max**0.5 * float(th.clamp_min(0).sqrt().sum()) / N**0.5
    else:  # x^T G x is good to ~eps lambda_max
        def noise(th: Tensor) -> float:
            return 8 * eps * lam_max * th.numel()
    res_floor = rank * 64 * eps**2 * lam_max
    top = slice(0, rank) if side == "minor" else slice(-rank, None)
    history: list[float] = []

    def converged(k: int, theta: Tensor) -> bool:
        def residual() -> Tensor:
            assert GQ is not None
            th, Zk = _eigh(H[:k, :k])
            assert Zk is not None
            Zt = Zk[:, top]
            return GQ[:, :k] @ Zt - (Q[:, :k] @ Zt) * th[top]

        return _ritz_converged(history, theta, top, tol, noise(theta[top]), residual if exact else None, res_floor)

    recurred = 0  # blocks whose `F` product came from the solve itself
    add(X, 0)
    k, src, applied = block, (0, block), 0  # src: the columns the next block comes from
    while True:
        stop = done = False
        for j in range(GRAM_DEPTH):
            a, b = src
            FY = None
            if side == "principal":
                Y = GQ[:, a:b]  # type: ignore[index]
            elif recur:
                assert op.inv_f is not None
                Y, FY32 = op.inv_f(Q[:, a:b])
                FY = FY32.to(f64)
            else:
                Y = inv(Q[:, a:b])
            ext = _extend(Q[:, :k], Y)
            applied += 1
            if ext is None:  # invariant subspace: its Ritz pairs are exact
                stop = done = True
                break
            Xj, C, R = ext
            FX = None
            if FY is not None and R is not None:
                # F Xj = (F Y - F Q C) R^-1 with F Y a by-product of the solve: no product with F. Its
                # rounding error is that of F Y, ~|F Y| / |F Y - F Q C| times the direct product's: used
                # where that cancellation stays below `F_RECUR_CANCEL`.
                P = FY - FQ[:, :k] @ C.to(f64)  # type: ignore[index]
                kept = torch.linalg.vector_norm(P, dim=0) / torch.linalg.vector_norm(FY, dim=0).clamp_min(1e-300)
                if float(kept.min()) * F_RECUR_CANCEL >= 1:
                    FX = torch.linalg.solve_triangular(R.to(f64), P, upper=True, left=False)
                    recurred += 1
            add(Xj, k, FX)
            src, k = (k, k + Xj.shape[1]), k + Xj.shape[1]
            stop = applied >= max_blocks
            if stop or j == GRAM_DEPTH - 1:
                break  # the Rayleigh-Ritz below checks
            if (j + 1) % GRAM_CHECK == 0:
                done = stop = converged(k, _eigh(H[:k, :k], vectors=False)[0])  # ascending
                if stop:
                    break
        theta, Z = _eigh(H[:k, :k])
        assert Z is not None
        if not done and Xj is not None:
            done = converged(k, theta)
            stop = stop or done
        if stop:
            log.debug("krylov (%s): %d block applications (block %d, rank %d), converged=%s",
                      op.name, applied, block, rank, done)
            log.debug("krylov (%s): F products from the solves for %d of %d blocks", op.name, recurred, applied)
            return Q[:, :k].to(f64) @ (Z[:, :block] if side == "minor" else Z[:, -block:]), applied, done
        # Thick restart: the best `keep` Ritz vectors (best first), their products, a diagonal `H`.
        kk = min(keep, k)
        Zk = Z[:, :kk] if side == "minor" else Z[:, -kk:].flip(1)
        Q[:, :kk] = Q[:, :k] @ Zk.to(bdt)
        if FQ is not None:
            FQ[:, :kk] = FQ[:, :k] @ Zk
        if GQ is not None:
            GQ[:, :kk] = GQ[:, :k] @ Zk
        H[:kk, :kk] = torch.diag(theta[:kk] if side == "minor" else theta[-kk:].flip(0))
        k, src = kk, (0, min(block, kk))


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
    # Small matrices (or a Krylov space that would span much of the space): dense eigh of G is cheaper.
    if N <= 256 or 2 * _krylov_width(block) > N or (side == "minor" and L is None):
        info["path"] = "dense64"
        _, evecs = _eigh(G)  # ascending
        assert evecs is not None
        return evecs[:, :block] if side == "minor" else evecs[:, -block:]
    X, applied, ok = _krylov(_chol_operator(G, L, "chol64"), block, rank, side, tol, GRAM_MAX_BLOCKS, X0)
    info.update(path="krylov64", blocks=info.get("blocks", 0) + applied)
    if not ok:
        log.warning(
            "gram solver: no convergence to %.0e after %d block applications on a %s matrix; using the best "
            "subspace found. Set adapter.svd_solver: full for an exact SVD.", tol, applied, tuple(A.shape),
        )
    return X


def _gram(W: Tensor, rank: int, side: Side, tol: float = GRAM_TOL, info: dict | None = None) -> Triplets:
    """Triplets through the Gram matrix of the shorter side (see the module docstring)."""
    info = {} if info is None else info
    m, n = W.shape
    wide = m < n
    W32 = W.detach().to(torch.float32)
    A32 = W32.T if wide else W32  # tall (M x N, M >= N): we want its right singular vectors
    A = _Exact(A32)  # fp64 products with W: the certificate's and the triplets'
    N = A.shape[1]
    block = min(N, rank + max(GRAM_EXTRA_MIN, int(rank * GRAM_EXTRA)))
    X = AX = X0 = None
    if N > 256 and 2 * _krylov_width(block) <= N:
        op = _fast_operator(A32, side)
        if op is not None:
            X, applied, converged = _krylov(op, block, rank, side, tol, FAST_MAX_BLOCKS)
            info.update(path=op.name, blocks=applied)
            if side == "minor" and not converged:  # a flat minor end: the exact path continues from here
                X0, X = X, None
                info["fallback"] = f"{op.name} did not converge"
            elif side == "minor":
                # The fp32 solves leave noise along large-sigma directions: cheap in energy on the Gram side
                # but amplified by sigma_j / sigma_i on the other (U = W v / sigma). An inverse-iteration
                # step on the block damps it by lambda_i / lambda_j, and its Rayleigh-Ritz in fp64 (exact
                # products with W) fixes what the fp32 operator mixed; the certificate judges the result.
                # First with the fp32 solve (it re-adds noise at ~eps32 cond^2, usually far below the
                # certificate's bar), then, if that fails, with fp64-accurate solves (iterative
                # refinement) while the excess keeps falling (near-cut mixing decays more slowly).
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
                if passed:
                    X, AX = X[:, :rank], AX[:, :rank]
                else:  # (AX too: the exact path's subspace is a different one)
                    X = AX = None
                    info["fallback"] = op.name
        else:
            info["fallback"] = "no fp32 factorization"
    if X is None:
        X = _exact_gram(A.full, rank, side, block, tol, info, X0)
    # Rayleigh-Ritz on W itself: singular values from W (not squared), U orthonormal by construction.
    Uy, Sy, Vyh = torch.linalg.svd(AX if AX is not None else A.mm(X), full_matrices=False)
    sl = slice(Sy.numel() - rank, None) if side == "minor" else slice(0, rank)
    Ua, S, Va = Uy[:, sl], Sy[sl], X @ Vyh[sl].T
    U, Vh = (Va, Ua.T) if wide else (Ua, Va.T)
    f32 = torch.float32
    return Triplets(U.to(f32).contiguous(), S.to(f32).contiguous(), Vh.to(f32).contiguous(), None, "gram")


_LOWRANK_MINOR = (
    "svd_solver 'lowrank' finds the largest singular triplets only (PiSSA); MiLoRA needs the smallest: "
    "set adapter.svd_solver to 'auto', 'gram' or 'full'"
)


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


def resolve_solver(solver: str, side: Side, shape: tuple[int, int], rank: int) -> str:
    """The concrete solver `auto` stands for, for this side, shape and rank."""
    if solver not in SOLVERS:
        raise InvalidInput(f"unknown svd_solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver == "lowrank" and side == "minor":
        raise InvalidInput(_LOWRANK_MINOR)
    if solver != "auto":
        return solver
    k = min(shape)
    if k < AUTO_MIN_SIDE or rank > AUTO_MAX_RANK_SHARE * k:
        return "full"
    return "gram" if side == "minor" else "lowrank"


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


def captured_energy(W: Tensor, Vh: Tensor) -> float:
    """`||W V||_F^2` in fp64: the energy of `W` on the row space of `Vh` (benchmarks and tests)."""
    return float((W.to(torch.float64) @ Vh.to(torch.float64).T).pow(2).sum())


def factors(t: Triplets, scale: float) -> tuple[Tensor, Tensor]:
    """LoRA factors (A, B) in fp32 from triplets, so that `scale * B @ A = U diag(S) Vh`."""
    root = torch.sqrt(t.S.to(torch.float64) / scale)
    B = (t.U.to(torch.float64) * root).to(torch.float32)
    A = (root[:, None] * t.Vh.to(torch.float64)).to(torch.float32)
    return A.contiguous(), B.contiguous()


# ----------------------------------------------------------------------------- whole-model init


def _dist_info() -> tuple[int, int]:
    """(rank, world size) when `torch.distributed` is initialised with more than one process, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def compute_factors(
    weights: Mapping[str, Tensor],
    rank: int,
    side: Side,
    scale: float,
    solver: str = "auto",
    cache: TripletCache | None = None,
    progress: bool = True,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Triplets], InitReport]:
    """Factors (A, B) for every named 2-D weight (`out x in`), via the cache when one is given.

    Under `torch.distributed` with a cache shared by the ranks (a shared directory or S3), rank `i`
    decomposes the matrices with index `% world_size == i`, stores them, waits at a barrier, then reads
    the others' share from the cache: N ranks take ~1/N of the time and end with identical factors.
    """
    from tqdm.auto import tqdm

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
        name, W = items[i]
        t0 = time.perf_counter()
        concrete = resolve_solver(solver, side, tuple(W.shape), rank)
        compute = (lambda W=W, concrete=concrete: solve(W, rank, side, concrete))  # noqa: E731
        if cache is None:
            t, key, hit = compute(), None, False
        else:
            t, key, hit = cache.get_or_compute(W, rank, side, concrete, compute)
        if t.count != rank:
            t = t.take(rank, side)
        dt = time.perf_counter() - t0
        done[i] = (t, MatrixReport(name, tuple(W.shape), dt, hit, key, t.solver))
        if hit:
            log.debug("%s %s: cache hit in %.3fs", name, tuple(W.shape), dt)
        else:
            if expect_hit:
                log.warning("%s: not in the cache after the barrier (is svd.cache shared by all ranks?): "
                            "decomposed here", name)
            log.info("%s %s: %s solver %.2fs", name, tuple(W.shape), t.solver, dt)
        bar.update(1)

    for i in mine:
        one(i, expect_hit=False)
    if rest:
        import torch.distributed as dist

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
