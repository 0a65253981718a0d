"""Thick-restarted block Krylov iteration for the wanted eigenvectors of `G = A^T A` (smallest on the
minor side, through `G^-1`; largest on the principal side). Design: docs/svd_solver.md."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from milora.core.svd.linalg import _eigh
from milora.core.svd.operators import _Operator
from milora.core.svd.types import SEED, Side

log = logging.getLogger(__name__)

GRAM_DEPTH = 5  # Krylov blocks per restart cycle
GRAM_KEEP = 2  # Ritz vectors kept at a restart, in blocks
GRAM_CHECK = 1  # Rayleigh-Ritz (convergence test) every this many blocks, and at the end of each cycle
RATE_WINDOW = 4  # convergence rate: geometric mean of the last this many step ratios (~a restart cycle)
F_RECUR_CANCEL = 10.0  # largest cancellation |F Y| / |F Y - F Q C| at which `F X` comes from the solve


def _krylov_width(block: int) -> int:
    """Columns of the Krylov basis at its largest: the Ritz vectors kept at a restart plus a cycle's blocks."""
    return (GRAM_KEEP + GRAM_DEPTH) * block


def _start_block(N: int, block: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    return torch.linalg.qr(torch.randn(N, block, generator=gen, dtype=dtype).to(device)).Q


def _extend(Q: Tensor, Y: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """An orthonormal basis `X` of `Y` orthogonal to the orthonormal `Q` (block CGS2, then Cholesky QR
    twice), as (`X`, `C`, `R`) with `X = (Y - Q C) R^-1` (`R` upper triangular; None on the Householder
    path, where `X` is not tracked that way); None if `Y` is in span(Q).

    Cholesky QR (two Gram matrices and two triangular solves: a few large BLAS-3 calls, where Householder
    QR is many small ones) is orthonormal to rounding after its second pass when cond(Y) is below ~1e6;
    otherwise (or when most of `Y` was in span(Q)) Householder QR and a third pass against `Q`.
    """
    # Cholesky QR's limits, ~sqrt(eps)-scaled: fp64, or an fp32 basis (see `_Krylov`)
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
    look converged early. Nor is a rate taken from fewer than a full window: on a near-degenerate
    small end the first steps (entering the cluster) gain much and the next ones little, and a rate from
    two steps stopped the iteration at 3 blocks with 1e-2 excess (measured: docs/benchmarks.md, "every
    spectrum"); a change at rounding level still ends it at once.
    """
    if len(history) < 3:
        return False
    h = history[-(RATE_WINDOW + 2):]
    d = [abs(h[i] - h[i + 1]) for i in range(len(h) - 1)]
    if d[-1] <= noise:
        return True
    if len(history) < RATE_WINDOW + 2:
        return False
    rho = min((d[-1] / d[0]) ** (1 / (len(d) - 1)) if d[0] > 0 else 1.0, 0.99)
    return d[-1] * rho / (1.0 - rho) <= tol * abs(history[-1])


class _Krylov:
    """One thick-restarted block Krylov run: the basis `Q`, its products and the projected matrix `H`.

    The operator is `op.inv` (~`G^-1`) on the minor side and `G` on the principal side. A cycle adds
    `GRAM_DEPTH` blocks (the first from the best Ritz vectors, the others from the block before); a
    restart keeps the best `GRAM_KEEP` blocks of Ritz vectors, with their products and a diagonal `H`
    (no operator work). `H` and `F Q` are fp64 whatever the operator's precision (the projected
    eigenvalues span cond(A)^2); with a factor `F` (`G = F^T F`), `H = (F Q)^T (F Q)`. The basis is
    fp32 on the minor side with a factored fp32 operator (`recur`: `F` times a new block then comes
    from the solve that made it), fp64 otherwise. See docs/svd_solver.md.
    """

    def __init__(
        self, op: _Operator, block: int, rank: int, side: Side, tol: float, cert_tol: float,
        X0: Tensor | None = None,
    ) -> None:
        f64 = torch.float64
        self.op, self.block, self.rank, self.side = op, block, rank, side
        self.tol, self.cert_tol = tol, cert_tol
        self.eps = torch.finfo(op.dtype).eps  # the precision of the products sets the noise floors
        self.exact = self.eps < 1e-10  # fp64 products: the convergence test adds a residual certificate
        self.factored = op.F is not None and op.Ft is not None
        need_g = side == "principal" or self.exact or not self.factored
        self.lam_max = op.lambda_max()
        N, width = op.N, _krylov_width(block)
        X = _start_block(N, block, f64, op.device) if X0 is None else torch.linalg.qr(X0.to(f64)).Q
        self.recur = side == "minor" and not need_g and op.inv_f is not None
        self.bdt = op.dtype if self.recur else f64  # the basis' dtype
        self.Q = torch.empty(N, width, dtype=self.bdt, device=op.device)
        self.FQ = torch.empty(N, width, dtype=f64, device=op.device) if self.factored else None
        self.GQ = torch.empty(N, width, dtype=f64, device=op.device) if need_g else None
        self.H = torch.empty(width, width, dtype=f64, device=op.device)
        self.res_floor = rank * 64 * self.eps**2 * self.lam_max
        self.top = slice(0, rank) if side == "minor" else slice(-rank, None)  # the wanted Ritz values
        self.history: list[float] = []  # their energy at each convergence test
        self.k = 0  # columns of the basis in use
        self.applied = 0  # operator applications
        self.recurred = 0  # blocks whose `F` product came from the solve itself
        self.add(X)
        self.src = (0, block)  # the columns the next block comes from

    def run(self, max_blocks: int) -> tuple[Tensor, int, bool]:
        """Cycles until converged, exhausted or `max_blocks` operator applications.

        Returns (fp64 `N x block` basis of the best Ritz vectors, operator applications, converged).
        """
        while True:
            stop, done = self.cycle(max_blocks)
            theta, Z = self.rayleigh_ritz()
            if not done:
                done = self.converged(theta)
                stop = stop or done
            if stop:
                log.debug("krylov (%s): %d block applications (block %d, rank %d), converged=%s",
                          self.op.name, self.applied, self.block, self.rank, done)
                log.debug("krylov (%s): F products from the solves for %d of %d blocks",
                          self.op.name, self.recurred, self.applied)
                return self.ritz_basis(Z), self.applied, done
            self.restart(theta, Z)

    def cycle(self, max_blocks: int) -> tuple[bool, bool]:
        """Up to `GRAM_DEPTH` new blocks, testing convergence every `GRAM_CHECK` of them but the last (the
        Rayleigh-Ritz at the end of the cycle tests that one). Returns (stop, converged)."""
        for j in range(GRAM_DEPTH):
            if not self.step():
                return True, True  # an invariant subspace: its Ritz pairs are exact
            stop = self.applied >= max_blocks
            if stop or j == GRAM_DEPTH - 1:
                return stop, False
            if (j + 1) % GRAM_CHECK == 0 and self.converged(self.ritz_values()):
                return True, True
        return False, False

    def step(self) -> bool:
        """Apply the operator to the newest block, append its orthonormalised part; False if none is new."""
        a, b = self.src
        Y, FY = self.apply(a, b)
        ext = _extend(self.Q[:, :self.k], Y)
        self.applied += 1
        if ext is None:
            return False
        Xj, C, R = ext
        k = self.k
        self.add(Xj, self.recurred_product(FY, C, R))
        self.src = (k, self.k)
        return True

    def apply(self, a: int, b: int) -> tuple[Tensor, Tensor | None]:
        """The operator on the basis columns `a:b`, and with `recur`, `F` times the result (a by-product)."""
        op, f64 = self.op, torch.float64
        if self.side == "principal":
            assert self.GQ is not None
            return self.GQ[:, a:b], None
        if self.recur:
            assert op.inv_f is not None
            Y, FY32 = op.inv_f(self.Q[:, a:b])
            return Y, FY32.to(f64)
        assert op.inv is not None
        return op.inv(self.Q[:, a:b].to(op.dtype)).to(f64), None

    def recurred_product(self, FY: Tensor | None, C: Tensor, R: Tensor | None) -> Tensor | None:
        """`F Xj = (F Y - F Q C) R^-1` from `F Y` (a by-product of the solve), for `Xj = (Y - Q C) R^-1`.

        Its rounding error is that of `F Y`, ~|F Y| / |F Y - F Q C| times the direct product's: used where
        that cancellation stays below `F_RECUR_CANCEL`, else None (the product is computed).
        """
        if FY is None or R is None:
            return None
        f64 = torch.float64
        assert self.FQ is not None
        P = FY - self.FQ[:, :self.k] @ C.to(f64)
        kept = torch.linalg.vector_norm(P, dim=0) / torch.linalg.vector_norm(FY, dim=0).clamp_min(1e-300)
        if float(kept.min()) * F_RECUR_CANCEL >= 1:
            self.recurred += 1
            return torch.linalg.solve_triangular(R.to(f64), P, upper=True, left=False)
        return None

    def add(self, Xj: Tensor, FX64: Tensor | None = None) -> None:
        """Append the block `Xj`: its products (`F Xj` given or computed) and its part of `H`."""
        op, f64, k, n = self.op, torch.float64, self.k, Xj.shape[1]
        self.Q[:, k:k + n] = Xj
        if self.factored:
            assert self.FQ is not None and op.F is not None and op.Ft is not None
            if FX64 is None:
                FX = op.F(Xj.to(op.dtype))
                FX64 = FX.to(f64)
                if self.GQ is not None:
                    self.GQ[:, k:k + n] = op.Ft(FX).to(f64)
            self.FQ[:, k:k + n] = FX64
            C = self.FQ[:, :k + n].T @ self.FQ[:, k:k + n]
        else:
            assert self.GQ is not None
            self.GQ[:, k:k + n] = op.G(Xj.to(op.dtype)).to(f64)
            C = self.Q[:, :k + n].T @ self.GQ[:, k:k + n]
        self.H[:k + n, k:k + n] = C
        self.H[k:k + n, :k] = C[:k].T
        self.k = k + n

    def ritz_values(self) -> Tensor:
        """The Ritz values (ascending) of the basis."""
        return _eigh(self.H[:self.k, :self.k], vectors=False)[0]

    def rayleigh_ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (ascending) and their vectors in the basis' coordinates."""
        theta, Z = _eigh(self.H[:self.k, :self.k])
        assert Z is not None
        return theta, Z

    def restart(self, theta: Tensor, Z: Tensor) -> None:
        """Thick restart: the best `GRAM_KEEP` blocks of Ritz vectors (best first), their products and a
        diagonal `H`."""
        k, minor = self.k, self.side == "minor"
        kk = min(GRAM_KEEP * self.block, k)
        Zk = Z[:, :kk] if minor else Z[:, -kk:].flip(1)
        self.Q[:, :kk] = self.Q[:, :k] @ Zk.to(self.bdt)
        if self.FQ is not None:
            self.FQ[:, :kk] = self.FQ[:, :k] @ Zk
        if self.GQ is not None:
            self.GQ[:, :kk] = self.GQ[:, :k] @ Zk
        self.H[:kk, :kk] = torch.diag(theta[:kk] if minor else theta[-kk:].flip(0))
        self.k, self.src = kk, (0, min(self.block, kk))

    def ritz_basis(self, Z: Tensor) -> Tensor:
        """The best `block` Ritz vectors, in fp64."""
        Zb = Z[:, :self.block] if self.side == "minor" else Z[:, -self.block:]
        return self.Q[:, :self.k].to(torch.float64) @ Zb

    def converged(self, theta: Tensor) -> bool:
        """Have the wanted Ritz pairs converged? Appends their energy to `history`.

        The Ritz energy must have stopped moving (geometric extrapolation of its change below `tol`, or a
        change at rounding level). With fp64 products, also a residual certificate: the energy of `W` on
        the other side's vectors (`A x / sqrt(theta)`) exceeds theta by `|r|^2 / theta`, errors there being
        amplified by sigma_j / sigma_i; it must stay below `cert_tol` of the captured energy. (With fp32
        products the residuals are noise-bound: `_certify` judges them in fp64 after.)
        """
        th = theta[self.top]
        self.history.append(float(th.sum()))
        if not _converged(self.history, self.tol, self.noise(th)):
            return False
        if not self.exact:
            return True
        R = self.residual()
        excess = float((R.pow(2).sum(0) / th.clamp_min(self.res_floor / th.numel() + 1e-300)).sum())
        return excess <= self.cert_tol * abs(self.history[-1]) + self.res_floor

    def noise(self, th: Tensor) -> float:
        """The rounding level of the wanted Ritz values' sum."""
        eps, lam_max = self.eps, self.lam_max
        if self.factored:  # |F x|^2 is good to ~eps sigma_max sigma_i, relative ~eps cond(A) / sqrt(N)
            # (measured: rounding errors of N-term sums average out)
            return eps * lam_max**0.5 * float(th.clamp_min(0).sqrt().sum()) / self.op.N**0.5
        return 8 * eps * lam_max * th.numel()  # x^T G x is good to ~eps lambda_max

    def residual(self) -> Tensor:
        """`G x - theta x` for the wanted Ritz pairs (fp64 products)."""
        k, top = self.k, self.top
        assert self.GQ is not None
        th, Zk = _eigh(self.H[:k, :k])
        assert Zk is not None
        Zt = Zk[:, top]
        return self.GQ[:, :k] @ Zt - (self.Q[:, :k] @ Zt) * th[top]


def _krylov(
    op: _Operator, block: int, rank: int, side: Side, tol: float, cert_tol: float, max_blocks: int,
    X0: Tensor | None = None,
) -> tuple[Tensor, int, bool]:
    """An orthonormal fp64 `N x block` basis whose Ritz vectors hold the wanted ones (from `X0` when
    given), operator applications, converged. See `_Krylov`."""
    return _Krylov(op, block, rank, side, tol, cert_tol, X0).run(max_blocks)
