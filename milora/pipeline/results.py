"""Structured results: what a stage (or `register`) did, as a small JSON file the flow, the run summary and
MLflow read. Nobody learns an outcome by parsing log text.

`milora stage NAME` writes `.milora/results/NAME.json` when it starts (`status: running`) and again when it
ends (`ok` or `failed`, with the error's kind, exit code and one-line message). A result still `running`
after its process is gone means the process was killed. The caller's `MILORA_RUN_TOKEN` is copied into the
result, so an orchestrator can tell the result of its own invocation from one an earlier run left (DVC may
skip the stage and never run it). Results are run state, not pipeline outputs: they are not DVC outs and
carry timings freely.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from milora.core.errors import EXIT_CODES, EXIT_OK, ErrorKind, error_kind
from milora.core.io import read_json, write_json
from milora.pipeline.paths import Paths

RESULTS_DIR = Path(".milora") / "results"
TOKEN_ENV = "MILORA_RUN_TOKEN"

Status = Literal["running", "ok", "failed"]


@dataclass
class StepResult:
    """One stage (or `register`) invocation."""

    step: str
    status: Status = "running"
    seconds: float = 0.0
    exit_code: int | None = None
    error_kind: ErrorKind | None = None
    message: str | None = None
    token: str | None = None
    pid: int | None = None
    outputs: list[str] = field(default_factory=list)  # files it wrote, relative to the project root
    metrics: str | None = None  # its DVC metrics file, relative to the project root
    data: dict[str, Any] = field(default_factory=dict)  # step-specific payload (register: the decision)

    @classmethod
    def start(cls, step: str) -> StepResult:
        """A `running` result for this process, carrying the caller's run token."""
        return cls(step=step, token=os.environ.get(TOKEN_ENV) or None, pid=os.getpid())

    def succeed(self, seconds: float) -> StepResult:
        """Mark the step done."""
        self.status, self.seconds, self.exit_code = "ok", round(seconds, 3), EXIT_OK
        return self

    def fail(self, exc: BaseException, seconds: float) -> StepResult:
        """Mark the step failed with the exception's kind, exit code and one-line message."""
        kind = error_kind(exc)
        self.status, self.seconds, self.error_kind = "failed", round(seconds, 3), kind
        self.exit_code = EXIT_CODES[kind]
        self.message = one_line(exc) if kind != "internal" else f"{type(exc).__name__}: {one_line(exc)}"
        return self

    def save(self, root: str | os.PathLike[str]) -> Path:
        """Write `.milora/results/<step>.json` under `root` (atomically)."""
        return write_json(result_path(root, self.step), asdict(self))


@contextlib.contextmanager
def recorded(step: str, root: str | os.PathLike[str]) -> Iterator[StepResult]:
    """Record a step's structured result around the block: `running` now, then `ok`, or `failed` with the
    exception's kind (the exception propagates). The block may fill in `outputs`, `metrics` and `data`."""
    result = StepResult.start(step)
    result.save(root)
    t0 = time.perf_counter()
    try:
        yield result
    except BaseException as exc:
        result.fail(exc, time.perf_counter() - t0).save(root)
        raise
    result.succeed(time.perf_counter() - t0).save(root)


def write_metrics(paths: Paths, name: str, details: Mapping[str, Any], summary: Sequence[str],
                  timings: Sequence[str] = ()) -> None:
    """Write a stage's numbers in three files:

    * `reports/<name>.json`: all of `details` but the run facts (a DVC out: byte-reproducible);
    * `metrics/<name>.json`: the few numbers people compare across runs (`summary`: dotted keys of
      `details`, those present), the DVC metrics file of `dvc metrics show` / `dvc exp show`;
    * `timings/<name>.json`: the run facts (`timings`: dotted keys, each part a shell-style pattern, e.g.
      `per_matrix.*.seconds` or `*_seconds`): wall times, cache hits, memory. They change on every rerun, so they are not a
      stage output (DVC lists them as top-level metrics): rerunning a stage on the same inputs leaves its
      outputs byte-identical and `dvc status` clean.

    MLflow logs every numeric leaf of the report and of the timings."""
    stable, facts = split_keys(details, timings)
    write_json(paths.report(name), stable)
    write_json(paths.metrics(name), pick(stable, summary))
    if facts:
        write_json(paths.timings(name), facts)
    else:
        paths.timings(name).unlink(missing_ok=True)


def pick(details: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The values of `details` at the dotted `keys` (those present), nested as in `details`."""
    picked: dict[str, Any] = {}
    for dotted in keys:
        node: Any = details
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            continue
        *parents, leaf = dotted.split(".")
        target = picked
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = node
    return picked


def split_keys(details: Mapping[str, Any], patterns: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`details` without the keys matching the dotted `patterns`, those keys alone), both nested."""
    def split(node: Mapping[str, Any], pats: list[list[str]]) -> tuple[dict[str, Any], dict[str, Any]]:
        keep: dict[str, Any] = {}
        moved: dict[str, Any] = {}
        for k, v in node.items():
            here = [p for p in pats if fnmatch.fnmatchcase(k, p[0])]
            if any(len(p) == 1 for p in here):
                moved[k] = v
            elif here and isinstance(v, Mapping):
                kept, sub = split(v, [p[1:] for p in here if len(p) > 1])
                keep[k] = kept
                if sub:
                    moved[k] = sub
            else:
                keep[k] = v
        return keep, moved

    return split(details, [p.split(".") for p in patterns])


def one_line(exc: BaseException) -> str:
    """An exception as the one line a user reads: its message, else its type."""
    text = " ".join(str(exc).split()) if str(exc).strip() else ""
    return text or type(exc).__name__


def result_path(root: str | os.PathLike[str], step: str) -> Path:
    """`<root>/.milora/results/<step>.json`."""
    return Path(root) / RESULTS_DIR / f"{step}.json"


def read_result(root: str | os.PathLike[str], step: str, token: str | None = None) -> StepResult | None:
    """The last result of `step` under `root`; with `token`, only if that invocation wrote it."""
    path = result_path(root, step)
    try:
        data = read_json(path)
        result = StepResult(**{k: data[k] for k in StepResult.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if token is not None and result.token != token:
        return None
    return result
