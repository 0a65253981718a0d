"""The `svd` stage: initialise the configured adapter on the base through the SVD cache.

Writes the untrained adapter (`models/svd_init`, initial factors only: small), the SVD metrics
(`reports/svd.json`: per-matrix solver and time, cache hits, spectrum summary) and the spectrum plot
(CSV for `dvc plots`, PNG for people) with the minor and principal bands marked. Where a fast solver
computed only the needed triplets, the plot shows those and a randomized sketch of the top of the
spectrum, never a full SVD of a large matrix.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from milora.core import svd
from milora.core.adapter import init_adapter, resolve_targets, save_adapter, state_of, weight_2d
from milora.core.io import atomic_write_bytes, atomic_write_text, write_json
from milora.model.base import load_base
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths
from milora.pipeline.results import write_metrics
from milora.stages.distributed import check_own_workspaces, is_local_main, launch, process_group, wants_launch

log = logging.getLogger(__name__)

# The numbers of metrics/svd.json (DVC metrics, compared across runs); reports/svd.json has them all but the
# run facts (wall times, cache hits), which go to timings/svd.json.
# What an svd run changes that people compare is its time and cache use (TIMINGS), and with
# adapter.quantization the step-0 error of the quantized frozen weights.
SUMMARY: list[str] = ["quantization.relative_error_mean", "quantization.relative_error_max"]
TIMINGS = ["init_seconds", "cache_hits", "cache_misses"]
# Per-matrix run facts: timings/svd_matrices.json (MLflow logs it; not a DVC metric: one column per matrix).
MATRIX_TIMINGS = "svd_matrices"


# Above this many singular values a matrix's spectrum is not computed in full for the plot: the solved
# triplets and a sketch of the top (randomized, `SKETCH` values) show what the fast solvers know.
FULL_SPECTRUM_MAX_SIDE = svd.AUTO_MIN_SIDE
SKETCH = 32


@dataclass
class Spectrum:
    """What is known of one weight's singular values: `values` (descending) at positions `index` of its
    `size` singular values (all of them after a full SVD; else the solved triplets and a sketch of the top),
    and its total energy `sum sigma^2 = ||W||_F^2`, exact either way."""

    index: torch.Tensor
    values: torch.Tensor
    size: int
    energy: float

    @property
    def complete(self) -> bool:
        """Whether every singular value is known."""
        return self.values.numel() == self.size


def known_spectrum(weight: torch.Tensor, full: torch.Tensor | None = None, solved: torch.Tensor | None = None,
                   side: str | None = None) -> Spectrum:
    """The spectrum of `weight` as far as it is known: `full` when a solver produced it (or the matrix is
    small enough to compute it here), else the `solved` singular values on their `side` plus a randomized
    sketch of the top ones (a few matmuls, no full SVD)."""
    W = weight.detach().float()
    size = min(W.shape)
    energy = float(W.double().square().sum())
    if full is None and solved is None and size <= FULL_SPECTRUM_MAX_SIDE:
        full = torch.linalg.svdvals(W)
    if full is not None:
        return Spectrum(torch.arange(size), full.double(), size, energy)
    with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG stream is left alone
        torch.manual_seed(0)  # oversampled 2x with 4 power iterations: the top values to ~1 % on flat spectra
        top = torch.svd_lowrank(W, q=min(size, 2 * SKETCH), niter=4)[1][:SKETCH]
    sketch = Spectrum(torch.arange(top.numel()), top.double(), size, energy)
    return sketch if solved is None else with_solved(sketch, solved, side)


def with_solved(sp: Spectrum, solved: torch.Tensor, side: str | None) -> Spectrum:
    """`sp` with the `solved` singular values (exact, descending) in place at the `side` end: they win over
    a sketch's values at the same positions."""
    if sp.complete:
        return sp
    known = dict(zip(sp.index.tolist(), sp.values.tolist(), strict=True))
    start = sp.size - solved.numel() if side == "minor" else 0
    known.update((start + i, v) for i, v in enumerate(solved.double().tolist()))
    index = torch.tensor(sorted(known))
    return Spectrum(index, torch.tensor([known[i] for i in index.tolist()], dtype=torch.float64), sp.size, sp.energy)


def solved_values(A0: torch.Tensor, B0: torch.Tensor, scale: float) -> torch.Tensor:
    """The singular values an init used, from its factors: `B0 = U sqrt(S/s)`, so `S = s |B0[:, i]|^2`."""
    return (scale * B0.double().square().sum(0)).sort(descending=True).values


