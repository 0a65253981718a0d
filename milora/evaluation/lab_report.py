"""The comparison lab's statistics and report (`milora compare --params params.lab.yaml`).

A trial is one (method, rank, learning rate, seed) run, as `milora.cli.compare.run_trial` records it: `val` and
`test` accuracies, per-example `hits`, `val_nll` (the gold answers' mean NLL on the validation questions),
`forgetting` and its per-document values. This module turns trials into numbers with intervals that mean what they
say (`milora.evaluation.stats`), the forgetting-learning frontier (`milora.evaluation.frontier`), a plain answer to
the lab's question, and the Markdown and PNG of the report.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from milora.data.lab import LEARNING, RETENTION
from milora.evaluation import frontier
from milora.evaluation.stats import paired_t, t_interval, two_level_bootstrap, wilson

TASKS = (*LEARNING, *RETENTION)  # test sets `<task>_test`
VAL_SETS = tuple(f"{t}_val" for t in LEARNING)  # what selects a learning rate (never a test set)
REFERENCE = "milora"
LEARNING_MARGIN = 0.05  # "learns as much": within this much test accuracy of the best method
FRONTIER_LEVELS = 3  # matched-learning levels reported
# The two learning axes of the frontier: validation accuracy (higher is better) and the gold answers' NLL on the
# validation questions (lower is better; negated so that both read "higher is better" in `frontier`).
AXES = {"accuracy": ("validation accuracy", 1.0), "nll": ("validation gold-answer NLL", -1.0)}


def validation_score(trial: Mapping[str, Any]) -> float:
    """What selects a learning rate: the mean accuracy over the learning task's validation sets."""
    return statistics.fmean(trial["val"][name] for name in VAL_SETS)


def learning_of(trial: Mapping[str, Any], axis: str) -> float:
    """A trial's learning on a frontier axis (`AXES`), oriented so that higher is better."""
    return validation_score(trial) if axis == "accuracy" else -trial["val_nll"]


# ----------------------------------------------------------------------------- at the selected rates

def lab_statistics(final: Mapping[str, list[dict[str, Any]]], reference: str = REFERENCE,
                   n_boot: int = 10_000) -> dict[str, Any]:
    """Per method (key): each test accuracy's mean over seeds with its t-interval over seeds and its Wilson interval
    over the test items, and forgetting's t-interval over seeds; per method other than `reference`, the paired
    differences against it: accuracies by a two-level bootstrap (seeds and test items, crossed), forgetting (one
    value per seed) by a paired t over seeds."""
    summary, diffs = {}, {}
    for key, trials in final.items():
        trials = sorted(trials, key=lambda t: t["seed"])
        s: dict[str, dict[str, Any]] = {}
        for task in TASKS:
            s[task] = t_interval([t["test"][task] for t in trials]).as_dict()
            n_items = len(trials[0]["hits"][f"{task}_test"])
            s[task]["items"] = n_items
            s[task]["wilson_low"], s[task]["wilson_high"] = wilson(s[task]["mean"] * n_items, n_items)
        s["forgetting"] = t_interval([t["forgetting"] for t in trials]).as_dict()
        summary[key] = s
    ref = sorted(final[reference], key=lambda t: t["seed"])
    for key, trials in final.items():
        if key == reference:
            continue
        trials = sorted(trials, key=lambda t: t["seed"])
        if [t["seed"] for t in trials] != [t["seed"] for t in ref]:
            raise ValueError(f"{key} and {reference} were run on different seeds: cannot pair them")
        d = {task: two_level_bootstrap([t["hits"][f"{task}_test"] for t in trials],
                                       [t["hits"][f"{task}_test"] for t in ref], n_boot).as_dict() for task in TASKS}
        d["forgetting"] = paired_t([t["forgetting"] for t in trials], [t["forgetting"] for t in ref]).as_dict()
        diffs[key] = d
    return {"summary": summary, "differences": diffs}


# ----------------------------------------------------------------------------- the frontier

