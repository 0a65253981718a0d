"""`milora stage NAME`: run one pipeline stage (what `dvc.yaml` and the Prefect flow call)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

from milora.pipeline.config import load_config, parse_sets
from milora.stages import STAGES, run_stage


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora stage`."""
    p.add_argument("name", choices=STAGES)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root where stage outputs go (default: .)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key for this run, e.g. -S adapter.rank=16")


def leave_out_bitsandbytes(params: str | os.PathLike[str], overrides: Mapping[str, Any]) -> None:
    """In a process for a run that quantizes nothing (`adapter.quantization: none`), make `bitsandbytes`
    unimportable before torch, transformers and PEFT load: PEFT imports it whenever it is installed, which costs
    ~0.85 s of each stage's ~4 s of imports (it calls `torch.compile` at import, loading dynamo and inductor) and
    logs a warning on CPUs without the optional `kernels` package; nothing in such a run uses it, and PEFT and
    transformers treat it as not installed. For one CLI process only: a library caller (tests, the lab, the
    benchmarks) may quantize later in the same process. A config that does not load is left to the command,
    which reports it."""
    if "bitsandbytes" in sys.modules:
        return
    try:
        quantizing = load_config(params, overrides).adapter.quantization != "none"
    except Exception:  # noqa: BLE001 - the command itself reports the error, with its exit code
        return
    if not quantizing:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # the documented "not importable" marker


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora stage`."""
    overrides = parse_sets(args.set)
    leave_out_bitsandbytes(args.params, overrides)
    run_stage(args.name, args.params, args.root, overrides)
    return 0
