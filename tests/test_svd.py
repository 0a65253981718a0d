"""SVD engine: every solver against fp64 references on random and structured matrices, both sides."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
import torch

import milora
from milora.core import svd
from milora.core.adapter import AdapterConfig, current_factors
from milora.core.svd import captured_energy, compute_factors, factors, resolve_solver, solve
from milora.core.svd.linalg import _cholesky, _Exact, _syrk

F64 = torch.float64
EXCESS = 1e-3  # the bar of the issue: relative excess of the captured minor energy vs the fp64 reference


def orthogonal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64)).Q


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`U diag(s) V^T` with random orthonormal U, V, rounded to fp32."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    return ((orthogonal(m, k, g) * s.to(F64)) @ orthogonal(n, k, g).T).float()


def trained_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Power-law spectrum plus a Gaussian noise floor (like trained weights)."""
    k = min(m, n)
    s = torch.arange(1, k + 1, dtype=F64) ** -0.7
    g = torch.Generator().manual_seed(seed + 1)
    return with_spectrum(m, n, s, seed) + 0.3 * float(s[k // 2]) * torch.randn(m, n, generator=g) / math.sqrt(max(m, n))


def reference(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.to(F64))


def check(W: torch.Tensor, t: svd.Triplets, rank: int, side: str, excess: float = EXCESS) -> None:
    """Shapes, orthonormality, `W V = U S`, ordering, and the captured energy on both sides."""
    m, n = W.shape
    assert t.U.shape == (m, rank) and t.S.shape == (rank,) and t.Vh.shape == (rank, n)
    assert t.U.dtype == t.S.dtype == t.Vh.dtype and t.U.is_contiguous() and t.Vh.is_contiguous()
    U, S, Vh, W64 = t.U.to(F64), t.S.to(F64), t.Vh.to(F64), W.to(F64)
    eye = torch.eye(rank, dtype=F64)
    assert (U.T @ U - eye).abs().max() < 1e-5
    assert (Vh @ Vh.T - eye).abs().max() < 1e-5
    assert bool((S[:-1] >= S[1:]).all()), "singular values must be descending"
    ref = reference(W)
    norm = float(ref[0])
    want = ref[-rank:] if side == "minor" else ref[:rank]
    assert torch.allclose(S, want, rtol=1e-3, atol=1e-5 * norm), (S, want)
    # the two sides agree: the side recovered from the Gram side's vectors satisfies its relation to
    # rounding (W v = sigma u, or W^T u = sigma v for wide W); the other one to the energy tolerance
    right = (W64 @ Vh.T - U * S).norm()
    left = (W64.T @ U - Vh.T * S).norm()
    assert min(right, left) <= 1e-5 * norm * math.sqrt(rank), (right, left)
    assert max(right, left) <= 0.05 * S.norm() + 1e-5 * norm, (right, left)
    exact = float(want.pow(2).sum())
    floor = 1e-9 * norm**2 * rank  # rank-deficient matrices: the minor energy is ~0
    for got in (captured_energy(W, t.Vh), float((W64.T @ U).pow(2).sum())):
        if side == "minor":
            assert got - exact <= excess * exact + floor, (got, exact)
        else:
            assert exact - got <= excess * exact + floor, (got, exact)


SHAPES = [(320, 320), (500, 300), (300, 500)]  # square (LU route), tall and wide (fp32 Gram route)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["gaussian", "trained"])
@pytest.mark.parametrize("rank", [4, 16])
def test_gram_minor_matches_fp64_reference(shape, kind, rank):
    g = torch.Generator().manual_seed(rank)
    W = torch.randn(*shape, generator=g) if kind == "gaussian" else trained_like(*shape, seed=rank)
    info: dict = {}
    t = solve(W, rank, "minor", "gram", info=info)
    check(W, t, rank, "minor")
    assert info["path"] in {"lu32", "chol32", "qr32", "krylov64", "dense64"}
    assert t.solver == "gram" and t.spectrum is None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("solver", ["full", "full64", "auto"])
def test_exact_solvers_both_sides(shape, solver):
    W = trained_like(*shape, seed=3)
    for side in ("minor", "principal"):
        t = solve(W, 8, side, solver)
        check(W, t, 8, side, excess=1e-5)
    if solver != "auto":
        assert t.spectrum is not None and torch.allclose(t.spectrum.to(F64), reference(W), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("solver", ["lowrank", "gram"])
def test_principal_solvers(shape, solver):
    W = trained_like(*shape, seed=5)
    check(W, solve(W, 12, "principal", solver), 12, "principal")


def test_fast_route_paths_are_taken():
    """Square matrices use the fp32 LU of W; well-conditioned rectangular ones the Cholesky factor of the fp32 Gram
    matrix (ill-conditioned ones: the next test); all certified in fp64."""
    for shape, path in (((320, 320), "lu32"), ((500, 300), "chol32"), ((300, 500), "chol32")):
        info: dict = {}
        solve(trained_like(*shape), 8, "minor", "gram", info=info)
        assert info["path"] == path and info["certified_excess"] <= svd.GRAM_TOL, info


@pytest.mark.parametrize("orientation", ["tall", "transposed wide"])
def test_exact_products_match_fp64_in_blocks(monkeypatch, orientation):
    """`_Exact`'s blocked fp64 products (rows of `A`, or of a wide row-major `W` when `A = W^T`) equal
    products with an fp64 copy, blocks of uneven size included."""
    monkeypatch.setattr(_Exact, "BLOCK", 7 * 300)  # blocks of 7 rows of 300 (tall) or 3 of 700 (wide)
    g = torch.Generator().manual_seed(3)
    A32 = torch.randn(700, 300, generator=g) if orientation == "tall" else torch.randn(300, 700, generator=g).T
    A = _Exact(A32)
    assert A.transposed == (orientation != "tall")
    A64 = A32.to(F64)
    Y, Z = torch.randn(300, 5, generator=g, dtype=F64), torch.randn(700, 4, generator=g, dtype=F64)
    AY, GY = A.gram(Y)
    for got, want in ((A.mm(Y), A64 @ Y), (A.tmm(Z), A64.T @ Z), (AY, A64 @ Y), (GY, A64.T @ (A64 @ Y))):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-10)


def test_a_singular_gram_matrix_gets_the_smallest_shift_that_factors():
    """A rank-deficient A: the Cholesky of its Gram matrix fails, the shifted retry factors `G + shift I`."""
    g = torch.Generator().manual_seed(4)
    A = torch.randn(200, 120, generator=g)
    A[:, 7] = A[:, 3]  # exactly rank-deficient: G is singular
    L = _cholesky(_syrk(A), max_shift=1e-3)
    assert L is not None
    G = A.T.double() @ A.double()
    resid = L.double() @ L.double().T - G
    shift = float(resid.diagonal().mean())
    assert 0 < shift <= 1e-3 * float(G.diagonal().max())
    assert float((resid - shift * torch.eye(120, dtype=F64)).abs().max()) < 1e-4 * float(G.abs().max())


@pytest.mark.parametrize("orientation", ["tall", "wide"])
def test_an_ill_conditioned_tall_matrix_takes_the_fp32_qr_not_the_exact_path(orientation):
    """cond(W) = 1e4: an fp32 Gram matrix (cond 1e8) cannot resolve the minor end (its Cholesky factor says
    so: cond ~ 1e4 > CHOL_MAX_COND), the R of an fp32 QR (cond 1e4) can: the fast route certifies it without
    the fp64 fallback, within the 1e-3 bar."""
    g = torch.Generator().manual_seed(9)
    m, n = 900, 300
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    s = torch.logspace(0, -4, n, dtype=F64)
    W = ((U * s) @ V.T).float()
    W = W if orientation == "tall" else W.T.contiguous()
    info: dict = {}
    t = solve(W, 8, "minor", "gram", info=info)
    assert info["path"] == "qr32" and "fallback" not in info, info
    check(W, t, 8, "minor")



def test_repeated_singular_values():
    """A minor cluster of equal singular values: any basis of it is right; energies must match."""
    s = torch.cat([torch.linspace(10, 2, 300), torch.full((40,), 0.5), torch.full((20,), 0.1)]).to(F64)
    W = with_spectrum(400, 360, s)
    for rank in (10, 20, 30):  # inside, at the edge of and across the clusters
        check(W, solve(W, rank, "minor", "gram"), rank, "minor")


def test_near_degenerate_singular_values():
    s = (1.0 + 1e-7 * torch.arange(330, 0, -1, dtype=F64))  # all within 3e-5 of each other
    W = with_spectrum(330, 330, s, seed=2)
    check(W, solve(W, 12, "minor", "gram"), 12, "minor")


def test_orthogonal_matrix_exhausts_the_krylov_space():
    W = with_spectrum(300, 300, torch.ones(300, dtype=F64), seed=4)  # G = I: every vector is minor
    check(W, solve(W, 6, "minor", "gram"), 6, "minor")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rank_deficient(shape):
    """Exactly rank-deficient: the minor triplets are (numerically) zero, U and V still orthonormal."""
    k = min(shape)
    s = torch.cat([torch.linspace(5, 1, k - 30, dtype=F64), torch.zeros(30, dtype=F64)])
    W = with_spectrum(*shape, s, seed=6)
    info: dict = {}
    t = solve(W, 8, "minor", "gram", info=info)
    check(W, t, 8, "minor")
    assert float(t.S.max()) < 1e-5
    A, B = factors(t, scale=1.0)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_ill_conditioned_tall_matrix_falls_back_to_the_exact_path():
    """cond(W)^2 beyond fp32: the fp32 Gram cannot certify, the fp64 path must still be right."""
    s = torch.logspace(0, -6, 300, dtype=F64)
    W = with_spectrum(600, 300, s, seed=7)
    info: dict = {}
    t = solve(W, 6, "minor", "gram", info=info)
    check(W, t, 6, "minor")
    assert info["path"] in {"krylov64", "dense64"} and "fallback" in info


def test_a_failed_fp32_certificate_hands_a_consistent_result_to_the_exact_path(monkeypatch, caplog):
    """The fp32 route factorizes but its certificate fails (forced here: no excess is tolerated), so
    the exact fp64 path finds the subspace again: U must come from that subspace, not the failed one."""
    monkeypatch.setattr("milora.core.svd.gram.CERT_TOL", 0.0)  # where it is read (not the re-export)
    W = trained_like(600, 300, seed=3)
    info: dict = {}
    with caplog.at_level(logging.WARNING):
        t = solve(W, 6, "minor", "gram", info=info)
    assert info["path"] == "krylov64" and info["fallback"] == "chol32"
    check(W, t, 6, "minor")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_weights(dtype):
    W = trained_like(400, 300).to(dtype)
    t = solve(W, 8, "minor", "gram")
    assert t.U.dtype == torch.float32
    check(W.float(), t, 8, "minor")


def test_small_matrices_use_the_dense_gram_path():
    W = trained_like(64, 48)
    info: dict = {}
    check(W, solve(W, 4, "minor", "gram", info=info), 4, "minor")
    assert info["path"] == "dense64"


def test_solvers_are_deterministic():
    W = trained_like(500, 300)
    for side, solver in (("minor", "gram"), ("principal", "lowrank"), ("principal", "gram")):
        a, b = solve(W, 8, side, solver), solve(W, 8, side, solver)
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)


def test_solvers_leave_the_global_rng_alone():
    W = trained_like(300, 320)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    solve(W, 8, "minor", "gram")
    solve(W, 8, "principal", "lowrank")
    assert torch.equal(torch.rand(3), expected)


def test_auto_picks_full_for_small_and_fast_solvers_for_large():
    assert resolve_solver("auto", "minor", (64, 64), 4) == "full"
    assert resolve_solver("auto", "minor", (4096, 4096), 32) == "gram"
    assert resolve_solver("auto", "minor", (4096, 11008), 64) == "gram"
    # SmolLM2's shapes: its 576x576 attention projections get the full SVD (~50 ms, as fast), its MLPs gram
    assert resolve_solver("auto", "minor", (576, 576), 16) == "full"
    assert resolve_solver("auto", "minor", (1536, 576), 64) == resolve_solver("auto", "minor", (576, 1536), 16) == "gram"
    assert resolve_solver("auto", "principal", (11008, 4096), 64) == "lowrank"
    assert resolve_solver("auto", "minor", (1024, 1024), 512) == "full"  # rank is a large share of the side
    assert resolve_solver("full64", "minor", (4096, 4096), 32) == "full64"


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(5), 2, "minor", "full"), "expected a 2-D matrix"),
        ((torch.randn(8, 6), 6, "minor", "full"), r"rank must be in \[1, 5\]"),
        ((torch.randn(8, 6), 0, "minor", "full"), r"rank must be in \[1, 5\]"),
        ((torch.randn(8, 6), 2, "minor", "qr"), "unknown svd_solver 'qr'"),
        ((torch.randn(8, 6), 2, "minor", "lowrank"), "'lowrank' finds the largest singular triplets only"),
        ((torch.full((8, 6), math.nan), 2, "minor", "full"), "NaN or inf"),
    ],
)
def test_solve_errors(args, match):
    with pytest.raises(ValueError, match=match):
        solve(*args)


