"""`milora register`: run the register step (log, register, champion gate) on this project's outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from milora.cli import leave_out_bitsandbytes
from milora.pipeline.config import load_config, parse_sets
from milora.pipeline.paths import Paths
from milora.pipeline.results import recorded

REGISTER = "register"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora register`."""
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root holding the pipeline outputs (default: .)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, e.g. -S register.min_delta=0.01")


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora register`: registers, writes metrics/register.json and the step's structured
    result (`.milora/results/register.json`, the decision under `data`), prints the decision as one JSON line."""
    overrides = parse_sets(args.set)
    leave_out_bitsandbytes(args.params, overrides)
    # imported here, not at the top: MLflow takes seconds to import, and `milora --help` imports every command
    from milora.tracking.registration import register_stage

    paths = Paths(Path(args.root))
    with recorded(REGISTER, paths.root) as result:
        reg = register_stage(load_config(args.params, overrides), paths)
        result.metrics = paths.metrics("register").relative_to(paths.root).as_posix()
        result.data = reg.to_dict()
    print(json.dumps(reg.to_dict(), sort_keys=True))
    return 0
