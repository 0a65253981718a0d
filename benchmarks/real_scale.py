"""The whole pipeline on a Llama-2-7B-shaped external base, on the CPU: wall time and peak RSS per stage.

    python benchmarks/real_scale.py                    # builds /tmp/milora-llama2-shaped-2l (2 layers, 1.3 GB) once
    python benchmarks/real_scale.py --layers 1 --quick # a smoke run (small data, 1 step)

What a user does with their own checkpoint: a project whose `params.yaml` points `model.name_or_path` at
the model directory (`model.dtype: bfloat16`), run stage by stage as `dvc repro` / `milora run` would
(`milora stage ingest|base|prepare|svd|train|evaluate`, then `milora register`, by reference). Each step
runs in its own process under a small wrapper that reports the process's wall time and peak RSS
(`getrusage(RUSAGE_CHILDREN).ru_maxrss` of the step's process tree, read by a fresh wrapper per step,
so one step's peak never shows in another's). The model: `benchmarks/llama_shaped.py` (hidden 4096,
intermediate 11008, vocab 32000, bf16 safetensors shards, trained-like spectra). The SVD cache starts
empty (a cold `svd` stage).

Targets (issue 16): no step's peak RSS above 2.5 x the bf16 model bytes + 1 GiB (at most two copies of the
base in memory), with `svd_solver: auto`. The table goes to the "Real scale" section of docs/benchmarks.md.

The evaluate step is measured again under the evaluation settings a user sets (issue 26): forgetting on
held-out text (`data.heldout_text`, a file of long synthetic documents written into the project) with the
base scored too (`eval.score_base`), generation and option log-likelihood (`eval.choice_mode: both`), at
`eval.batch_size` 16; and the whole pipeline once more in a second project under the short settings
`-S data.max_length=64 -S eval.max_examples=4` (with params.yaml's eval.batch_size 16 and max_new_tokens 48),
its evaluate step also with forgetting and score_base. That project reuses the first one's SVD cache (the
short settings are no svd params: its svd step is the cold one of the first table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402

SECTION = "## Real scale: a Llama-2-7B-shaped base on the CPU"
STEPS = ("ingest", "base", "prepare", "svd", "train", "evaluate", "register")
GIB = 2**30

# The measured run: Llama-2-7B layer shapes, MiLoRA r=32 on all 7 projections (the paper's rank), a
# small synthetic data set and a few training steps (CPU), short evaluation.
OVERRIDES = {
    "model.dtype": "bfloat16",
    "adapter.method": "milora",
    "adapter.rank": 32,
    "adapter.svd_solver": "auto",
    "adapter.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "data.embedded.math_rows": 200,
    "data.embedded.choice_rows": 200,
    "data.max_length": 256,
    "data.max_eval_rows": 16,
    "train.max_steps": 3,
    "train.batch_size": 4,
    "train.save_steps": 3,
    "train.logging_steps": 1,
    "train.warmup_steps": 1,
    "train.learning_rate": 3e-4,
    "eval.max_examples": 8,
    "eval.max_new_tokens": 16,
    "eval.batch_size": 8,
    "register.model_name": "milora-real-scale",
    "register.log_lora_export": False,
    "register.log_merged": False,
}
QUICK = {"data.embedded.math_rows": 40, "data.embedded.choice_rows": 40, "train.max_steps": 1,
         "train.save_steps": 1, "eval.max_examples": 2, "eval.max_new_tokens": 4}
# The short settings (issue 26's bar), with params.yaml's evaluation batch and generation budget.
SHORT = {"data.max_length": 64, "eval.max_examples": 4, "eval.batch_size": 16, "eval.max_new_tokens": 48}
HELDOUT_FILE = "heldout.txt"  # in the project: held-out documents for the forgetting metric
HELDOUT_LINES = 48  # 96 windows of <= 256 tokens (6 batches of 16): the memory of a full batch, in minutes


def forgetting(root: Path) -> dict[str, object]:
    """The overrides of an evaluation with forgetting (held-out text) and the base scored on every suite."""
    return {"data.heldout_text": str(root / HELDOUT_FILE), "eval.score_base": True}


def write_heldout(root: Path, documents: int = HELDOUT_LINES) -> Path:
    """`documents` lines of held-out text, each 8 of the synthetic corpus's documents (~270 tokens of the
    model's tokenizer): every line fills a 256-token window, as real held-out text does."""
    from milora.data import synthetic

    _, docs = synthetic.pretraining_corpus(0, 8 * documents, seed=1)
    docs = [" ".join(d.split()) for d in docs]
    path = root / HELDOUT_FILE
    path.write_text("".join(" ".join(docs[i: i + 8]) + "\n" for i in range(0, len(docs), 8)), encoding="utf-8")
    return path

WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({"rc": rc, "seconds": time.perf_counter() - t, "peak_rss_bytes": ru.ru_maxrss * 1024,
           "cpu_seconds": ru.ru_utime + ru.ru_stime}, open(sys.argv[1], "w"))
"""


def project(root: Path, model_dir: Path, quick: bool, extra: dict | None = None, cache: Path | None = None) -> Path:
    """A project directory with the repository's params.yaml and the run's overrides (then `extra`), its SVD
    cache at `cache` (default: in the project), and the held-out text file."""
    from milora.pipeline.config import apply_overrides, dump_params, read_params, validate

    root.mkdir(parents=True, exist_ok=True)
    data = apply_overrides(read_params(ROOT / "params.yaml"),
                           {**OVERRIDES, **(QUICK if quick else {}), **(extra or {}),
                            "model.name_or_path": str(model_dir), "svd.cache": str(cache or root / ".svd_cache")})
    validate(data)
    (root / "params.yaml").write_text(dump_params(data))
    write_heldout(root)
    return root


def measure(step: str, root: Path, log: Path, sets: dict | None = None, label: str | None = None) -> dict:
    """Run one step (`milora stage NAME [-S KEY=VALUE ...]` or `milora register`) in its own process; its wall
    time and peak RSS."""
    milora = [sys.executable, "-m", "milora.cli"]
    cmd = [*milora, "register"] if step == "register" else [*milora, "stage", step]
    for key, value in (sets or {}).items():
        cmd += ["-S", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    label = label or step
    out = root / f".measure-{label.replace(' ', '_')}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "a") as fh:
        fh.write(f"\n===== {label}: {' '.join(cmd[3:])}\n")
        fh.flush()
        subprocess.run([sys.executable, "-c", WRAPPER, str(out), *cmd], cwd=root, env=env, stdout=fh,
                       stderr=subprocess.STDOUT, check=False)
    result = json.loads(out.read_text())
    if result["rc"] != 0:
        raise SystemExit(f"{label} failed (exit {result['rc']}): see {log}")
    print(f"{label:9s} {result['seconds']:7.1f} s  peak RSS {result['peak_rss_bytes'] / GIB:5.2f} GiB", flush=True)
    return result


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}"


def facts(root: Path, stage: str) -> dict:
    """A stage's run facts (timings/STAGE.json, where the timings went; reports/STAGE.json before that)."""
    out: dict = {}
    for folder in ("reports", "timings"):
        path = root / folder / f"{stage}.json"
        if path.exists():
            out.update(json.loads(path.read_text()))
    return out


def limit_of(model_bytes: int) -> float:
    """The target: no step's peak RSS above 2.5 x the bf16 model bytes + 1 GiB."""
    return 2.5 * model_bytes + GIB


def rows_of(results: dict[str, dict], model_bytes: int) -> list[str]:
    """Markdown table rows of `results` (label -> measurement), against the target."""
    limit = limit_of(model_bytes)
    rows = ["| step | wall time | peak RSS | peak RSS / model bytes | within 2.5x + 1 GiB |", "|---|---:|---:|---:|---|"]
    for label, r in results.items():
        rss = r["peak_rss_bytes"]
        rows.append(f"| {label} | {r['seconds']:.1f} s | {rss / GIB:.2f} GiB | {rss / model_bytes:.2f}x | "
                    f"{'yes' if rss <= limit else '**no**'} |")
    return rows


