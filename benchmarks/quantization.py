"""Quantized frozen weights at step 0: QLoRA vs QPiSSA vs QMiLoRA (`adapter.quantization`), on real weights.

    python benchmarks/quantization.py --write    # SmolLM2's 210 target matrices, one Llama-2-7B-shaped layer, logit KL
    python benchmarks/quantization.py --quick    # the same code on the embedded tiny shapes (a smoke run, no write)
    python benchmarks/quantization.py --pipeline --write   # + the real profile with and without nf4 (~40 min)

* **Weight error**: `||W - (deq(Q(R)) + s B0 A0)||_F / ||W||_F` per matrix, with `R = W - s B0 A0` (MiLoRA: the r
  minor triplets; PiSSA: the r principal ones; LoRA: `B0 = 0`, R = W), for nf4 and int8, through
  `milora.core.quantize` (what `init_adapter` does). Also two refinements (LoftQ-style, 5 alternations):
  *minor-subspace refit* (the best fit of `W - deq(Q(R))` inside the minor singular subspaces, so the adapter
  stays MiLoRA's) and *LoftQ* (the top-r SVD of `W - deq(Q(R))`: the factors leave the minor subspace).
* **Output gap**: the mean per-token KL(full || quantized) of SmolLM2's next-token distributions on 24 chat
  prompts (general-knowledge probe questions), all 7 projections or the MLPs targeted (r = 16), the adapter at its
  init; and a control: QLoRA of W plus small Gaussian noise (does any perturbation before rounding do what
  removing the minor part does?).
* **The pipeline** (`--pipeline`): the real profile (params.smol.yaml) as MiLoRA in full precision and as QMiLoRA,
  QPiSSA and QLoRA with nf4, each step in its own process (`real_scale.measure`: wall time, peak RSS); the
  quantized runs reuse the first run's ingest/base/prepare outputs and run svd, train and evaluate. Training
  tokens/s, learning (held-out accuracy), retention (probe answers kept) and self-text forgetting per run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402

from milora.core import quantize  # noqa: E402
from milora.core.svd import compute_factors  # noqa: E402

SECTION = "## Quantized bases: QLoRA, QPiSSA and QMiLoRA at step 0"
PIPELINE_SECTION = "## Quantized bases: the real profile with nf4 (SmolLM2, `params.smol.yaml`)"
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("nf4", "int8")
ITERS = 5
MLP = ["gate_proj", "up_proj", "down_proj"]
PROMPTS = 24  # probe questions for the KL
DITHER = 0.003  # the control's noise, relative to ||W|| (more than the minor part's share on most matrices)


def _error(W: torch.Tensor, BA: torch.Tensor, kind: str) -> tuple[float, torch.Tensor]:
    """(step-0 relative error, deq(Q(W - BA)))."""
    R = W - BA
    layer = quantize.quantized_linear(nn.Linear(W.shape[1], W.shape[0], bias=False), R, kind)
    deq = quantize.dequantized(layer)
    return float((R - deq).norm() / W.norm()), deq


def _orthonormal(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, V_r) of the factors `B = U_r sqrt(S_r)`, `A = sqrt(S_r) V_r^T` (scale 1)."""
    return B / B.norm(dim=0, keepdim=True), (A / A.norm(dim=1, keepdim=True)).T


def matrix_errors(W: torch.Tensor, rank: int) -> dict[str, dict[str, float]]:
    """Relative step-0 error per recipe and quantization type for one weight (`out x in`, fp32)."""
    factors = {side: compute_factors({"w": W}, rank, side, 1.0, "auto", progress=False)[0]["w"]
               for side in ("minor", "principal")}
    products = {"QLoRA": torch.zeros_like(W), "QPiSSA": factors["principal"][1] @ factors["principal"][0],
                "QMiLoRA": factors["minor"][1] @ factors["minor"][0]}
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        row = {name: _error(W, BA, kind)[0] for name, BA in products.items()}
        Um, Vm = _orthonormal(*factors["minor"])
        BA = products["QMiLoRA"]
        for _ in range(ITERS):  # refit inside the minor subspaces: the adapter stays MiLoRA's
            _, deq = _error(W, BA, kind)
            BA = Um @ (Um.T @ (W - deq) @ Vm) @ Vm.T
        row["QMiLoRA + minor refit"] = _error(W, BA, kind)[0]
        BA = products["QPiSSA"]
        for _ in range(ITERS):  # LoftQ: the top-r of what the quantized residual misses
            _, deq = _error(W, BA, kind)
            U, S, V = torch.svd_lowrank(W - deq, q=rank + 10, niter=4)
            BA = (U[:, :rank] * S[:rank]) @ V[:, :rank].T
        row["LoftQ"] = _error(W, BA, kind)[0]
        out[kind] = row
    return out


def smollm2(quick: bool) -> nn.Module:
    if quick:
        from tests.models import tiny_llama

        return tiny_llama()
    from milora.model.gguf import load_gguf, resolve_gguf

    return load_gguf(resolve_gguf("smollm2-135m-instruct"))[0]