def curves(grid: Sequence[Mapping[str, Any]], axis: str) -> dict[str, dict[int, list[frontier.Point]]]:
    """method -> seed -> its grid's (learning rate, learning, forgetting) points on `axis`."""
    out: dict[str, dict[int, list[frontier.Point]]] = {}
    for t in grid:
        out.setdefault(t["method"], {}).setdefault(t["seed"], []).append(
            (t["learning_rate"], learning_of(t, axis), t["forgetting"]))
    return out


def frontier_statistics(grid: Sequence[Mapping[str, Any]], axis: str, reference: str = REFERENCE,
                        n_levels: int = FRONTIER_LEVELS) -> dict[str, Any]:
    """Forgetting at matched learning on `axis`: the levels every (method, seed) curve of the grid brackets, and at
    each, per method the forgetting interpolated on each seed's curve (mean, t-interval over seeds), per other
    method its paired difference to `reference` (paired t over the seeds). Only seeds every method's grid ran on
    count."""
    by_method = curves(grid, axis)
    seeds = sorted(set.intersection(*(set(c) for c in by_method.values()))) if by_method else []
    all_curves = [by_method[m][s] for m in by_method for s in seeds]
    sign = AXES[axis][1]
    levels = []
    for level in frontier.matched_levels(all_curves, n_levels):
        at = {m: [frontier.forgetting_at(by_method[m][s], level) for s in seeds] for m in by_method}
        row: dict[str, Any] = {"level": sign * level,
                               "forgetting": {m: t_interval(v).as_dict() for m, v in at.items()},
                               "differences": {m: paired_t(v, at[reference]).as_dict()
                                               for m, v in at.items() if m != reference}}
        levels.append(row)
    span = frontier.matched_range(all_curves)
    return {"axis": axis, "label": AXES[axis][0], "seeds": seeds, "levels": levels,
            "range": None if span is None else sorted(sign * x for x in span)}


# ----------------------------------------------------------------------------- the answer, stated plainly

def answer(block: Mapping[str, Any], reference: str = REFERENCE) -> list[str]:
    """The lab's question answered from the numbers and nothing else: does `reference` learn within
    `LEARNING_MARGIN` of the best method (test accuracy on the learning task), and does it forget less at
    matched learning? Each sentence claims only what its interval shows."""
    task = LEARNING[0]
    summary, diffs = block["summary"], block["differences"]
    best = max(summary, key=lambda m: summary[m][task]["mean"])
    ref_acc = summary[reference][task]["mean"]
    lines = []
    if best == reference:
        others = "; ".join(f"{m} − milora {_fmt_diff(d[task])}" for m, d in diffs.items())
        lines.append(f"* **Learning.** MiLoRA has the highest {task} test accuracy ({ref_acc:.3f}; {others}).")
    else:
        d = diffs[best][task]  # best - reference
        gap = d["estimate"]
        verdict = ("within {m:.2f} of it: shown (the interval's far end is {hi:+.3f})" if d["ci_high"] <= LEARNING_MARGIN
                   else "within {m:.2f} of it: not shown (the interval reaches {hi:+.3f})")
        lines.append(f"* **Learning.** The best {task} test accuracy is {best}'s, {summary[best][task]['mean']:.3f}; "
                     f"MiLoRA's is {ref_acc:.3f}, {gap:.3f} lower ({best} − milora {_fmt_diff(d)}); MiLoRA learns "
                     + verdict.format(m=LEARNING_MARGIN, hi=d["ci_high"]) + ".")
    for fr in block.get("frontier", {}).values():
        if not fr["levels"]:
            lines.append(f"* **Forgetting at matched {fr['label']}.** No level is reached by every method on every "
                         "seed's grid: no matched comparison.")
            continue
        parts = []
        for m in (k for k in summary if k != reference):
            ds = [lv["differences"][m] for lv in fr["levels"]]
            lower = sum(d["ci_low"] > 0 for d in ds)
            higher = sum(d["ci_high"] < 0 for d in ds)
            text = ", ".join(f"{_fmt_level(fr, lv)}: {_fmt_diff(d, 4)}" for lv, d in zip(fr["levels"], ds, strict=True))
            if lower == len(ds):
                claim = f"MiLoRA forgets less than {m} at every level"
            elif higher == len(ds):
                claim = f"MiLoRA forgets more than {m} at every level"
            elif lower or higher:
                claim = (f"MiLoRA forgets less than {m} at {lower} of {len(ds)} levels and more at {higher}; "
                         "at the others the interval includes 0")
            else:
                claim = f"no difference from {m} is shown at any level (every interval includes 0)"
            parts.append(f"{claim} ({m} − milora, {text})")
        lines.append(f"* **Forgetting at matched {fr['label']}** (over {len(fr['seeds'])} seeds): " + "; ".join(parts)
                     + ".")
    return lines


