"""The GPU benchmark: a full-depth Llama-2-7B-shaped model in bf16, MiLoRA init vs PEFT's SVD inits,
training throughput and memory vs PEFT LoRA, and generation of the merged model.

    python benchmarks/gpu.py                  # on a CUDA machine (~15-30 min on one H100/H200-class GPU)
    python benchmarks/gpu.py --dry-run        # CPU, toy size: checks the script end to end (CI runs it)
    bash benchmarks/gpu.sh                    # the same, skipping cleanly without CUDA

Without CUDA (and without `--dry-run`) it prints why and exits 0. Steps, each measured on the GPU with
`torch.cuda.synchronize()` around the timed region and `max_memory_allocated` for memory:

1. **Model**: `LlamaForCausalLM` with Llama-2-7B shapes (32 layers, hidden 4096, intermediate 11008,
   vocab 32000) built on the GPU in bf16, its projections with the trained-like spectra of
   `benchmarks/llama_shaped.py` (built with the GPU's FFT), seeded: no download.
2. **SVD init of all 224 target matrices** (q, k, v, o, gate, up, down x 32 layers) at r = 32:
   `milora.init_adapter` (`svd_solver: auto`, no cache; the device each solve used is reported) vs
   PEFT's `init_lora_weights="pissa"` (a full fp32 SVD of every matrix, principal side) and `"mica"`
   (full SVD, minor side: PEFT's own minor-component init) on copies of the same model.
   `--peft-layers N` times PEFT on the first N layers only and scales to 32 (stated in the table).
3. **Training**: tokens/s and peak memory of MiLoRA vs PEFT LoRA (r = 32, alpha as in the paper, AdamW,
   bf16 weights, batch x seq random tokens), after warm-up steps.
4. **Generation**: the MiLoRA model merged (`milora.merge`) vs the base: greedy tokens/s.

Results: the "GPU" section of docs/benchmarks.md (with the GPU's name) and a JSON next to it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama_shaped  # noqa: E402
from docs_section import write_section  # noqa: E402

SECTION = "## GPU: full-depth Llama-2-7B shape"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000)
TOY = dict(layers=2, hidden=384, intermediate=1024, heads=4, vocab=512)  # hidden 384: `auto` takes gram


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def build(shape: dict, device: torch.device, seed: int = 0):  # noqa: ANN201 - a LlamaForCausalLM
    """The model in bf16 on `device`, projections with trained-like spectra, the rest N(0, 0.02^2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, mod in model.named_modules():
            kind = name.rsplit(".", 1)[-1]
            if kind in TARGETS:
                W = llama_shaped.projection(kind, *mod.weight.shape, llama_shaped._seed(seed, name), device.type)
                mod.weight.copy_(W.to(torch.bfloat16))
                del W
    return model.eval()


def timed(fn, device: torch.device) -> tuple[float, object]:  # noqa: ANN001
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def svd_inits(base, shape: dict, device: torch.device, rank: int, peft_layers: int) -> dict:  # noqa: ANN001
    """MiLoRA `auto` on all targets vs PEFT's pissa / mica (full SVD) on `peft_layers` layers (scaled)."""
    from peft import LoraConfig, get_peft_model

    import milora

    out: dict = {"matrices": shape["layers"] * len(TARGETS)}
    model = copy.deepcopy(base)
    cfg = milora.AdapterConfig(method="milora", rank=rank, target_modules=TARGETS, svd_solver="auto")
    seconds, peft_model = timed(lambda m=model: milora.init_adapter(m, cfg, progress=False), device)
    report = milora.core.adapter.state_of(peft_model).report
    out["milora"] = {"seconds": seconds, "svd_seconds": report.seconds,
                     "solvers": sorted({m.solver for m in report.matrices}),
                     "devices": sorted({m.device or "cache" for m in report.matrices})}
    del model, peft_model
    layers = min(peft_layers, shape["layers"])
    regex = rf"model\.layers\.({'|'.join(map(str, range(layers)))})\..*\.({'|'.join(TARGETS)})"
    for init in ("pissa", "mica"):
        model = copy.deepcopy(base)
        lcfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=regex, init_lora_weights=init, task_type="CAUSAL_LM")
        seconds, _ = timed(lambda lcfg=lcfg, model=model: get_peft_model(model, lcfg), device)
        out[init] = {"seconds": seconds * shape["layers"] / layers, "measured_layers": layers}
        del model
        gc.collect()
    return out


def train(base, method: str, shape: dict, device: torch.device, rank: int, steps: int, batch: int,  # noqa: ANN001
          seq: int) -> dict:
    """Tokens/s and peak memory of `steps` AdamW steps after 2 warm-up steps."""
    from peft import LoraConfig, get_peft_model

    import milora

    model = copy.deepcopy(base)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    else:
        model = milora.init_adapter(model, milora.AdapterConfig(method="milora", rank=rank, target_modules=TARGETS),
                                    progress=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape["vocab"], (batch, seq), generator=g).to(device) for _ in range(2)]
    peak_reset(device)
    warmup = 2
    t0 = 0.0
    for i in range(steps + warmup):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        ids = batches[i % 2]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    dt = time.perf_counter() - t0
    result = {"tokens_per_second": steps * batch * seq / dt, "peak_gib": peak_gib(device),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del model, opt
    gc.collect()
    return result


def generation(base, device: torch.device, rank: int, new_tokens: int, batch: int, vocab: int) -> dict:  # noqa: ANN001
    """Greedy tokens/s of the base and of the merged MiLoRA model (best of 3)."""
    import milora

    ids = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def speed(model) -> float:  # noqa: ANN001
        best = float("inf")
        with torch.no_grad():
            for _ in range(3):
                dt, _ = timed(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                     do_sample=False, pad_token_id=0), device)
                best = min(best, dt)
        return batch * new_tokens / best

    out = {"base": speed(base)}
    merged = milora.merge(milora.init_adapter(copy.deepcopy(base), milora.AdapterConfig(rank=rank,
                                              target_modules=TARGETS), progress=False), inplace=True)
    out["merged_milora"] = speed(merged.eval())
    return out


