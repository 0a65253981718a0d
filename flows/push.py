"""`python -m flows.push ROOT TARGET`: send a stage's outputs (the new data version) to the DVC default remote,
recording the outcome as the `push-data` step's structured result (`milora.pipeline.results`).

`dvc push` itself says what went wrong only in its log text, and exits 255 for anything unexpected, an
unreachable S3 endpoint included; run through DVC's Python API here, the failure keeps its type, so an
endpoint that is down is a transient failure (retried by the flow) and anything else is not.
"""

from __future__ import annotations

import sys
from pathlib import Path

from milora.core.errors import EXIT_CODES, UnavailableError, error_kind
from milora.pipeline.results import one_line, recorded

STEP = "push-data"


def push(root: Path, target: str) -> int:
    """Push `target`'s outputs to the default remote; return the number of files pushed."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remote = repo.config["core"].get("remote")
        try:
            return int(repo.push(targets=[target]) or 0)
        except Exception as exc:
            if error_kind(exc) == "transient":
                raise UnavailableError(
                    f"dvc push {target} to remote {remote!r}: cannot reach it ({type(exc).__name__}: {one_line(exc)}); "
                    "check the remote's endpointurl (or AWS_ENDPOINT_URL_S3) and the network"
                ) from exc
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point: push, record the result, exit with the error kind's code."""
    root, target = (argv if argv is not None else sys.argv[1:])[:2]
    try:
        with recorded(STEP, root) as result:
            result.data = {"target": target, "pushed": push(Path(root), target)}
    except Exception as exc:  # noqa: BLE001 - recorded with its kind; the exit code says it too
        print(f"{STEP}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_CODES[error_kind(exc)]
    print(f"{STEP}: pushed {result.data['pushed']} file(s) of {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
