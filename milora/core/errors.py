"""Error kinds and exit codes, defined once for the library, the CLI, the stages and the flow.

| kind        | exit | meaning                                                   | the flow      |
|-------------|------|-----------------------------------------------------------|---------------|
| `user`      | 2    | the user can fix it (params, data, a missing model)       | fails at once |
| `transient` | 1    | a server or endpoint is down; trying again later may work | retries       |
| `internal`  | 3    | anything else: a bug in this project or a library         | fails at once |

A process killed by a signal is `transient` too (a preempted worker, an OOM kill): the stage's checkpoints
let the retry resume.
"""

from __future__ import annotations

import signal
from typing import Literal

ErrorKind = Literal["user", "transient", "internal"]

EXIT_OK = 0
EXIT_TRANSIENT = 1
EXIT_USER = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[str, int] = {"user": EXIT_USER, "transient": EXIT_TRANSIENT, "internal": EXIT_INTERNAL}


class UserError(Exception):
    """An error the user can fix; printed as one line saying what, where and how to fix, no traceback."""


class UnavailableError(ConnectionError):
    """A server, store or endpoint cannot be reached (worth a retry later)."""


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:  # boto3 / botocore connection failures do not derive from ConnectionError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

        types += [BotoConnectionError, ConnectTimeoutError, ReadTimeoutError]
    except ImportError:  # pragma: no cover - botocore is a dependency
        pass
    return tuple(types)


def error_kind(exc: BaseException) -> ErrorKind:
    """The kind of an exception: only `UserError` is the user's; connection failures are transient."""
    if isinstance(exc, UserError):
        return "user"
    if isinstance(exc, _transient_types()):
        return "transient"
    return "internal"


def kind_of_exit(returncode: int) -> ErrorKind:
    """The kind of a failed process from its exit code (negative or 128+N: killed by signal N)."""
    if returncode < 0 or returncode in (128 + signal.SIGKILL, 128 + signal.SIGTERM):
        return "transient"
    for kind, code in EXIT_CODES.items():
        if returncode == code:
            return kind  # type: ignore[return-value]
    return "internal"


class InvalidInput(UserError, ValueError):
    """A bad value, file, row or argument the user gave."""


class MissingInput(UserError, FileNotFoundError):
    """A file, model, stage output or registry entry the user pointed at (or must create first) is not there."""


class Unsupported(UserError, NotImplementedError):
    """The input is valid but not supported (yet); the message says what to do instead."""