def spectrum_summary(sp: Spectrum, rank: int) -> dict[str, float]:
    """Energy shares of the principal and minor `rank` bands, and the decay (top / median) where known."""
    total = sp.energy or 1.0
    at = dict(zip(sp.index.tolist(), sp.values.pow(2).tolist(), strict=True))
    out = {"sigma_max": sp.values[0].item()}
    bands = {"principal_energy": range(rank), "minor_energy": range(sp.size - rank, sp.size)}
    for key, band in bands.items():
        if all(i in at for i in band):
            out[key] = sum(at[i] for i in band) / total
    if sp.complete:
        out["sigma_min"] = sp.values[-1].item()
        out["top_to_median"] = (sp.values[0] / sp.values[sp.size // 2].clamp(min=1e-30)).item()
    return out


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _layer(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def spectrum_csv(spectra: dict[str, Spectrum]) -> str:
    """Long-format CSV of every known singular value: module, kind, layer, index, singular_value, normalized."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["module", "kind", "layer", "index", "singular_value", "normalized"])
    for name in sorted(spectra, key=lambda n: (_kind(n), _layer(n))):
        sp = spectra[name]
        top = max(sp.values[0].item(), 1e-30)
        for i, v in zip(sp.index.tolist(), sp.values.tolist(), strict=True):
            w.writerow([name, _kind(name), _layer(name), i, f"{v:.6g}", f"{v / top:.6g}"])
    return buf.getvalue()


def spectrum_png(spectra: dict[str, Spectrum], rank: int, method: str) -> bytes:
    """One panel per module kind, one line per layer (dots where only parts are known), bands shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({_kind(n) for n in spectra}) or ["(no target matrices)"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        names = sorted((n for n in spectra if _kind(n) == kind), key=_layer)
        for n in names:
            sp = spectra[n]
            style = {"lw": 1} if sp.complete else {"ls": "none", "marker": ".", "ms": 2}
            ax.semilogy(sp.index.numpy(), sp.values.numpy(), label=f"layer {_layer(n)}", **style)
        if names:
            k = spectra[names[0]].size
            ax.axvspan(0, rank - 1, color="tab:orange", alpha=0.15, label="principal r (PiSSA)")
            ax.axvspan(k - rank, k - 1, color="tab:green", alpha=0.2, label="minor r (MiLoRA)")
        ax.set_title(kind)
        ax.set_xlabel("index")
    axes[0][0].set_ylabel("singular value")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    partial = any(not sp.complete for sp in spectra.values())
    note = "; dots: solved triplets + top sketch" if partial else ""
    fig.suptitle(f"Singular value spectra of the target weights ({method}, r={rank}{note})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: Config, paths: Paths) -> None:
    """Initialise the adapter (through the cache), save it, and write the SVD metrics and plots.

    With `train.processes > 1` or `train.nnodes > 1` the stage runs under torchrun like `train`, and the ranks
    of all nodes split the matrices through the shared `svd.cache`; each node's local rank 0 writes its outputs."""
    if wants_launch(cfg):
        launch(cfg, paths, "svd")
        return
    with process_group():
        check_own_workspaces(paths.root)
        _init(cfg, paths)


def _init(cfg: Config, paths: Paths) -> None:
    model, _ = load_base(cfg, paths)
    acfg = cfg.adapter
    targets = resolve_targets(model, acfg)  # rank vs shapes and target names fail here, before any SVD
    # What is known of each weight's spectrum before the init replaces it by its residual (in place): the
    # full spectrum of a small matrix, else the energy and a sketch of the top (one matrix at a time).
    before = {n: known_spectrum(weight_2d(m)) for n, m in targets.items()}
    cache = cfg.svd.cache
    if cache and "://" not in cache and not Path(cache).expanduser().is_absolute():
        cache = str(paths.root / cache)  # a relative cache directory lives in the project
    peft_model = init_adapter(model, acfg, cache=cache, progress=is_local_main())
    if not is_local_main():
        return
    state = state_of(peft_model)
    save_adapter(peft_model, paths.svd_init_dir, base_name=cfg.model.name_or_path)

    report = state.report
    metrics: dict[str, Any] = {
        "method": acfg.method,
        "rank": acfg.rank,
        "matrices": len(state.init_factors),
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
    }
    if report is not None:
        metrics.update(
            init_seconds=round(report.seconds, 4), cache_hits=report.hits, cache_misses=report.misses,
            per_matrix={m.name: {"solver": m.solver, "shape": list(m.shape)} for m in report.matrices},
        )
        # where and how long each solve ran (no device on a cache hit): run facts, not the reproducible report
        write_json(paths.timings(MATRIX_TIMINGS), {m.name: {"seconds": round(m.seconds, 4), "hit": m.hit,
                                                            "device": m.device} for m in report.matrices})
    else:
        metrics.update(init_seconds=0.0, cache_hits=0, cache_misses=0)
    if acfg.quantization != "none":  # ||W - (deq(Q(R)) + s B0 A0)||_F / ||W||_F per matrix: the step-0 error
        errors = state.quantization_error
        metrics["quantization"] = {
            "type": acfg.quantization, "relative_error_mean": round(sum(errors.values()) / len(errors), 6),
            "relative_error_max": round(max(errors.values()), 6),
            "per_matrix": {n: round(e, 6) for n, e in sorted(errors.items())}}
    spectra = {}
    for n, sp in before.items():
        # Not a solver's own full spectrum: a cache hit does not carry it, and the report must not depend on
        # whether the cache was warm (byte-reproducible outs).
        if acfg.side and n in state.init_factors:
            spectra[n] = with_solved(sp, solved_values(*state.init_factors[n], acfg.scale), acfg.side)
        else:
            spectra[n] = sp
    summaries = [spectrum_summary(sp, acfg.rank) for sp in spectra.values()]
    metrics["spectrum"] = {k: sum(v) / len(v) for k in ("principal_energy", "minor_energy", "top_to_median")
                           if (v := [s[k] for s in summaries if k in s])}
    write_metrics(paths, "svd", metrics, SUMMARY, TIMINGS)
    atomic_write_text(paths.plot("spectrum.csv"), spectrum_csv(spectra))
    atomic_write_bytes(paths.plot("spectrum.png"), spectrum_png(spectra, acfg.rank, acfg.method))
    log.info("svd: %s adapter r=%d on %d matrices -> %s", acfg.method, acfg.rank, len(state.init_factors),
             paths.svd_init_dir)
