"""Dense linear algebra for the `gram` solver: syrk, Cholesky, eigh (through scipy's BLAS/LAPACK on CPU,
which beats torch's on these shapes), BLAS thread control, and fp64 products with an fp32 matrix.

`OPENBLAS_THREAD_TIMEOUT` (short spins of scipy's idle OpenBLAS threads) is set by `milora/__init__.py`,
so that it is in the environment before anything loads scipy's OpenBLAS; see there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@functools.cache
def _scipy_linalg() -> ModuleType | None:
    """`scipy.linalg`, or None without scipy. Imported on first use: it takes ~0.3 s, and `milora cache`
    imports this package without solving anything."""
    try:
        import scipy.linalg
    except ImportError:  # pragma: no cover - scipy ships with the pipeline's dependencies
        return None
    return scipy.linalg


@functools.cache
def _openblas_controller():  # noqa: ANN202 - a threadpoolctl controller, or None
    """threadpoolctl's handle on scipy's OpenBLAS, made on first use: after scipy has loaded OpenBLAS,
    which the controller looks for among the loaded libraries."""
    try:
        from threadpoolctl import ThreadpoolController

        return ThreadpoolController().select(internal_api="openblas")
    except Exception:  # pragma: no cover - threadpoolctl is optional (scikit-learn brings it)
        return None


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Context: scipy's OpenBLAS on one thread, for its small calls.

    After a multithreaded call, OpenBLAS's idle threads spin for ~0.1 s, taking a core from the torch
    (MKL) work that follows: ~2x slower triangular solves after each small eigh. Small problems lose
    nothing on one thread. A no-op without threadpoolctl.
    """
    ctl = _openblas_controller()
    return ctl.limit(limits=1) if ctl is not None else contextlib.nullcontext()


def _small_blas(n: int) -> contextlib.AbstractContextManager:
    """`_one_blas_thread` for problems of order <= 1024 (where waking OpenBLAS's threads, which the short
    `OPENBLAS_THREAD_TIMEOUT` puts to sleep, costs more than the second thread gains)."""
    return _one_blas_thread() if n <= 1024 else contextlib.nullcontext()


def _syrk(A: Tensor, full: bool = True) -> Tensor:
    """`A^T A` for a tall `A`: BLAS syrk on CPU (half a matmul's work).

    `full=False` skips mirroring the lower triangle into the upper one (all a Cholesky needs).
    """
    sp = _scipy_linalg() if A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64) else None
    if sp is None:
        return A.T @ A
    syrk = sp.blas.ssyrk if A.dtype == torch.float32 else sp.blas.dsyrk
    a = A.numpy()
    # syrk wants a column-major operand: `a.T` of a row-major `a` is one, without a copy.
    with _small_blas(A.shape[1]):
        c = syrk(1.0, a.T, trans=0, lower=1) if a.flags.c_contiguous else syrk(1.0, a, trans=1, lower=1)
    G = torch.from_numpy(c)  # column-major, lower triangle filled
    return torch.tril(G) + torch.tril(G, -1).T if full else G


def _potrf(G: Tensor, overwrite: bool = False) -> Tensor | None:
    """Lower Cholesky factor of the SPD `G` (only its lower triangle is read), or None if not (numerically) SPD.

    `overwrite`: factor in `G`'s own storage (LAPACK's in-place potrf), which `G` then no longer holds,
    whether or not it succeeded: no second matrix of its size (for N = 4096, 64 MB of fresh memory,
    which on this VM costs more to fault in than the copy itself).
    """
    sp = _scipy_linalg() if G.device.type == "cpu" else None
    if sp is not None:  # OpenBLAS potrf is ~2x faster than torch's here
        potrf = sp.lapack.spotrf if G.dtype == torch.float32 else sp.lapack.dpotrf
        g = G.numpy()
        with _small_blas(G.shape[0]):
            if g.flags.f_contiguous:
                c, info = potrf(g, lower=1, clean=1, overwrite_a=int(overwrite))
                return torch.from_numpy(c) if info == 0 else None
            # row-major: its transpose is column-major, and its upper triangle our lower one
            c, info = potrf(g.T, lower=0, clean=1, overwrite_a=int(overwrite))
        return torch.from_numpy(c).T if info == 0 else None
    L, info = torch.linalg.cholesky_ex(G)
    return L if int(info) == 0 else None


def _cholesky(G: Tensor, max_shift: float) -> Tensor | None:
    """Cholesky factor of `G + shift I` for the smallest shift in `[0, max_shift * ||G||]` that works.

    A shift keeps the eigenvectors, so inverse iteration still finds the minor subspace (the spectrum
    below the shift is only flattened); None when even the largest shift fails.
    """
    L = _potrf(G)
    if L is not None:
        return L
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


def _sym(H: Tensor) -> Tensor:
    return (H + H.T) / 2


def _eigh(H: Tensor, vectors: bool = True) -> tuple[Tensor, Tensor | None]:
    """Eigenvalues (ascending) and, with `vectors`, eigenvectors of the symmetric `H` (its mean with `H^T`).

    On CPU through scipy's LAPACK (divide and conquer, one thread): 2-4x faster than torch's on the
    few-hundred-wide projected problems here.
    """
    H = _sym(H)
    sp = _scipy_linalg() if H.device.type == "cpu" and H.dtype == torch.float64 else None
    if sp is not None:
        with _one_blas_thread():
            if not vectors:
                w = sp.eigh(H.numpy(), eigvals_only=True, driver="evd", check_finite=False)
                return torch.from_numpy(w), None
            w, v = sp.eigh(H.numpy(), driver="evd", check_finite=False)
        return torch.from_numpy(w), torch.from_numpy(v)
    if not vectors:
        return torch.linalg.eigvalsh(H), None
    w, v = torch.linalg.eigh(H)
    return w, v


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

    def _blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, those rows of `S` in fp64), one block at a time: a block is valid until the next."""
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