# ----------------------------------------------------------------------------- rendering

def _fmt_ci(s: Mapping[str, float], digits: int = 3) -> str:
    if math.isnan(s["std"]):
        return f"{s['mean']:.{digits}f}"
    half = (s["ci_high"] - s["ci_low"]) / 2
    return f"{s['mean']:.{digits}f} ± {half:.{digits}f} (sd {s['std']:.{digits}f})"


def _fmt_acc(s: Mapping[str, Any], digits: int = 3) -> str:
    """An accuracy: mean over seeds, its 95 % Wilson interval over the test items, the sd over seeds."""
    spread = "" if math.isnan(s["std"]) else f" (sd {s['std']:.{digits}f})"
    return f"{s['mean']:.{digits}f} [{s['wilson_low']:.2f}, {s['wilson_high']:.2f}]{spread}"


def _fmt_base(accuracy: float, items: int) -> str:
    """The base's accuracy (one model: no seeds) with its 95 % Wilson interval over the test items."""
    low, high = wilson(accuracy * items, items)
    return f"{accuracy:.3f} [{low:.2f}, {high:.2f}]"


def _fmt_diff(d: Mapping[str, Any], digits: int = 3) -> str:
    if math.isnan(d["ci_low"]):  # one seed: no interval over seeds
        return f"{d['estimate']:+.{digits}f} (one seed: no interval)"
    mark = " **sig.**" if d["significant"] else ""
    return f"{d['estimate']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]{mark}"


def _fmt_level(fr: Mapping[str, Any], level: Mapping[str, Any]) -> str:
    return f"at {level['level']:.3f}" if fr["axis"] == "accuracy" else f"at NLL {level['level']:.3f}"


