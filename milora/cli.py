"""The `milora` command line: `milora run`, `milora stage NAME`, `milora cache ...`, `milora demo`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("milora")

# Each subcommand lives in its own module as `add_arguments(parser)` + `main(args) -> int`, imported
# only when used so that `milora --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("milora.run_cli", "run the whole pipeline as a Prefect flow (no server needed) and summarise it"),
    "deploy": ("milora.deploy_cli", "serve the scheduled nightly-retrain deployment of the pipeline flow"),
    "stage": ("milora.stages", "run one pipeline stage (what dvc.yaml and the Prefect flow call)"),
    "cache": ("milora.cache_cli", "inspect the SVD cache: ls | info KEY | verify | prune --older-than DAYS"),
    "compare": ("milora.compare", "LoRA vs PiSSA vs MiLoRA on the same base, data and budget (several seeds)"),
    "demo": ("milora.demo", "adapter round trip on a tiny model built from a config (no data, no network)"),
    "register": ("milora.register_cli", "log, register and gate this project's trained model in MLflow"),
    "promote": ("milora.promote_cli", "manual champion decision for a registered model version (--force to override)"),
}


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from milora.config import ConfigError

    return (UserError, ConfigError, ValueError, FileNotFoundError, NotImplementedError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="milora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _load(module, "add_arguments")(p)
    return parser


def _load(module: str, attr: str) -> Callable:
    return getattr(importlib.import_module(module), attr)


def setup_logging(verbose: bool = False) -> None:
    """Plain timestamped logs on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `milora` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads busy-wait by default: on a small shared machine that makes training ~10x slower
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(_load(args._module, "main")(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConnectionError as exc:  # a server or S3 endpoint is down: clear message, exit 1 (worth a retry)
        if args.debug:
            raise
        print(f"milora {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except _user_error_types() as exc:
        if args.debug:
            raise
        print(f"milora {args.command}: error: {exc}", file=sys.stderr)
        print("(run with --debug for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
