"""`milora compare`: LoRA vs PiSSA vs MiLoRA on the same base, data and budget, over several seeds.

Shares the `ingest`, `base` and `prepare` outputs of the project, then runs `svd -> train -> evaluate`
per method and seed in its own directory, and writes a table (markdown + JSON) and a plot: task
accuracy, forgetting, train loss, trainable parameters, init time and train time.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from milora.core.io import atomic_write_bytes, atomic_write_text, read_json, write_json
from milora.pipeline.config import load_config, parse_sets
from milora.pipeline.paths import Paths
from milora.stages import run_stage

log = logging.getLogger(__name__)

METHODS = ("lora", "pissa", "milora")
COLUMNS = [  # (key, label, digits)
    ("average_accuracy", "avg acc", 3),
    ("math_accuracy", "math acc", 3),
    ("choice_accuracy", "choice acc (gen)", 3),
    ("choice_accuracy_loglik", "choice acc (loglik)", 3),
    ("perplexity", "eval ppl", 2),
    ("forgetting", "forgetting (Δ held-out loss)", 4),
    ("final_loss", "final train loss", 4),
    ("trainable_params", "trainable params", 0),
    ("init_seconds", "init s", 2),
    ("train_seconds", "train s", 1),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora compare`."""
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--root", default=".", help="project root whose ingest/base/prepare outputs are shared")
    p.add_argument("--workdir", default=".milora/compare", help="where the per-run directories go")
    p.add_argument("--out", default="docs/results", help="output prefix: writes <out>.md, <out>.json, <out>.png")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")


def link_shared(shared: Paths, run: Paths) -> None:
    """Symlink the base, the prepared data and the benchmark suites of `shared` into the run directory `run`."""
    for src, dst in [(shared.base_dir, run.base_dir), (shared.base_json, run.base_json),
                     (shared.heldout_text, run.heldout_text), (shared.prepared_dir, run.prepared_dir),
                     (shared.suites_dir, run.suites_dir)]:
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            continue
        os.symlink(src.resolve(), dst)


def _ensure_shared(params: str, root: Path, overrides: dict[str, Any]) -> None:
    paths = Paths(root)
    needed = [("ingest", paths.raw_dir), ("base", paths.base_json), ("prepare", paths.prepared_dir / "train.jsonl")]
    for stage, out in needed:
        if not out.exists():
            run_stage(stage, params, root, overrides)


def run_one(params: str, shared_root: Path, run_root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """svd -> train -> evaluate for one method/seed; the merged metrics of the three stages."""
    run = Paths(run_root)
    link_shared(Paths(shared_root), run)
    timings = {s: run_stage(s, params, run_root, overrides).seconds for s in ("svd", "train", "evaluate")}
    out: dict[str, Any] = {}
    for stage in ("svd", "train", "eval"):  # each stage's details and its run facts (timings)
        for f in (run.report(stage), run.timings(stage)):
            m = read_json(f) if f.is_file() else {}
            out.update({k: v for k, v in m.items() if isinstance(v, int | float | str | bool) or v is None})
    out["stage_seconds"] = timings
    return out


def _agg(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """method -> metric -> [mean, std] over seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method]
        out[method] = {k: list(_agg([r.get(k) for r in rows])) for k, _, _ in COLUMNS}
        out[method]["n_seeds"] = [len(rows), 0.0]
    return out


def markdown_table(summary: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table of mean ± std per method."""
    head = "| method | seeds | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    sep = "|---|---|" + "---|" * len(COLUMNS)
    lines = [head, sep]
    for method, m in summary.items():
        cells = []
        for key, _, digits in COLUMNS:
            mean, std = m[key]
            if math.isnan(mean):
                cells.append("n/a")
            elif digits == 0:
                cells.append(f"{mean:,.0f}")
            else:
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {method} | {int(m['n_seeds'][0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, list[float]]]) -> bytes:
    """Bar charts of accuracy, forgetting and train loss per method (error bars: std over seeds)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("average_accuracy", "average accuracy"), ("forgetting", "forgetting (Δ held-out loss)"),
              ("final_loss", "final train loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3))
    methods = list(summary)
    for ax, (key, title) in zip(axes, panels, strict=True):
        means = [summary[m][key][0] for m in methods]
        stds = [summary[m][key][1] for m in methods]
        ax.bar(methods, means, yerr=stds, capsize=4, color=["tab:gray", "tab:orange", "tab:green"][: len(methods)])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compare(params: str, root: Path, methods: list[str], seeds: list[int], workdir: Path, out: Path,
            overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every method x seed and write `<out>.json`, `<out>.md`, `<out>.png`; return the JSON."""
    overrides = dict(overrides or {})
    load_config(params, overrides)  # fail fast on a bad config
    _ensure_shared(params, root, overrides)
    runs = []
    t0 = time.perf_counter()
    for seed in seeds:
        for method in methods:
            o = {**overrides, "adapter.method": method, "adapter.alpha": None, "train.seed": seed}
            log.info("compare: %s seed %d", method, seed)
            metrics = run_one(params, root, workdir / f"{method}-seed{seed}", o)
            runs.append({"method": method, "seed": seed, **metrics})
    summary = summarise(runs)
    result = {"methods": methods, "seeds": seeds, "overrides": overrides, "summary": summary, "runs": runs,
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), markdown_table(summary))
    atomic_write_bytes(out.with_suffix(".png"), plot(summary))
    return result


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora compare`."""

    result = compare(args.params, Path(args.root), args.methods, args.seeds, Path(args.workdir), Path(args.out),
                     parse_sets(args.set))
    print(markdown_table(result["summary"]))
    print(f"wrote {args.out}.md, {args.out}.json, {args.out}.png")
    return 0