def weights_table(model: nn.Module, rank: int, label: str) -> list[str]:
    """Mean and max of each recipe's error over every target matrix of the model."""
    per: dict[tuple[str, str], list[float]] = {}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ALL7]
    for name in names:
        W = model.get_submodule(name).weight.detach().float()
        for kind, row in matrix_errors(W, rank).items():
            for recipe, e in row.items():
                per.setdefault((kind, recipe), []).append(e)
    lines = [f"{label}: its {len(names)} projection matrices (7 per layer), r = {rank}, relative error "
             "`||W - (deq(Q(R)) + s B0 A0)|| / ||W||`, mean (max) over the matrices:", "",
             "| recipe | nf4 | int8 |", "|---|---:|---:|"]
    recipes = list(dict.fromkeys(r for _, r in per))
    for recipe in recipes:
        cells = [f"{statistics.fmean(per[(k, recipe)]):.4f} ({max(per[(k, recipe)]):.4f})" for k in KINDS]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    mean = {key: statistics.fmean(v) for key, v in per.items()}
    for kind in KINDS:
        below = sum(p < q for p, q in zip(per[(kind, "QPiSSA")], per[(kind, "QLoRA")], strict=True))
        lines.append("")
        lines.append(f"{kind}: QPiSSA below QLoRA on {below} of {len(names)} matrices; QMiLoRA / QLoRA mean "
                     f"{mean[(kind, 'QMiLoRA')] / mean[(kind, 'QLoRA')]:.4f}; the minor-subspace refit changes "
                     f"QMiLoRA's mean by {100 * (mean[(kind, 'QMiLoRA + minor refit')] / mean[(kind, 'QMiLoRA')] - 1):+.2f} %,"
                     f" LoftQ changes QPiSSA's by {100 * (mean[(kind, 'LoftQ')] / mean[(kind, 'QPiSSA')] - 1):+.2f} %.")
    return lines


def big_layer_table(rank: int, quick: bool) -> list[str]:
    """One Llama-2-7B-shaped layer (benchmarks/llama_shaped.py's trained-looking spectra)."""
    from llama_shaped import projection

    shapes = {"q_proj": (4096, 4096), "down_proj": (4096, 11008)} if not quick else {"q_proj": (64, 64),
                                                                                     "down_proj": (64, 96)}
    lines = [f"One Llama-2-7B-shaped layer ({', '.join(f'{k} {m}x{n}' for k, (m, n) in shapes.items())}; "
             f"`benchmarks/llama_shaped.py` spectra), r = {rank}:", "",
             "| matrix | recipe | nf4 | int8 |", "|---|---|---:|---:|"]
    for i, (kind, (m, n)) in enumerate(shapes.items()):
        W = projection(kind, m, n, seed=i).float()
        errs = matrix_errors(W, rank)
        for recipe in errs["nf4"]:
            lines.append(f"| {kind} | {recipe} | {errs['nf4'][recipe]:.4f} | {errs['int8'][recipe]:.4f} |")
        del W
    return lines


