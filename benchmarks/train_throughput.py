"""Training throughput and peak memory: MiLoRA vs plain PEFT LoRA, and merged vs base generation speed.

Each measurement runs in its own subprocess (so peak RSS / CUDA peak memory is per method), and the
methods alternate (LoRA, MiLoRA, LoRA, MiLoRA, ...) so machine noise hits both alike. Same model
(a Llama built from a config), same token batches, same rank, same optimizer.

    .venv/bin/python benchmarks/train_throughput.py            # full run, updates docs/benchmarks.md
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Training throughput and inference cost"


def build_model(size: str):
    """A Llama-architecture causal LM from a config (random weights): `small` or `quick`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = {"small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
            "quick": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4)}[size]
    cfg = LlamaConfig(vocab_size=4096, max_position_embeddings=512, num_key_value_heads=dims["num_attention_heads"],
                      **dims)
    return LlamaForCausalLM(cfg)


def _reset_peak_rss() -> None:
    """Return freed heap to the OS (so the adapter init's temporaries don't count), then reset the
    kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    """Peak RSS since the last reset (VmHWM), falling back to the process-lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, size: str, steps: int, batch: int, seq: int, rank: int) -> dict:
    """Train `steps` steps with one adapter method; return tokens/s and peak memory."""
    import torch
    from peft import LoraConfig, get_peft_model

    import milora

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(size).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    else:
        model = milora.init_adapter(model, milora.AdapterConfig(method=method, rank=rank, dropout=0.05,
                                                                target_modules=targets), progress=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 4096, (batch, seq), generator=g).to(device) for _ in range(4)]
    warmup = 2
    _reset_peak_rss()  # measure training, not the adapter init before it
    for i in range(steps + warmup):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mb()
    dt = time.perf_counter() - t0
    return {"method": method, "tokens_per_second": steps * batch * seq / dt, "peak_memory_mb": peak,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def gen_worker(which: str, size: str, new_tokens: int, batch: int, reps: int) -> dict:
    """Greedy generation speed of the base model vs a MiLoRA model merged back into a plain model."""
    import torch

    import milora

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build_model(size)
    if which == "merged":
        model = milora.merge(milora.init_adapter(model, milora.AdapterConfig(rank=16), progress=False), inplace=True)
    model.eval()
    ids = torch.randint(0, 4096, (batch, 16), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
            times.append(time.perf_counter() - t0)
    best = min(times[1:])
    return {"which": which, "tokens_per_second": batch * new_tokens / best}


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_section(text: str, path: Path) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    doc = pattern.sub(text.rstrip() + "\n", doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + text
    path.write_text(doc if doc.endswith("\n") else doc + "\n")


def main() -> None:
    """Measure side by side and write the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--gen-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    size = "quick" if a.quick else "small"
    steps, batch, seq, rank = (3, 2, 64, 4) if a.quick else (12, 8, 256, 16)
    new_tokens, gen_reps = (8, 1) if a.quick else (64, 3)
    if a.worker:
        print(json.dumps(worker(a.worker, size, steps, batch, seq, rank)))
        return
    if a.gen_worker:
        print(json.dumps(gen_worker(a.gen_worker, size, new_tokens, 4, gen_reps)))
        return

    repeats = 1 if a.quick else a.repeats
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"lora": [], "milora": []}
    # ABBA order (LoRA, MiLoRA, MiLoRA, LoRA, ...): a drift of the machine's speed during the run
    # then hits both methods alike instead of always the second one.
    for i in range(repeats):
        for method in ("lora", "milora") if i % 2 == 0 else ("milora", "lora"):
            r = _run(["--worker", method] + (["--quick"] if a.quick else []))
            runs[method].append(r)
            print(f"  {method:7s} {r['tokens_per_second']:9.1f} tok/s  peak {r['peak_memory_mb']:8.1f} MiB", flush=True)
    gens: dict[str, list[float]] = {"base": [], "merged": []}
    for i in range(repeats):
        for which in ("base", "merged") if i % 2 == 0 else ("merged", "base"):
            gens[which].append(_run(["--gen-worker", which] + (["--quick"] if a.quick else []))["tokens_per_second"])

    def med(method: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[method])

    load_after = os.getloadavg()[0]

    def each(method: str) -> str:
        return " / ".join(f"{r['tokens_per_second']:,.0f}" for r in runs[method])

    tps_ratio = med("milora", "tokens_per_second") / med("lora", "tokens_per_second")
    mem_ratio = med("milora", "peak_memory_mb") / med("lora", "peak_memory_mb")
    gen_ratio = statistics.median(gens["merged"]) / statistics.median(gens["base"])
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    cmd = "python benchmarks/train_throughput.py" + (" --quick" if a.quick else "")
    text = f"""{SECTION}

Measured by `{cmd}` on {device}, torch {torch.__version__}: a Llama-architecture model built from a
config ({size}: {sum(p.numel() for p in build_model(size).parameters()) / 1e6:.1f} M parameters), rank {rank} on
q/k/v/up/down, batch {batch} x {seq} tokens, AdamW, {steps} timed steps after 2 warm-up steps; each
measurement in its own process, methods alternating in ABBA order, median of {repeats}. Peak memory is the
process's peak RSS during training (the kernel's high-water mark reset after the adapter init; it
includes the Python/torch runtime) on the CPU, CUDA peak allocated on a GPU.

| | LoRA (PEFT) | MiLoRA | ratio | target |
|---|---|---|---|---|
| training tokens/s | {med('lora', 'tokens_per_second'):,.0f} | {med('milora', 'tokens_per_second'):,.0f} | {tps_ratio:.3f} | >= 0.97 |
| peak memory (MiB) | {med('lora', 'peak_memory_mb'):,.0f} | {med('milora', 'peak_memory_mb'):,.0f} | {mem_ratio:.3f} | <= 1.05 |
| trainable params | {runs['lora'][0]['trainable_params']:,} | {runs['milora'][0]['trainable_params']:,} | | equal |

Generation after merging (greedy, batch 4, {new_tokens} new tokens, best of {gen_reps} per process, median over processes):
base {statistics.median(gens['base']):,.0f} tok/s, merged MiLoRA {statistics.median(gens['merged']):,.0f} tok/s,
ratio {gen_ratio:.3f} (target: equal within noise; the merged model has the base's exact architecture).

Per process (ABBA order: LoRA first in odd-numbered repeats): LoRA {each('lora')} tok/s, MiLoRA {each('milora')} tok/s; generation base
{' / '.join(f'{x:,.0f}' for x in gens['base'])}, merged {' / '.join(f'{x:,.0f}' for x in gens['merged'])} tok/s.
Load average {load_before:.1f} at the start, {load_after:.1f} at the end (this benchmark's own process
included). MiLoRA and LoRA run the same PEFT LoRA layers with the same shapes (only the initial
values of A, B and the frozen weight differ), so their step cost is equal by construction: a ratio away
from 1 is the machine's noise, as the spread between repeats of one method shows.
"""
    print(text)
    if not a.quick or a.out != str(ROOT / "docs" / "benchmarks.md"):
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_section(text, Path(a.out))


if __name__ == "__main__":
    main()
