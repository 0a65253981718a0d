"""The `milora` command line. Each subcommand is one module with `add_arguments(parser)` and
`main(args) -> int`, imported only when it is the command being run (or for `milora --help`): a command
executes no other command's code, which keeps start-up fast and the stages' DVC deps small.

The commands that drive Prefect (`run`, `deploy`) live in the `flows` package, which builds on `milora`;
they plug in through the `milora.commands` entry-point group (see pyproject.toml), so `milora` never
imports `flows`.

Exit codes and error kinds come from `milora.core.errors`: a `UserError` prints one line and exits 2, a
connection failure exits 1 (worth a retry), anything else is a bug: its traceback, then exit 3.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from milora.core.errors import EXIT_CODES, EXIT_INTERRUPTED, error_kind

log = logging.getLogger("milora")

# name -> (module, help); the `milora.commands` entry points add to these.
COMMANDS: dict[str, tuple[str, str]] = {
    "stage": ("milora.cli.stage", "run one pipeline stage (what dvc.yaml and the Prefect flow call)"),
    "register": ("milora.cli.register", "log, register and gate this project's trained model in MLflow"),
    "promote": ("milora.cli.promote", "manual champion decision for a registered model version (--force to override)"),
    "cache": ("milora.cli.cache", "inspect the SVD cache: ls | info KEY | verify | prune --older-than DAYS"),
    "eval": ("milora.cli.eval", "evaluate a registered model, an adapter or a model directory on benchmark suites "
                                "and lm-eval tasks"),
    "compare": ("milora.cli.compare", "LoRA vs PiSSA vs MiLoRA on the same base, data and budget (several seeds)"),
    "demo": ("milora.cli.demo", "adapter round trip on a tiny model built from a config (no data, no network)"),
}
ENTRY_POINT_GROUP = "milora.commands"


def commands() -> dict[str, tuple[str, str]]:
    """Every subcommand: the built-in ones and those plugged in by entry points (help from their `HELP`)."""
    out = {ep.name: (ep.value, "") for ep in entry_points(group=ENTRY_POINT_GROUP)}
    out.update(COMMANDS)
    return out


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `only`, just that command's module is imported (its arguments added)."""
    parser = argparse.ArgumentParser(prog="milora", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in sorted(commands().items()):
        mod = importlib.import_module(module) if only in (None, name) else None
        help_text = help_text or getattr(mod, "HELP", "")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if mod is not None:
            mod.add_arguments(p)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv` (the first argument that is not an option), if it is one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in commands() else None


def _load(module: str, attr: str) -> Callable:
    return getattr(importlib.import_module(module), attr)


def leave_out_bitsandbytes(params: str | os.PathLike[str], overrides: Mapping[str, Any]) -> None:
    """In a process for a run that quantizes nothing (`adapter.quantization: none`), make `bitsandbytes`
    unimportable before torch, transformers and PEFT load: PEFT imports it whenever it is installed, which costs
    ~0.85 s of each stage's ~4 s of imports (it calls `torch.compile` at import, loading dynamo and inductor) and
    logs a warning on CPUs without the optional `kernels` package; nothing in such a run uses it, and PEFT and
    transformers treat it as not installed. For one CLI process only: a library caller (tests, the lab, the
    benchmarks) may quantize later in the same process. A config that does not load is left to the command,
    which reports it."""
    from milora.pipeline.config import load_config

    if "bitsandbytes" in sys.modules:
        return
    try:
        quantizing = load_config(params, overrides).adapter.quantization != "none"
    except Exception:  # noqa: BLE001 - the command itself reports the error, with its exit code
        return
    if not quantizing:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # the documented "not importable" marker


def setup_logging(verbose: bool = False) -> None:
    """Plain timestamped logs on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def report_error(command: str, exc: BaseException, debug: bool = False) -> int:
    """Print an error the way its kind asks for; return its exit code."""
    kind = error_kind(exc)
    if kind == "internal":
        traceback.print_exception(exc, file=sys.stderr)
        print(f"milora {command}: internal error (this is a bug, not a problem with your params or data; "
              f"the traceback is above): {type(exc).__name__}: {exc}", file=sys.stderr)
    else:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"milora {command}: error: {exc}", file=sys.stderr)
        if kind == "user" and not debug:
            print("(run with --debug for the full traceback)", file=sys.stderr)
    return EXIT_CODES[kind]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `milora` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads busy-wait by default: on a small shared machine that makes training ~10x slower
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command(argv)).parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(_load(args._module, "main")(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure leaves with its kind's exit code
        return report_error(args.command, exc, args.debug)