def table(results: dict[str, dict], model_bytes: int, n_params: int, root: Path, loads: list[str],
          layers: int, short: dict[str, dict] | None = None) -> str:
    """The markdown section (`results`: step -> its measurement; `short`: the same under `SHORT`)."""
    limit = limit_of(model_bytes)
    svd_report = json.loads((root / "reports" / "svd.json").read_text())
    per = svd_report.get("per_matrix", {})
    solvers = sorted({m["solver"] for m in per.values()})
    train = facts(root, "train")
    init_seconds = facts(root, "svd").get("init_seconds", 0)
    everything = [*results.values(), *(short or {}).values()]
    worst = max(r["peak_rss_bytes"] for r in everything)
    short_text = [] if not short else [
        "",
        f"The same pipeline in a second project under the short settings ({', '.join(f'`{k}={v}`' for k, v in SHORT.items())}: "
        f"the {SHORT['data.max_length']}-token window and {SHORT['eval.max_examples']} examples per task, with "
        f"params.yaml's evaluation batch and generation budget), its svd step on the first project's SVD cache "
        f"(warm: the short settings are no svd params), and its evaluate step again with forgetting and the base scored:",
        "",
        *rows_of(short, model_bytes),
    ]
    return "\n".join([
        SECTION, "",
        f"Reproduce: `python benchmarks/real_scale.py` (builds the model with `benchmarks/llama_shaped.py` once). "
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU, "
        f"torch {__import__('torch').__version__}; **shared**: load average {loads[0]} at the start, "
        f"{loads[1]} at the end (absolute times are pessimistic; the memory figures are not affected).",
        "",
        f"The base: Llama-2-7B layer shapes (hidden 4096, intermediate 11008, 32 heads, vocab 32000), "
        f"**{layers} decoder layers**, {n_params / 1e6:.0f} M parameters, "
        f"**{model_bytes / GIB:.2f} GiB** of bf16 safetensors (model bytes: {model_bytes:,}). MiLoRA r=32 on "
        f"q, k, v, o, gate, up, down ({len(per)} matrices, `svd_solver: auto` -> {', '.join(solvers)}), "
        f"a cold SVD cache, {OVERRIDES['train.max_steps']} training steps of {OVERRIDES['train.batch_size']} x "
        f"<= {OVERRIDES['data.max_length']} tokens (fp32 compute on bf16 weights), {OVERRIDES['eval.max_examples']} "
        f"evaluation examples per task and {OVERRIDES['eval.batch_size']} per batch, eval.choice_mode "
        f"`both` (generation and option log-likelihood), registration by reference in the embedded MLflow store. "
        f"Each step in its own process (`milora stage NAME`, `milora register`); peak RSS is the step's "
        f"process tree high-water mark (`getrusage`), wall time includes the process start and imports. "
        f"The last row: the evaluate step again with forgetting on held-out text (`data.heldout_text`, "
        f"{HELDOUT_LINES} lines of 8 synthetic documents, ~270 tokens each), `eval.score_base: true` and "
        f"`eval.batch_size: 16`.",
        "",
        *rows_of(results, model_bytes),
        *short_text,
        "",
        f"Target: no step above 2.5 x the model bytes + 1 GiB = {limit / GIB:.2f} GiB; worst step "
        f"{worst / GIB:.2f} GiB ({'met' if worst <= limit else '**not met**'}). SVD init of the "
        f"{len(per)} matrices: {init_seconds:.1f} s inside the svd step"
        + (f"; training {train['train_seconds']:.1f} s" if "train_seconds" in train else "") + ".",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/milora-real-scale"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-short", action="store_true", help="skip the second project under the short settings")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    a = ap.parse_args(argv)
    model_dir = a.model_dir or Path(f"/tmp/milora-llama2-shaped-{a.layers}l")
    if not (model_dir / "model.safetensors.index.json").exists():
        import llama_shaped

        print(f"building {model_dir} ...", flush=True)
        llama_shaped.build(model_dir, layers=a.layers)
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    n_params = index["metadata"]["total_size"] // 2
    import shutil

    short_root = a.work.with_name(a.work.name + "-short")
    for work in (a.work, short_root):
        shutil.rmtree(work, ignore_errors=True)
    root = project(a.work, model_dir, a.quick)
    from milora.core.io import read_json  # noqa: F401 - the package imports (and sets its env) before timing

    loads = [load()]
    results: dict[str, dict] = {}
    log = a.work / "steps.log"
    t0 = time.perf_counter()
    for step in STEPS:
        results[step] = measure(step, root, log)
    results["evaluate + forgetting, score_base, batch 16"] = measure(
        "evaluate", root, log, {**forgetting(root), "eval.batch_size": 16}, "evaluate+forgetting")
    short: dict[str, dict] = {}
    if not a.no_short:
        sroot = project(short_root, model_dir, a.quick, SHORT, cache=root / ".svd_cache")
        for step in STEPS:
            short[step] = measure(step, sroot, log, label=f"short {step}")
        short["evaluate + forgetting, score_base"] = measure("evaluate", sroot, log, forgetting(sroot),
                                                             "short evaluate+forgetting")
    loads.append(load())
    print(f"total {time.perf_counter() - t0:.0f} s; log: {log}")
    text = table(results, model_bytes, n_params, root, loads, a.layers, short)
    (a.work / "results.json").write_text(json.dumps({"steps": results, "short": short, "load": loads,
                                                        "layers": a.layers, "model_bytes": model_bytes}, indent=2) + "\n")
    if not a.quick:
        write_section(a.out, SECTION, text)
        print(f"wrote the '{SECTION[3:]}' section of {a.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
