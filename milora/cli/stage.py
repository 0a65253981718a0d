"""`milora stage NAME`: run one pipeline stage (what `dvc.yaml` and the Prefect flow call)."""

from __future__ import annotations

import argparse

from milora.cli import leave_out_bitsandbytes
from milora.pipeline.config import parse_sets
from milora.stages import STAGES, run_stage


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora stage`."""
    p.add_argument("name", choices=STAGES)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root where stage outputs go (default: .)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key for this run, e.g. -S adapter.rank=16")


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora stage`."""
    overrides = parse_sets(args.set)
    leave_out_bitsandbytes(args.params, overrides)
    run_stage(args.name, args.params, args.root, overrides)
    return 0