def _frontier_table(fr: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    others = [m for m in methods if m != REFERENCE]
    lines = [f"Forgetting at matched {fr['label']} (each seed's grid interpolated at the level; mean ± 95% t over "
             f"{len(fr['seeds'])} seeds; differences: 95% paired t over the seeds):", ""]
    if not fr["levels"]:
        return [*lines, "No level is bracketed by every method's grid on every seed.", ""]
    lines += ["| level | " + " | ".join(methods) + " | " + " | ".join(f"{m} − milora" for m in others) + " |",
              "|---|" + "---|" * (len(methods) + len(others))]
    for lv in fr["levels"]:
        cells = [_fmt_ci(lv["forgetting"][m], 4) for m in methods]
        cells += [_fmt_diff(lv["differences"][m], 4) for m in others]
        lines.append(f"| {lv['level']:.3f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def lab_markdown(result: Mapping[str, Any]) -> str:
    """The lab's report: design, chance levels, the answer, per-method results at the selected rates, paired
    differences, forgetting at matched learning, and the grid."""
    chance = result["chance"]
    grid_seeds = result["grid_seeds"]
    lines = [
        "# Does MiLoRA learn as much as LoRA and PiSSA while forgetting less?",
        "",
        f"Command (one real run; {result['wall_seconds']:.0f} s wall, {result['trials_run']} trials run, "
        f"{result['trials_total']} in all):",
        "",
        f"```\n{result['command']}\n```",
        "",
        "Tasks (milora.data.lab): fine-tuning teaches **facts** about new people the pretraining corpus never names "
        "(validation and test ask each fact in a question form the fine-tuning rows never use, with fresh option "
        "orders); **retention** is measured on what only pretraining taught: **recall** (the corpus world's facts "
        "asked as the fine-tuning questions are), **cloze** (the same facts in the corpus's phrasing), and "
        "**forgetting** (the held-out pretraining documents' NLL after minus before, averaged over documents).",
        "",
        f"Design: per method (and rank), every learning rate of the grid is trained on seeds "
        f"{', '.join(map(str, grid_seeds))}; the rate with the best mean validation accuracy over them is selected "
        "(learning only: never a retention set, never a test set; when it is the grid's smallest or largest rate the "
        f"grid is extended one step beyond it, up to {result['extend']} times). The other seeds "
        f"({', '.join(map(str, result['seeds'][len(grid_seeds):])) or 'none'}) are trained at that rate only, and "
        f"the test sets are reported over all {len(result['seeds'])} seeds: an accuracy as its mean over seeds "
        "[95% Wilson interval over the test items] (sd over seeds); forgetting as mean ± 95% Student-t half-width "
        "over seeds (sd). Differences against MiLoRA: accuracies with a 95% two-level bootstrap interval "
        f"({result['n_boot']} replicates drawing seeds and test items, the same draws for both methods); forgetting "
        "(one value per seed) with a 95% paired-t interval over seeds; **sig.** marks an interval that excludes 0. "
        "The frontier compares forgetting where the methods have learnt equally much, interpolated on each seed's "
        "grid (milora.evaluation.frontier).",
        "",
        "Chance (uniform pick among the options): " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()) + ".",
        "",
    ]
    for rank, block in result["by_rank"].items():
        methods = list(block["summary"])
        learn = LEARNING[0]
        items = {t: next(iter(block["summary"].values()))[t]["items"] for t in TASKS}
        lines += [f"## Rank {rank}", "", "The answer:", "", *answer(block), "",
                  f"| method | selected lr (grid) | val acc | {learn} test acc (learning; chance "
                  f"{chance[f'{learn}_test']:.2f}) | recall test acc (retention) | cloze test acc (retention) | "
                  "forgetting (Δ held-out NLL) |",
                  "|---|---|---|---|---|---|---|"]
        base = {t: _fmt_base(result["base"][f"{t}_test"], items[t]) for t in TASKS}
        lines.append(f"| base, not fine-tuned | | {result['base'][VAL_SETS[0]]:.3f} | {base[learn]} | "
                     f"{base['recall']} | {base['cloze']} | 0 |")
        for method, s in block["summary"].items():
            sel = block["selection"][method]
            grid = ", ".join(f"{lr:g}" for lr in sel["grid"])
            edge = " at the grid's edge" if sel["learning_rate"] in (min(sel["grid"]), max(sel["grid"])) else ""
            lines.append(f"| {method} | **{sel['learning_rate']:g}**{edge} ({grid}) | {sel['val_score']:.3f} | "
                         f"{_fmt_acc(s[learn])} | {_fmt_acc(s['recall'])} | {_fmt_acc(s['cloze'])} | "
                         f"{_fmt_ci(s['forgetting'], 4)} |")
        lines += ["", "Paired difference against MiLoRA at the selected rates (method minus MiLoRA; accuracies: 95% "
                  "two-level bootstrap; forgetting: 95% paired t over seeds):", "",
                  f"| method | {learn} test acc | recall test acc | cloze test acc | forgetting |", "|---|---|---|---|---|"]
        for method, d in block["differences"].items():
            lines.append(f"| {method} − milora | {_fmt_diff(d[learn])} | {_fmt_diff(d['recall'])} | "
                         f"{_fmt_diff(d['cloze'])} | {_fmt_diff(d['forgetting'], 4)} |")
        lines.append("")
        for fr in block["frontier"].values():
            lines += _frontier_table(fr, methods)
        lines += [f"Grid (mean over seeds {', '.join(map(str, grid_seeds))}); * = selected", "",
                  "| method | lr | val acc | val NLL | recall test acc | forgetting |", "|---|---|---|---|---|---|"]
        for method, sel in block["selection"].items():
            for row in sel["scores"]:
                star = " *" if row["learning_rate"] == sel["learning_rate"] else ""
                lines.append(f"| {method} | {row['learning_rate']:g}{star} | {row['val_score']:.3f} | "
                             f"{row['val_nll']:.3f} | {row['recall']:.3f} | {row['forgetting']:.4f} |")
        lines.append("")
    lines += [f"![the grid and the forgetting-learning frontier]({Path(result['out']).name}.png)", ""]
    return "\n".join(lines)


COLOURS = {"lora": "tab:gray", "pissa": "tab:orange", "milora": "tab:green"}


def lab_plot(result: Mapping[str, Any], grid: Sequence[Mapping[str, Any]]) -> bytes:
    """Three panels for the first rank: validation accuracy against the learning rate (selected rate ringed), and
    the frontier on both learning axes: forgetting against validation accuracy and against the validation NLL
    (each seed's grid a faint line, the mean over seeds a bold one; the matched levels dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rank = next(iter(result["by_rank"]))
    block = result["by_rank"][rank]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    for method, sel in block["selection"].items():
        xs = [r["learning_rate"] for r in sel["scores"]]
        ys = [r["val_score"] for r in sel["scores"]]
        ax.plot(xs, ys, "o-", color=COLOURS.get(method), label=method)
        ax.plot([sel["learning_rate"]], [sel["val_score"]], "o", ms=13, mfc="none", mec=COLOURS.get(method), mew=2)
    ax.axhline(result["chance"][VAL_SETS[0]], ls="--", color="k", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_title("validation accuracy (mean over grid seeds; ring = selected)", fontsize=9)
    ax.legend(fontsize=7)
    mine = [t for t in grid if str(t["rank"]) == str(rank)]
    for ax, (axis, (label, sign)) in zip(axes[1:], AXES.items(), strict=True):
        for method, by_seed in curves(mine, axis).items():
            for pts in by_seed.values():
                pts = sorted(pts)
                ax.plot([sign * p[1] for p in pts], [p[2] for p in pts], "-", color=COLOURS.get(method), alpha=0.25)
            rows = block["selection"][method]["scores"]  # mean over the grid's seeds, by rate
            key = "val_score" if axis == "accuracy" else "val_nll"
            top = max(range(len(rows)), key=lambda i: sign * rows[i][key])  # past it, more rate learns less
            xs, ys = [r[key] for r in rows], [r["forgetting"] for r in rows]
            ax.plot(xs[: top + 1], ys[: top + 1], "o-", color=COLOURS.get(method), label=method)
            ax.plot(xs[top:], ys[top:], "o:", color=COLOURS.get(method), alpha=0.4)
        for lv in block["frontier"][axis]["levels"]:
            ax.axvline(lv["level"], ls="--", color="k", lw=0.6)
        lowest = min((t["forgetting"] for t in mine), default=1.0)
        if lowest > 0:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel(label + (" (lower: learnt more)" if sign < 0 else ""))
        ax.set_ylabel("forgetting (Δ held-out NLL)")
        ax.set_title(f"forgetting vs {label}\n(dashed: matched levels; dotted: rates past the best)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


NOTES_MARK = "<!-- written by hand below: milora compare keeps it when it rewrites the report above -->"


def with_kept_notes(report: str, path: Path) -> str:
    """`report`, followed by what the existing `path` holds below `NOTES_MARK` (a person's reading of the
    results), so that a rerun refreshes the numbers without deleting the reading."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if NOTES_MARK not in old:
        return report
    return report.rstrip("\n") + "\n\n" + NOTES_MARK + old.split(NOTES_MARK, 1)[1]
