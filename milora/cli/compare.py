"""`milora compare`: LoRA vs PiSSA vs MiLoRA on the same base, data and budget, over several seeds.

Shares the `ingest`, `base` and `prepare` outputs of the project (`--root`), then runs each trial in its own
directory, and writes a report (`<out>.md`, `<out>.json`, `<out>.png`).

* With the lab data (`--params params.lab.yaml`, `data.embedded.profile: lab`): the tuned comparison. Per method
  (and rank), a learning-rate grid (`--lrs`, default 5 log-spaced rates around `train.learning_rate`) is trained
  on the first `--grid-seeds` seeds and the rate with the best mean validation accuracy on the learning task (the
  new facts; never a retention or test set) is selected, the grid extended where the best rate is at its edge; the
  other seeds run at that rate. The report (`milora.evaluation.lab_report`) gives the learning test accuracy,
  retention (recall, cloze) and forgetting at the selected rates with their intervals, forgetting at matched
  learning along each method's grid (the frontier), and the answer they support. Trials run in `--max-parallel`
  processes of `--threads` threads, each an MLflow child run of one comparison run, and a trial whose
  `result.json` matches its config hash is not rerun.
* Otherwise: `svd -> train -> evaluate` per method and seed at the one `train.learning_rate` (the smoke-scale
  comparison of the embedded default): task accuracy, forgetting, train loss, trainable parameters, times.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from milora.core.errors import InvalidInput
from milora.core.io import (
    atomic_write_bytes,
    atomic_write_text,
    dump_json,
    file_digest,
    read_json,
    read_jsonl,
    write_json,
)
from milora.data import lab
from milora.evaluation.lab_report import (
    AXES,
    TASKS,
    VAL_SETS,
    frontier_statistics,
    lab_markdown,
    lab_plot,
    lab_statistics,
    validation_score,
    with_kept_notes,
)
from milora.model.gguf import is_gguf
from milora.pipeline.config import EMBEDDED, load_config, parse_sets
from milora.pipeline.paths import Paths
from milora.stages import run_stage

log = logging.getLogger(__name__)

METHODS = ("lora", "pissa", "milora")
DEFAULT_PATHS = (".", ".milora/compare", "docs/results_embedded")  # --root, --workdir, --out
LAB_PATHS = (".milora/lab", ".milora/lab/trials", "docs/results")
REAL_PATHS = (".milora/smol", ".milora/smol/trials", "docs/results_smollm2")  # a GGUF base (params.smol.yaml)
COLUMNS = [  # (key, label, digits)
    ("average_accuracy", "avg acc", 3),
    ("math_accuracy", "math acc", 3),
    ("choice_accuracy", "choice acc (gen)", 3),
    ("choice_accuracy_loglik", "choice acc (loglik)", 3),
    ("perplexity", "eval ppl", 2),
    ("learning_accuracy", "learning acc (suite)", 3),
    ("learning_base_accuracy", "learning acc, base", 3),
    ("retention", "retention (kept)", 3),
    ("forgetting", "forgetting (Δ held-out / self-text loss)", 4),
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
    p.add_argument("--root", default=None, help="project root whose ingest/base/prepare outputs are shared "
                   "(default: . ; .milora/lab for the lab profile, .milora/smol for a GGUF base such as "
                   "params.smol.yaml, so their base never replaces the project's)")
    p.add_argument("--workdir", default=None, help="where the per-run directories go "
                   "(default: .milora/compare ; .milora/lab/trials for the lab profile)")
    p.add_argument("--out", default=None, help="output prefix: writes <out>.md, <out>.json, <out>.png "
                   "(default: docs/results_embedded ; docs/results for the lab profile)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    lab_args = p.add_argument_group("the tuned comparison (lab profile: --params params.lab.yaml)")
    lab_args.add_argument("--lrs", action="append", default=[], metavar="METHOD=LR,LR,...",
                          help="a method's learning-rate grid (default: 5 log-spaced around train.learning_rate)")
    lab_args.add_argument("--extend", type=int, default=2, metavar="N",
                          help="when a method's best rate is at its grid's edge, add up to N rates beyond it (default 2)")
    lab_args.add_argument("--grid-seeds", type=int, default=3, metavar="N",
                          help="the learning-rate grid runs on the first N of --seeds (default 3): the rate is "
                          "selected on their mean validation accuracy, and each is one curve of the frontier")
    lab_args.add_argument("--ranks", nargs="+", type=int, default=None, help="adapter ranks (default adapter.rank)")
    lab_args.add_argument("--max-parallel", type=int, default=1, help="trials run at once (processes)")
    lab_args.add_argument("--threads", type=int, default=1, help="CPU threads of each trial (OMP_NUM_THREADS)")
    lab_args.add_argument("--quick", action="store_true", help="a smoke run: tiny base, 2 rates (never extended), 3 steps, 8 rows a set")
    lab_args.add_argument("--no-mlflow", action="store_true", help="do not record the trials in MLflow")


def link_shared(shared: Paths, run: Paths) -> None:
    """Symlink the base, the prepared data and the benchmark suites of `shared` into the run directory `run`."""
    for src, dst in [(shared.base_dir, run.base_dir), (shared.base_json, run.base_json),
                     (shared.heldout_text, run.heldout_text), (shared.self_text, run.self_text),
                     (shared.prepared_dir, run.prepared_dir), (shared.suites_dir, run.suites_dir)]:
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
            for name, suite in (m.get("suites") or {}).items():  # e.g. the real profile's learning suite
                out.update({f"{name}_{k}": v for k, v in suite.items() if k in ("accuracy", "base_accuracy")})
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

    has_suite = any(not math.isnan(m["learning_accuracy"][0]) for m in summary.values())
    panels = [("learning_accuracy", "learning accuracy (suite)") if has_suite else ("average_accuracy", "average accuracy"),
              ("forgetting", "forgetting (Δ held-out / self-text loss)"), ("final_loss", "final train loss")]
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


# ============================================================================= the lab: tuned, seeded, with CIs

GRID_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)  # the default grid: log-spaced around each method's default rate
LR_BOUNDS = (1e-6, 1.0)  # a grid is never extended beyond these rates
QUICK = {  # `--quick`: a smoke run of the whole lab (tiny base, a few steps); numbers mean nothing
    "model.embedded.hidden_size": 32, "model.embedded.intermediate_size": 64, "model.embedded.num_layers": 1,
    "model.embedded.num_heads": 2, "model.embedded.pretrain_steps": 20, "model.embedded.vocab_size": 512,
    "data.embedded.corpus_documents": 300, "data.embedded.heldout_documents": 20, "data.embedded.new_people": 4,
    "train.max_steps": 3, "train.save_steps": 3, "train.logging_steps": 1, "train.warmup_steps": 0,
}
QUICK_ROWS = 8  # rows per evaluation set under --quick
HELDOUT_DOCUMENTS = 200  # held-out pretraining documents a trial's forgetting is measured on


def default_grid(center: float) -> list[float]:
    """Five learning rates log-spaced (factor ~3) around `center`, two significant digits."""
    return [float(f"{center * f:.2g}") for f in GRID_FACTORS]


def parse_grid(items: list[str], methods: list[str], center: float) -> dict[str, list[float]]:
    """`METHOD=lr,lr,...` items over the default grid of every method."""
    grid = {m: default_grid(center) for m in methods}
    for item in items:
        method, _, values = item.partition("=")
        if method not in grid or not values:
            raise InvalidInput(f"--lrs {item!r}: give METHOD=LR,LR,... with METHOD one of {', '.join(methods)}")
        try:
            grid[method] = sorted(float(v) for v in values.split(","))
        except ValueError:
            raise InvalidInput(f"--lrs {item!r}: learning rates must be numbers") from None
        if any(v <= 0 for v in grid[method]):
            raise InvalidInput(f"--lrs {item!r}: learning rates must be > 0")
    return grid


def rate_scores(trials: list[dict[str, Any]]) -> dict[float, float]:
    """Learning rate -> the mean `validation_score` of its trials (one method and rank, the grid's seeds)."""
    by_rate: dict[float, list[float]] = {}
    for t in trials:
        by_rate.setdefault(t["learning_rate"], []).append(validation_score(t))
    return {lr: statistics.fmean(v) for lr, v in sorted(by_rate.items())}


def select_learning_rate(trials: list[dict[str, Any]]) -> float:
    """The learning rate with the best mean `validation_score` over its trials (ties: the smaller rate). Reads only
    each trial's `learning_rate` and `val` metrics: the learning task's validation sets, never retention or test."""
    if not trials:
        raise ValueError("no trials to select a learning rate from")
    scores = rate_scores(trials)
    return max(scores, key=lambda lr: (scores[lr], -lr))


def edge_extension(trials: list[dict[str, Any]], lower: float, upper: float) -> float | None:
    """The next rate to try when the validation-best rate of `trials` (one method and rank) is the smallest or the
    largest rate tried: one grid step (the ratio of the two nearest rates) beyond it, within [`lower`, `upper`];
    None when the best is inside the rates tried (bracketed) or the step would leave the bounds."""
    rates = sorted({t["learning_rate"] for t in trials})
    if len(rates) < 2:
        return None
    best = select_learning_rate(trials)
    if best == rates[0]:
        nxt = float(f"{rates[0] * rates[0] / rates[1]:.2g}")
    elif best == rates[-1]:
        nxt = float(f"{rates[-1] * rates[-1] / rates[-2]:.2g}")
    else:
        return None
    return nxt if lower <= nxt <= upper and nxt not in rates else None


def trial_name(t: dict[str, Any]) -> str:
    """A trial's directory name: method, rank, learning rate, seed."""
    return f"{t['method']}-r{t['rank']}-lr{t['learning_rate']:g}-s{t['seed']}"


def trial_overrides(overrides: dict[str, Any], t: dict[str, Any]) -> dict[str, Any]:
    """The params overrides of one trial."""
    return {**overrides, "adapter.method": t["method"], "adapter.alpha": None, "adapter.rank": t["rank"],
            "train.learning_rate": t["learning_rate"], "train.seed": t["seed"]}


RESULT_VERSION = 2  # what a trial records; 2: the new-facts task, retention sets, per-document forgetting, val NLL


def config_hash(params: str, overrides: dict[str, Any], t: dict[str, Any], inputs: str) -> str:
    """What a trial's result depends on: the full config of the trial, the shared inputs' digest, and the version
    of what a trial records (`RESULT_VERSION`)."""
    cfg = load_config(params, trial_overrides(overrides, t)).model_dump(mode="json")
    return hashlib.sha256(dump_json({"config": cfg, "inputs": inputs, "result": RESULT_VERSION}).encode()).hexdigest()


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """svd -> train -> lab evaluation of one trial in its own directory; writes and returns `result.json`.
    Runs in a worker process with `job["threads"]` CPU threads."""
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    os.environ["TQDM_DISABLE"] = "1"
    import contextlib
    import warnings

    from milora.cli import leave_out_bitsandbytes

    o = trial_overrides(job["overrides"], job["trial"])
    leave_out_bitsandbytes(job["params"], o)  # a worker process: every trial of a comparison quantizes alike
    import torch

    warnings.simplefilter("ignore")  # the libraries' deprecation notes, once per trial, would bury the progress log

    torch.set_num_threads(job["threads"])
    from milora.evaluation.lab import evaluate_trial
    from milora.model.base import load_base
    from milora.model.precision import autocast, inference_precision

    t0 = time.perf_counter()
    root = Path(job["run_root"])
    run = Paths(root)
    link_shared(Paths(Path(job["shared_root"])), run)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer's per-step dicts: stdout carries the report alone
        for stage in ("svd", "train"):
            run_stage(stage, job["params"], root, o)
    cfg = load_config(job["params"], o)
    sets = {name: read_jsonl(Path(job["sets_dir"]) / f"{name}.jsonl") for name in lab.EVAL_SETS}
    lines = run.heldout_text.read_text(encoding="utf-8").splitlines()
    heldout = [ln for ln in lines if ln.strip()][:HELDOUT_DOCUMENTS]
    model, tokenizer = load_base(cfg, run)
    with autocast(inference_precision(cfg.eval.precision, run.adapter_dir)):  # the base and the trial alike
        ev = evaluate_trial(model, tokenizer, run.adapter_dir, sets, heldout, cfg.data.max_length, cfg.eval.batch_size,
                            score_base=job["score_base"])
    train = read_json(run.report("train"))
    result = {
        **job["trial"], "config_hash": job["hash"],
        "val": {n: statistics.fmean(ev["hits"][n]) for n in VAL_SETS},
        "val_nll": statistics.fmean(x for n in VAL_SETS for x in ev["gold_nll"][n]),
        "test": {n: statistics.fmean(ev["hits"][f"{n}_test"]) for n in TASKS},
        "forgetting": ev["forgetting"], "forgetting_docs": ev["forgetting_docs"],
        "heldout_nll_base": ev["heldout_nll_base"],
        "final_train_loss": train.get("final_loss"), "eval_loss": train.get("eval_loss_end"),
        "trainable_params": train.get("trainable_params"),
        "hits": {n: ev["hits"][n] for n in (*VAL_SETS, *(f"{t}_test" for t in TASKS))},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if ev["hits_before"]:
        result["base"] = {n: statistics.fmean(hits) for n, hits in ev["hits_before"].items()}
        result["base_val_nll"] = statistics.fmean(x for n in VAL_SETS for x in ev["gold_nll_before"][n])
    write_json(root / "result.json", result)
    return result


def _cached(job: dict[str, Any]) -> dict[str, Any] | None:
    """The trial's earlier result when it was made with the same config (and holds what this job must add)."""
    path = Path(job["run_root"]) / "result.json"
    if not path.is_file():
        return None
    result = read_json(path)
    ok = result.get("config_hash") == job["hash"] and (not job["score_base"] or "base" in result)
    return result if ok else None


class _Tracker:
    """One MLflow parent run of the comparison, each trial a child run of it."""

    def __init__(self, experiment: str, name: str, params: dict[str, str]):
        from milora.tracking import store

        self.client = store.client(".")
        self.experiment = store.ensure_experiment(self.client, experiment, ".")
        self.parent = self.client.create_run(self.experiment, run_name=name).info.run_id
        self._log(self.parent, params, {})

    def _log(self, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric, Param

        self.client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                              params=[Param(k, str(v)) for k, v in params.items()])

    def trial(self, t: dict[str, Any], result: dict[str, Any], cached: bool) -> None:
        """A child run with the trial's settings and metrics."""
        child = self.client.create_run(self.experiment, run_name=trial_name(t),
                                       tags={"mlflow.parentRunId": self.parent, "cached": str(cached).lower()})
        metrics = {**{f"val.{k}": v for k, v in result["val"].items()},
                   **{f"test.{k}": v for k, v in result["test"].items()},
                   "val_nll": result["val_nll"], "forgetting": result["forgetting"], "seconds": result["seconds"]}
        if result.get("final_train_loss") is not None:
            metrics["final_train_loss"] = result["final_train_loss"]
        self._log(child.info.run_id, {k: t[k] for k in ("method", "rank", "learning_rate", "seed", "phase")}, metrics)
        self.client.set_terminated(child.info.run_id)

    def finish(self, metrics: dict[str, float], files: list[Path]) -> None:
        """Summary metrics and the report files on the parent run."""
        self._log(self.parent, {}, metrics)
        for f in files:
            self.client.log_artifact(self.parent, str(f))
        self.client.set_terminated(self.parent)


def _run_trials(jobs: list[dict[str, Any]], max_parallel: int, tracker: _Tracker | None,
                done_before: int, total: int) -> list[dict[str, Any]]:
    """Run the jobs not already done (at most `max_parallel` processes at once); log progress with an ETA."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    results: list[dict[str, Any]] = []
    todo = []
    for job in jobs:
        hit = _cached(job)
        if hit is not None:
            results.append(hit)
            if tracker:
                tracker.trial(job["trial"], hit, cached=True)
        else:
            todo.append(job)
    done = done_before + len(results)
    if results:
        log.info("compare: %d trial(s) already done with the same config (not rerun); %d/%d done", len(results),
                 done, total)
    if not todo:
        return results
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max_parallel, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_trial, job): job for job in todo}
        for k, fut in enumerate(as_completed(futures), 1):
            job = futures[fut]
            result = fut.result()
            results.append(result)
            if tracker:
                tracker.trial(job["trial"], result, cached=False)
            done += 1
            left = (total - done) * (time.perf_counter() - t0) / k  # wall per trial so far, parallelism included
            log.info("compare: trials done %d/%d (%s, %.0f s), ETA %dm%02ds", done, total, trial_name(job["trial"]),
                     result["seconds"], left // 60, left % 60)
    return results


def _strip(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial as the report's JSON keeps it: without the per-example and per-document lists."""
    return {k: v for k, v in trial.items() if k not in ("hits", "forgetting_docs", "config_hash")}


def write_eval_sets(sets_dir: Path, seed: int, n_people: int, quick: bool) -> dict[str, float]:
    """Write the lab's evaluation sets (the first `QUICK_ROWS` of each under --quick); return chance levels."""
    from milora.data.synthetic import write_jsonl
    from milora.evaluation.lab import chance

    out = {}
    for name, rows in lab.eval_sets(seed, n_people).items():
        rows = rows[:QUICK_ROWS] if quick else rows
        write_jsonl(sets_dir / f"{name}.jsonl", rows)
        out[name] = chance(rows)
    return out


def compare_lab(params: str, root: Path, methods: list[str], seeds: list[int], workdir: Path, out: Path,
                overrides: dict[str, Any] | None = None, lrs: list[str] | None = None, ranks: list[int] | None = None,
                max_parallel: int = 1, threads: int = 1, quick: bool = False, n_boot: int = 10_000,
                command: str = "", track: bool = True, extend: int = 2, grid_seeds: int = 3) -> dict[str, Any]:
    """The tuned comparison on the lab profile: train each method's learning-rate grid on the first `grid_seeds`
    seeds, extending a grid whose best rate is at its edge by up to `extend` steps, select the rate on validation,
    run the other seeds at it, write `<out>.json`, `<out>.md`, `<out>.png`; return the JSON."""
    overrides = {**(QUICK if quick else {}), **(overrides or {})}
    cfg = load_config(params, overrides)
    if cfg.data.embedded.profile != lab.LAB or cfg.data.source != EMBEDDED:
        raise InvalidInput("the tuned comparison needs the lab data: data.source: embedded with "
                           "data.embedded.profile: lab (params.lab.yaml)")
    if "milora" not in methods:
        raise InvalidInput("--methods must include milora: the differences are taken against it")
    if grid_seeds < 1:
        raise InvalidInput("--grid-seeds must be >= 1")
    seeds = list(dict.fromkeys(seeds))
    on_grid = seeds[:grid_seeds]
    ranks = list(dict.fromkeys(ranks or [cfg.adapter.rank]))
    grid = parse_grid(lrs or [], methods, cfg.train.learning_rate)
    if quick:
        grid, extend = {m: v[1:4:2] for m, v in grid.items()}, 0
    t0 = time.perf_counter()
    _ensure_shared(params, root, overrides)
    sets_dir = workdir / "sets"
    chance = write_eval_sets(sets_dir, cfg.data.embedded.seed, cfg.data.embedded.new_people, quick)
    shared = Paths(root)
    inputs = file_digest(sets_dir, shared.base_json, shared.prepared_dir)
    tracker = _Tracker(f"{cfg.register.experiment}-compare", f"compare-{out.name}",
                       {"methods": ",".join(methods), "seeds": ",".join(map(str, seeds)),
                        "grid_seeds": ",".join(map(str, on_grid)), "ranks": ",".join(map(str, ranks)),
                        "command": command}) if track else None

    def trial(m: str, r: int, lr: float, s: int, phase: str) -> dict[str, Any]:
        return {"method": m, "rank": r, "learning_rate": lr, "seed": s, "phase": phase}

    def job(t: dict[str, Any]) -> dict[str, Any]:
        return {"trial": t, "params": params, "shared_root": str(root), "run_root": str(workdir / trial_name(t)),
                "overrides": overrides, "threads": threads, "sets_dir": str(sets_dir), "score_base": t is select[0],
                "hash": config_hash(params, overrides, t, inputs)}

    total = sum(len(grid[m]) * len(on_grid) + len(seeds) - len(on_grid) for m in methods) * len(ranks)
    select = [trial(m, r, lr, s, "select") for r in ranks for m in methods for lr in grid[m] for s in on_grid]
    n_cached = sum(_cached(job(t)) is not None for t in select)
    log.info("compare: %d trials (%d methods x %d ranks x %d rates on seed(s) %s, then %d more seed(s) at the "
             "selected rate), %d process(es) x %d thread(s)", total, len(methods), len(ranks),
             len(next(iter(grid.values()))), ",".join(map(str, on_grid)), len(seeds) - len(on_grid), max_parallel,
             threads)
    first = _run_trials([job(t) for t in select], max_parallel, tracker, 0, total)
    # A rate picked at the edge of its grid is not tuned (the best may lie beyond): extend the grid there.
    for _ in range(extend):
        edge = [trial(m, r, lr, s, "select") for r in ranks for m in methods
                if (lr := edge_extension([t for t in first if t["method"] == m and t["rank"] == r],
                                         *LR_BOUNDS)) is not None
                for s in on_grid]
        if not edge:
            break
        for t in edge:
            if t["learning_rate"] not in grid[t["method"]]:
                grid[t["method"]] = sorted({*grid[t["method"]], t["learning_rate"]})
                log.info("compare: %s r%d: the best rate is at the grid's edge; adding %g", t["method"], t["rank"],
                         t["learning_rate"])
        total += len(edge)
        n_cached += sum(_cached(job(t)) is not None for t in edge)
        first += _run_trials([job(t) for t in edge], max_parallel, tracker, len(first), total)
    chosen = {(m, r): select_learning_rate([t for t in first if t["method"] == m and t["rank"] == r])
              for r in ranks for m in methods}
    more = [trial(m, r, chosen[(m, r)], s, "seeds") for r in ranks for m in methods for s in seeds[len(on_grid):]]
    n_cached += sum(_cached(job(t)) is not None for t in more)
    second = _run_trials([job(t) for t in more], max_parallel, tracker, len(first), total)
    trials = first + second

    blocks = {str(r): _rank_block(first, trials, chosen, grid, methods, r, n_boot) for r in ranks}
    base = next(t for t in trials if "base" in t)
    result = {"profile": lab.LAB, "command": command, "methods": methods, "seeds": seeds, "grid_seeds": on_grid,
              "ranks": ranks, "overrides": overrides, "quick": quick, "n_boot": n_boot, "chance": chance,
              "extend": extend, "by_rank": blocks, "trials": sorted((_strip(t) for t in trials), key=trial_name),
              "base": {**base["base"], "val_nll": base["base_val_nll"]},
              "trials_total": total, "trials_run": total - n_cached, "out": out.as_posix(),
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    _publish_lab(result, first, out, tracker)
    return result


def _rank_block(first: list[dict[str, Any]], trials: list[dict[str, Any]], chosen: dict[tuple[str, int], float],
                grid: dict[str, list[float]], methods: list[str], rank: int, n_boot: int) -> dict[str, Any]:
    """One rank's statistics at the selected rates, the frontier of its grid, and how each rate was selected (the
    grid's validation scores, mean over the grid's seeds)."""
    def of(m: str, ts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [t for t in ts if t["method"] == m and t["rank"] == rank]

    final = {m: [t for t in of(m, trials) if t["learning_rate"] == chosen[(m, rank)]] for m in methods}
    block = lab_statistics(final, "milora", n_boot)
    on_grid = [t for m in methods for t in of(m, first)]
    block["frontier"] = {axis: frontier_statistics(on_grid, axis) for axis in AXES}

    def mean_row(ts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"learning_rate": ts[0]["learning_rate"], "seeds": len(ts),
                "val_score": statistics.fmean(validation_score(t) for t in ts),
                "val_nll": statistics.fmean(t["val_nll"] for t in ts),
                **{task: statistics.fmean(t["test"][task] for t in ts) for task in lab.RETENTION},
                "forgetting": statistics.fmean(t["forgetting"] for t in ts)}

    block["selection"] = {}
    for m in methods:
        rates = sorted({t["learning_rate"] for t in of(m, first)})
        scores = [mean_row([t for t in of(m, first) if t["learning_rate"] == lr]) for lr in rates]
        block["selection"][m] = {"learning_rate": chosen[(m, rank)], "grid": grid[m], "scores": scores,
                                 "val_score": next(r["val_score"] for r in scores
                                                   if r["learning_rate"] == chosen[(m, rank)])}
    return block


def _publish_lab(result: dict[str, Any], grid: list[dict[str, Any]], out: Path, tracker: _Tracker | None) -> None:
    """`<out>.json`, `<out>.md` (keeping the reading written below its mark) and `<out>.png`; the test means
    and the three files on the MLflow parent run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), with_kept_notes(lab_markdown(result), out.with_suffix(".md")))
    atomic_write_bytes(out.with_suffix(".png"), lab_plot(result, grid))
    if tracker:
        flat = {f"r{r}.{m}.test.{task}": s[task]["mean"] for r, b in result["by_rank"].items()
                for m, s in b["summary"].items() for task in TASKS}
        tracker.finish(flat, [out.with_suffix(s) for s in (".json", ".md", ".png")])


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora compare`."""
    overrides = parse_sets(args.set)
    if args.max_parallel < 1 or args.threads < 1:
        raise InvalidInput("--max-parallel and --threads must be >= 1")
    cfg = load_config(args.params, overrides)
    is_lab = cfg.data.embedded.profile == lab.LAB
    defaults = LAB_PATHS if is_lab else REAL_PATHS if is_gguf(cfg.model.name_or_path) else DEFAULT_PATHS
    root, workdir, out = (Path(a or d) for a, d in zip((args.root, args.workdir, args.out), defaults, strict=True))
    if is_lab:
        argv = sys.argv[sys.argv.index("compare") + 1:] if "compare" in sys.argv else []
        command = " ".join(["python -m milora.cli compare", *(shlex.quote(a) for a in argv)])
        result = compare_lab(args.params, root, args.methods, args.seeds, workdir, out, overrides, args.lrs,
                             args.ranks, args.max_parallel, args.threads, args.quick, command=command,
                             track=not args.no_mlflow, extend=args.extend, grid_seeds=args.grid_seeds)
        print(lab_markdown(result))
    else:
        result = compare(args.params, root, args.methods, args.seeds, workdir, out, overrides)
        print(markdown_table(result["summary"]))
    print(f"wrote {out}.md, {out}.json, {out}.png")
    return 0