def _prompts(quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of the first PROMPTS questions of the general-knowledge probe as chat prompts."""
    if quick:
        ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
        return ids, torch.ones_like(ids)
    import json

    from milora.model.gguf import load_gguf, resolve_gguf

    tok = load_gguf(resolve_gguf("smollm2-135m-instruct"))[1]
    lines = (ROOT / "data" / "probes" / "general_knowledge.jsonl").read_text().splitlines()[:PROMPTS]
    chats = [tok.apply_chat_template([{"role": "user", "content": json.loads(x)["question"]}], tokenize=False,
                                     add_generation_prompt=True) for x in lines]
    enc = tok(chats, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def kl_table(model: nn.Module, rank: int, quick: bool) -> list[str]:
    """Mean per-token KL(full || quantized), the adapter at its init, and a dither control for QLoRA."""
    import milora

    ids, mask = _prompts(quick)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)

    def kl(base: nn.Module, method: str, kind: str, targets: list[str]) -> str:
        cfg = milora.AdapterConfig(method=method, rank=rank, dropout=0.0, quantization=kind, target_modules=targets)
        tuned = milora.init_adapter(base, cfg, progress=False).eval()
        with torch.no_grad():
            out = torch.log_softmax(tuned(input_ids=ids, attention_mask=mask).logits.float(), -1)
        return f"{float(((ref.exp() * (ref - out)).sum(-1) * mask).sum() / mask.sum()):.3g}"

    lines = [f"Mean per-token KL(full || quantized) of the next-token distribution on {ids.shape[0]} chat prompts "
             f"({int(mask.sum())} tokens; the first questions of data/probes/general_knowledge.jsonl), r = {rank}, "
             "the adapter at its init:", "",
             "| recipe | nf4, all 7 projections | nf4, MLPs (gate, up, down) | int8, all 7 projections |",
             "|---|---:|---:|---:|"]
    for method, label in (("lora", "QLoRA"), ("pissa", "QPiSSA"), ("milora", "QMiLoRA")):
        cells = [kl(copy.deepcopy(model), method, kind, targets)
                 for kind, targets in (("nf4", ALL7), ("nf4", MLP), ("int8", ALL7))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    noisy, gen = copy.deepcopy(model), torch.Generator().manual_seed(0)
    with torch.no_grad():  # does any small change of W before rounding do what removing the minor part does?
        for name, m in noisy.named_modules():
            if name.rsplit(".", 1)[-1] in ALL7:
                m.weight.add_(torch.randn(m.weight.shape, generator=gen) * (DITHER * m.weight.norm() / m.weight.numel() ** 0.5))
    lines.append(f"| control: QLoRA of W + Gaussian noise ({DITHER:.1%} of ‖W‖) | {kl(noisy, 'lora', 'nf4', ALL7)} | | |")
    return lines


PIPELINE_RUNS = (("MiLoRA (full precision)", "milora", "none"), ("QMiLoRA nf4", "milora", "nf4"),
                 ("QPiSSA nf4", "pissa", "nf4"), ("QLoRA nf4", "lora", "nf4"))
SHARED = ("data", "models/base", "models/base.json", "models/self_text.jsonl", "models/rehearsal.jsonl", "reports",
          "metrics")


def pipeline(work: Path) -> list[str]:
    """The real profile's steps with and without nf4: wall time, peak RSS, throughput and what was learnt."""
    import json
    import shutil

    import yaml
    from real_model import project
    from real_scale import GIB, STEPS, measure

    from milora.pipeline.config import apply_overrides

    rows = ["| run | " + " | ".join(f"{s} (s / GiB)" for s in STEPS[3:6]) + " | train tokens/s | learning "
            "(base -> tuned) | retention | forgetting (nats) |", "|---|" + "---:|" * 7]
    first: Path | None = None
    for label, method, quant in PIPELINE_RUNS:
        w = work / method / quant
        project(w)
        params = w / "params.yaml"
        data = apply_overrides(yaml.safe_load(params.read_text()), {"adapter.method": method,
                                                                    "adapter.quantization": quant})
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        if first is None:
            steps = STEPS[:6]
            first = w
        else:
            steps = STEPS[3:6]
            for rel in SHARED:
                src = first / rel
                if src.is_dir():
                    shutil.copytree(src, w / rel, dirs_exist_ok=True)
                elif src.is_file():
                    (w / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, w / rel)
        print(f"== {label}", flush=True)
        res = {s: measure(s, w, w / "steps.log") for s in steps}
        ev = json.loads((w / "reports" / "eval.json").read_text())
        tps = json.loads((w / "timings" / "train.json").read_text())["tokens_per_second"]
        learn = ev["suites"]["learning"]
        cells = [f"{res[s]['seconds']:.0f} / {res[s]['peak_rss_bytes'] / GIB:.2f}" for s in STEPS[3:6]]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {tps:.0f} | {learn['base_accuracy']:.3f} -> "
                    f"{learn['accuracy']:.3f} (n = {learn['n']}) | {ev['retention']:.3f} | {ev['forgetting']:+.3f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a smoke run of the same code")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--pipeline", action="store_true", help="also run the real profile with and without nf4")
    ap.add_argument("--work", type=Path, default=Path("/tmp/milora-quantization"))
    ap.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    ap.add_argument("--out", type=Path, default=None, help="markdown file to update instead")
    a = ap.parse_args(argv)
    rank = 4 if a.quick else a.rank
    start = time.perf_counter()
    model = smollm2(a.quick)
    text = [SECTION, "",
            "`python benchmarks/quantization.py --write`: what `adapter.quantization` costs in accuracy before any "
            "training. The SVD runs on the full-precision weight; the frozen residual is quantized with bitsandbytes "
            "(nf4: 4-bit NormalFloat, blocks of 64, double-quantized scales; int8: LLM.int8() rows).", "",
            *weights_table(model, rank, "the tiny test Llama" if a.quick else "SmolLM2-135M-Instruct"), "",
            *big_layer_table(rank, a.quick), "", *kl_table(model, rank, a.quick), "",
            f"Measured in {time.perf_counter() - start:.0f} s on this machine (torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)."]
    sections = [(SECTION, text)]
    if a.pipeline:
        start = time.perf_counter()
        sections.append((PIPELINE_SECTION, [
            PIPELINE_SECTION, "",
            "`python benchmarks/quantization.py --pipeline --write`. Step wall time and peak RSS (each step in its own "
            "process), training tokens/s, and what each run learnt, retained and forgot. One seed each, so the "
            "accuracies are single measurements; learning n is small, so read differences of a few answers as noise.",
            "", *pipeline(a.work), "",
            f"Measured in {time.perf_counter() - start:.0f} s on this machine (torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)."]))
    out = a.out or (ROOT / "docs" / "benchmarks.md" if a.write and not a.quick else None)
    for title, lines in sections:
        print("\n".join(lines))
        if out is not None:
            write_section(out, title, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
