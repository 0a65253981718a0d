"""`milora eval`: evaluate any model on benchmark suites and lm-eval tasks, without the pipeline.

    milora eval --model models:/milora@champion --suite gsm8k=data/gsm8k/test.jsonl:gsm8k \\
        --suite boolq=LLM-Adapters/dataset/boolq/test.json --out eval-out
    milora eval --model models/adapter --lm-eval-tasks my_task --lm-eval-include tasks/ --out eval-out

writes `OUT/metrics.json` (`suites.<name>.accuracy`, `n`, `suites_average`, `lm_eval.<task>.<metric>`,
`lm_eval_delta.<task>.<metric>` when the model has a base) and `OUT/<suite>.jsonl` (per-example predictions),
and prints the metrics as one JSON line. A registered model computes at the precision it was
evaluated and is served at (the pyfunc's; fp32 unless `eval.precision` said otherwise), so its predictions are the
evaluate stage's; an adapter or model directory at fp32. `--precision` overrides either.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora eval`."""
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model, a MiLoRA adapter directory or "
                        "a Hugging Face model directory")
    p.add_argument("--base", help="base model directory of an adapter (default: from the adapter's lineage)")
    p.add_argument("--suite", action="append", default=[], metavar="NAME=SOURCE[:FORMAT]",
                   help="a benchmark suite: a file, directory, s3://bucket/prefix or Hub id, and optionally its "
                        "format (alpaca | llm_adapters | metamath | gsm8k | math | chat | qa; default: detected)")
    p.add_argument("--max-examples", type=int, help="the first N examples of each suite (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the model's eval setting, or 48)")
    p.add_argument("--batch-size", type=int, help="prompts per generation batch (default: the model's, or 16)")
    p.add_argument("--max-length", type=int, help="prompt tokens kept (default: the model's data.max_length, or 256)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision (default: a registered model's served precision, else fp32; auto: bf16 "
                        "autocast on a GPU or CPU with native bf16, else fp32)")
    p.add_argument("--lm-eval-tasks", nargs="+", default=[], metavar="TASK", help="lm-evaluation-harness tasks")
    p.add_argument("--lm-eval-include", metavar="DIR", help="a directory of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: the task's)")
    p.add_argument("--lm-eval-limit", type=float, help="lm-eval examples per task (a fraction when < 1)")
    p.add_argument("--lm-eval-batch-size", type=int, default=8, help="lm-eval batch size (default: 8)")
    p.add_argument("--out", required=True, help="output directory for metrics.json and <suite>.jsonl")
    p.add_argument("--root", default=".", help="project root holding the embedded MLflow store (default: .)")


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora eval`."""
    # imported here, not at the top: torch, transformers, MLflow and lm-eval take seconds to import, and
    # `milora --help` imports every command (start-up time)
    from milora.core.errors import InvalidInput
    from milora.core.io import atomic_write_text, dump_jsonl, write_json
    from milora.data.suites import load_suite, parse_suite
    from milora.evaluation import harness
    from milora.evaluation.suites import score_suite, summary
    from milora.model.precision import autocast, resolve_precision, warn_if_emulated
    from milora.pipeline.config import DataConfig, EvalConfig
    from milora.tracking.models import load_eval_model

    if not args.suite and not args.lm_eval_tasks:
        raise InvalidInput("nothing to evaluate: give --suite NAME=SOURCE[:FORMAT] and/or --lm-eval-tasks")
    suites = [parse_suite(s, args.max_examples) for s in args.suite]
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise InvalidInput(f"--suite names must be unique: {', '.join(names)}")
    limit = args.lm_eval_limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    manager = harness.task_manager(args.lm_eval_tasks, args.lm_eval_include) if args.lm_eval_tasks else None
    precision = resolve_precision(args.precision, key="--precision") if args.precision else None
    loaded = load_eval_model(args.model, args.base, args.root)
    precision = precision or warn_if_emulated(loaded.precision)
    records = {s.name: load_suite(s, tokenizer=loaded.tokenizer) for s in suites}  # bad files fail before generating
    d, e = loaded.defaults, EvalConfig()
    max_new_tokens = args.max_new_tokens or d.get("max_new_tokens") or e.max_new_tokens
    batch_size = args.batch_size or d.get("batch_size") or e.batch_size
    max_length = args.max_length or d.get("max_length") or DataConfig().max_length

    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "max_length": max_length,
                "precision": precision}
    with autocast(precision):
        results = [score_suite(loaded.model, loaded.tokenizer, s.name, records[s.name], max_new_tokens, batch_size,
                               max_length) for s in suites]
        metrics = {"model": args.model, **summary(results), "settings": settings}
        if args.lm_eval_tasks:
            lm_args = dict(tasks=args.lm_eval_tasks, num_fewshot=args.num_fewshot, limit=limit,
                           batch_size=args.lm_eval_batch_size, manager=manager)
            base_metrics = (harness.run_lm_eval(loaded.load_base(), loaded.tokenizer, **lm_args) if loaded.load_base
                            else None)
            if hasattr(loaded.model, "merge_adapter"):
                loaded.model.merge_adapter()  # evaluated as an exported merged model computes
            metrics["lm_eval"] = harness.run_lm_eval(loaded.model, loaded.tokenizer, **lm_args)
            if base_metrics is not None:
                metrics["lm_eval_base"] = base_metrics
                metrics["lm_eval_delta"] = harness.deltas(metrics["lm_eval"], base_metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        atomic_write_text(out / f"{r.name}.jsonl", dump_jsonl(r.predictions))
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, sort_keys=True))
    return 0