def test_factors_reproduce_the_triplets():
    W = trained_like(120, 90)
    t = solve(W, 6, "minor", "full")
    A, B = factors(t, scale=0.5)
    assert A.dtype == B.dtype == torch.float32 and A.shape == (6, 90) and B.shape == (120, 6)
    ref = (t.U.to(F64) * t.S.to(F64)) @ t.Vh.to(F64)
    assert torch.allclose(0.5 * B.to(F64) @ A.to(F64), ref, atol=1e-6)


def test_take_selects_the_right_end():
    W = trained_like(60, 40)
    t = solve(W, 10, "minor", "full")
    assert torch.equal(t.take(4, "minor").S, t.S[-4:])
    p = solve(W, 10, "principal", "full")
    assert torch.equal(p.take(4, "principal").S, p.S[:4])
    with pytest.raises(ValueError, match="only 10 stored"):
        t.take(11, "minor")


def test_compute_factors_report_and_bad_pairing_fail_before_work(caplog):
    weights = {"a": trained_like(300, 300), "b": trained_like(400, 300, seed=1)}
    with caplog.at_level(logging.INFO, logger="milora.core.svd"):
        out, trips, report = compute_factors(weights, 4, "minor", 1.0, "auto", None, progress=False)
    assert set(out) == set(trips) == {"a", "b"}
    assert report.misses == 2 and report.hits == 0 and report.world_size == 1
    assert "SVD init: 2 matrices, 0 cache hits, 2 misses" in caplog.text
    assert "full solver" in caplog.text  # per-matrix solver time in the log
    with pytest.raises(ValueError, match="'lowrank' finds the largest"):
        compute_factors(weights, 4, "minor", 1.0, "lowrank", None, progress=False)


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=320, intermediate_size=448, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_init_adapter_with_the_gram_solver_is_exact_at_step0_and_spans_the_minor_subspace():
    """q/k/v (320x320: LU route), up (448x320: fp32 Gram), down (320x448: wide) at r=4."""
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    base = _model()
    originals = {n: m.weight.detach().double().clone() for n, m in base.named_modules()
                 if n.rsplit(".", 1)[-1] in ("q_proj", "up_proj", "down_proj")}
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    cfg = AdapterConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "up_proj", "down_proj"],
                        svd_solver="gram")
    model = milora.init_adapter(base, cfg, progress=False)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref).abs().max() <= 1e-4
    for name, (A, B) in current_factors(model).items():
        W = originals[name]
        S = torch.linalg.svdvals(W)
        exact = float(S[-4:].pow(2).sum())
        V = torch.linalg.qr(A.double().T).Q  # row space of A, column space of B: the minor subspaces
        U = torch.linalg.qr(B.double()).Q
        assert captured_energy(W, V.T) - exact <= EXCESS * exact, name
        assert float((W.T @ U).pow(2).sum()) - exact <= EXCESS * exact, name
        got = torch.linalg.svdvals(cfg.scale * B.double() @ A.double())[:4]
        assert torch.allclose(got.sort().values, S[-4:].sort().values, rtol=1e-3), name


@pytest.mark.parametrize("given, expected", [(None, "4"), ("12", "12")])
def test_importing_milora_sets_a_short_openblas_thread_timeout_unless_the_user_did(given, expected):
    """Set on the package's import (before anything loads scipy's OpenBLAS, which reads it once)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = "import milora, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_importing_the_svd_engine_leaves_scipy_unloaded():
    """scipy.linalg (~0.3 s) loads on the first solve: `milora cache` imports the engine without solving."""
    code = "import sys, milora.core.svd; print('scipy.linalg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
