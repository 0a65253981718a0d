"""`milora register`: run the register step (log, register, champion gate) on this project's outputs."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora register`."""
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root holding the pipeline outputs (default: .)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, e.g. -S register.min_delta=0.01")


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora register`: registers, writes metrics/register.json, prints it as one JSON line."""
    from pathlib import Path

    from milora.config import load_config
    from milora.paths import Paths
    from milora.registry import register_run, write_registration
    from milora.stages import parse_sets

    paths = Paths(Path(args.root))
    reg = register_run(load_config(args.params, parse_sets(args.set)), paths)
    write_registration(paths, reg)
    print(json.dumps(reg.to_dict(), sort_keys=True))
    return 0
