"""The `svd` stage: initialise the configured adapter on the base through the SVD cache.

Writes the untrained adapter (`models/svd_init`, initial factors only: small), `metrics/svd.json`
(per-matrix solver time, cache hits, spectrum summary) and the spectrum plot (CSV for `dvc plots`,
PNG for people) with the minor and principal bands marked.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from milora.core.adapter import init_adapter, resolve_targets, save_adapter, state_of, weight_2d
from milora.core.io import atomic_write_bytes, atomic_write_text
from milora.model.base import load_base
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths
from milora.pipeline.results import write_metrics
from milora.stages.distributed import check_own_workspaces, is_local_main, launch, process_group, wants_launch

log = logging.getLogger(__name__)

# The numbers of metrics/svd.json (DVC metrics, compared across runs); reports/svd.json has them all.
SUMMARY = ["init_seconds", "cache_hits"]


def spectrum_summary(spectrum: torch.Tensor, rank: int) -> dict[str, float]:
    """Energy shares of the principal and minor `rank` bands and the decay of one spectrum."""
    s = spectrum.double()
    e = s.pow(2)
    total = e.sum().item() or 1.0
    return {
        "sigma_max": s[0].item(),
        "sigma_min": s[-1].item(),
        "principal_energy": e[:rank].sum().item() / total,
        "minor_energy": e[-rank:].sum().item() / total,
        "top_to_median": (s[0] / s[len(s) // 2].clamp(min=1e-30)).item(),
    }


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _layer(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def spectrum_csv(spectra: dict[str, torch.Tensor]) -> str:
    """Long-format CSV of every singular value: module, layer, index, singular_value, normalized."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["module", "kind", "layer", "index", "singular_value", "normalized"])
    for name in sorted(spectra, key=lambda n: (_kind(n), _layer(n))):
        s = spectra[name].double()
        for i, v in enumerate(s.tolist()):
            w.writerow([name, _kind(name), _layer(name), i, f"{v:.6g}", f"{v / max(s[0].item(), 1e-30):.6g}"])
    return buf.getvalue()


def spectrum_png(spectra: dict[str, torch.Tensor], rank: int, method: str) -> bytes:
    """One panel per module kind, one line per layer, the adapted band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({_kind(n) for n in spectra})
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        names = sorted((n for n in spectra if _kind(n) == kind), key=_layer)
        for n in names:
            s = spectra[n].double().numpy()
            ax.semilogy(range(len(s)), s, lw=1, label=f"layer {_layer(n)}")
        k = len(spectra[names[0]])
        ax.axvspan(0, rank - 1, color="tab:orange", alpha=0.15, label="principal r (PiSSA)")
        ax.axvspan(k - rank, k - 1, color="tab:green", alpha=0.2, label="minor r (MiLoRA)")
        ax.set_title(kind)
        ax.set_xlabel("index")
    axes[0][0].set_ylabel("singular value")
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.suptitle(f"Singular value spectra of the target weights ({method}, r={rank})", fontsize=9)
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
    # plain LoRA computes no SVD: take the spectra of the original weights for the plot
    lora_spectra = {} if acfg.side else {n: torch.linalg.svdvals(weight_2d(m).detach().float())
                                         for n, m in targets.items()}
    cache = cfg.svd.cache
    if cache and "://" not in cache and not Path(cache).expanduser().is_absolute():
        cache = str(paths.root / cache)  # a relative cache directory lives in the project
    peft_model = init_adapter(model, acfg, cache=cache, progress=is_local_main())
    if not is_local_main():
        return
    state = state_of(peft_model)
    save_adapter(peft_model, paths.svd_init_dir)

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
            per_matrix={m.name: {"seconds": round(m.seconds, 4), "hit": m.hit, "solver": m.solver,
                                 "shape": list(m.shape)} for m in report.matrices},
        )
    else:
        metrics.update(init_seconds=0.0, cache_hits=0, cache_misses=0)
    spectra = state.spectra or lora_spectra
    summaries = {n: spectrum_summary(s, acfg.rank) for n, s in spectra.items()}
    if summaries:
        metrics["spectrum"] = {
            k: sum(s[k] for s in summaries.values()) / len(summaries)
            for k in ("principal_energy", "minor_energy", "top_to_median")
        }
    write_metrics(paths, "svd", metrics, SUMMARY)
    atomic_write_text(paths.plot("spectrum.csv"), spectrum_csv(spectra))
    atomic_write_bytes(paths.plot("spectrum.png"), spectrum_png(spectra, acfg.rank, acfg.method))
    log.info("svd: %s adapter r=%d on %d matrices -> %s", acfg.method, acfg.rank, len(state.init_factors),
             paths.svd_init_dir)