def section(r: dict) -> str:
    s, t, g = r["svd"], r["train"], r["generate"]
    mil = s["milora"]["seconds"]
    rows = [f"| MiLoRA `auto` ({', '.join(s['milora']['solvers'])} on {', '.join(s['milora']['devices'])}) | "
            f"{mil:.1f} s | 1.0x |"]
    for init in ("pissa", "mica"):
        scaled = "" if s[init]["measured_layers"] == r["shape"]["layers"] else \
            f" (measured on {s[init]['measured_layers']} layers, scaled)"
        rows.append(f"| PEFT `init_lora_weights=\"{init}\"` (full fp32 SVD){scaled} | {s[init]['seconds']:.1f} s | "
                    f"{s[init]['seconds'] / mil:.1f}x |")

    def mem(v: float | None) -> str:
        return f"{v:.2f} GiB" if v is not None else "n/a (CPU)"

    sh = r["shape"]
    return "\n".join([
        SECTION, "",
        f"Reproduce: `bash benchmarks/gpu.sh` (`python benchmarks/gpu.py`). Device: **{r['device_name']}**, "
        f"torch {r['torch']}, {r['date']}{' - **dry run on the CPU at toy size: not a measurement**' if r['dry_run'] else ''}.",
        f"Model: Llama-2-7B shapes x {sh['layers']} layers (hidden {sh['hidden']}, intermediate {sh['intermediate']}, "
        f"vocab {sh['vocab']}), bf16, {r['n_params'] / 1e6:,.0f} M parameters, trained-like spectra "
        f"(`benchmarks/llama_shaped.py`), built on the device in {r['build_seconds']:.0f} s. r = {r['rank']} on "
        f"q, k, v, o, gate, up, down ({s['matrices']} matrices).",
        "",
        "| SVD init of every target matrix | time | vs MiLoRA |", "|---|---:|---:|", *rows, "",
        f"Training ({r['steps']} steps after 2 warm-up, batch {r['batch']} x {r['seq']} tokens, AdamW, bf16 weights):",
        "",
        "| | PEFT LoRA | MiLoRA | ratio |", "|---|---:|---:|---:|",
        f"| tokens/s | {t['lora']['tokens_per_second']:,.0f} | {t['milora']['tokens_per_second']:,.0f} | "
        f"{t['milora']['tokens_per_second'] / t['lora']['tokens_per_second']:.3f} |",
        f"| peak memory | {mem(t['lora']['peak_gib'])} | {mem(t['milora']['peak_gib'])} | "
        + (f"{t['milora']['peak_gib'] / t['lora']['peak_gib']:.3f} |" if t['lora']['peak_gib'] else "|"),
        f"| trainable params | {t['lora']['trainable_params']:,} | {t['milora']['trainable_params']:,} | |",
        "",
        f"Generation (greedy, batch {r['gen_batch']}, {r['new_tokens']} new tokens, best of 3): base "
        f"{g['base']:,.0f} tok/s, merged MiLoRA {g['merged_milora']:,.0f} tok/s (ratio {g['merged_milora'] / g['base']:.3f}).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy size (2 layers, hidden 384): a check, not a measurement")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; 2 in a dry run)")
    ap.add_argument("--peft-layers", type=int, default=32, help="layers PEFT's full-SVD inits are timed on (scaled to all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here: skipping (use --dry-run for a CPU check at toy size)")
        return 0
    device = torch.device("cpu" if a.dry_run else "cuda")
    shape = dict(TOY if a.dry_run else FULL)
    if a.layers:
        shape["layers"] = a.layers
    steps, seq, new_tokens = (2, 64, 8) if a.dry_run else (a.steps, a.seq, 64)
    if a.dry_run:
        a.rank = min(a.rank, 16)
    t_build, base = timed(lambda: build(shape, device), device)
    result: dict = {
        "dry_run": a.dry_run, "device_name": torch.cuda.get_device_name() if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()})", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "shape": shape, "rank": a.rank, "build_seconds": t_build,
        "n_params": sum(p.numel() for p in base.parameters()), "steps": steps, "batch": a.batch, "seq": seq,
        "gen_batch": a.batch, "new_tokens": new_tokens,
    }
    print(f"built {result['n_params'] / 1e6:,.0f} M parameters on {result['device_name']} in {t_build:.0f} s", flush=True)
    result["svd"] = svd_inits(base, shape, device, a.rank, a.peft_layers)
    print("svd:", json.dumps(result["svd"]), flush=True)
    result["train"] = {m: train(base, m, shape, device, a.rank, steps, a.batch, seq) for m in ("lora", "milora")}
    print("train:", json.dumps(result["train"]), flush=True)
    result["generate"] = generation(base, device, a.rank, new_tokens, a.batch, shape["vocab"])
    print("generate:", json.dumps(result["generate"]), flush=True)
    text = section(result)
    write_section(a.out, SECTION, text)
    a.out.with_name("gpu_results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
