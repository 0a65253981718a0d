"""`milora promote`: a manual champion decision for a registered version, recorded like the automatic one."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora promote`."""
    p.add_argument("--model", default=None, help="registered model name (default: register.model_name)")
    p.add_argument("--version", default=None, help="version to promote (default: the 'challenger' alias)")
    p.add_argument("--force", action="store_true",
                   help="make it the champion even if the gate says no (the gate's verdict is still recorded)")
    p.add_argument("--params", default="params.yaml",
                   help="params file with the register: gate settings (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root (locates the embedded MLflow store; default: .)")


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora promote`: prints the decision as one JSON line; exit 0 if promoted, else 1."""
    from dataclasses import asdict
    from pathlib import Path

    from milora.pipeline.config import Config, load_config
    from milora.tracking.registration import promote

    if Path(args.params).is_file() or args.params != "params.yaml":
        cfg = load_config(args.params)
    else:
        log.info("no params.yaml here: using the default register: settings for the gate")
        cfg = Config()
    name = args.model or cfg.register.model_name
    decision = promote(name, args.version, force=args.force, cfg=cfg, root=args.root)
    print(json.dumps({"model_name": name, **asdict(decision)}, sort_keys=True))
    return 0 if decision.promote else 1
