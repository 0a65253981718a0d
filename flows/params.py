"""A run's parameters: `params.yaml` (or another params file) plus dotted-key overrides.

DVC decides what to re-run by comparing `params.yaml` with what `dvc.lock` recorded, and every
`milora stage` reads `params.yaml`, so a run's overrides must be *in* `params.yaml` while its stages
run, exactly as `dvc exp run -S key=value` does. `run_params` writes them there (a round-trip edit that
keeps the file's comments and layout), and puts the original file back when the run ends, failed or
not, so the committed configuration is what the next scheduled run starts from. The original is first
saved to `.milora/params.yaml.orig`; if a run is killed before it can restore it, the next run (which
holds the workspace lock by then) restores it before anything else.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from milora.core.io import atomic_write_bytes
from milora.pipeline.config import Config, ConfigError, load_config, parse_override_value, set_dotted

log = logging.getLogger(__name__)

PARAMS = "params.yaml"
BACKUP = Path(".milora") / "params.yaml.orig"


def resolve_params_file(root: str | os.PathLike[str], params: str | os.PathLike[str] | None) -> Path:
    """The params file a run starts from: `params` (relative to `root` unless absolute), else params.yaml."""
    p = Path(params) if params else Path(PARAMS)
    return p if p.is_absolute() else Path(root) / p


def _check_overrides(overrides: Any) -> None:
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping of dotted params keys to values, e.g. "
                          f'{{"adapter.rank": 16}}; got {type(overrides).__name__}')
    for key in overrides or {}:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override key {key!r} must be a dotted params key such as 'adapter.rank'")


def parse_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's overrides with every string value read as YAML 1.2, the way `-S KEY=VALUE` and params.yaml
    are (`milora.pipeline.config.parse_override_value`): `{"train.learning_rate": "3e-4"}` (what
    `prefect deployment run --param` or a UI form may send) means 0.0003. Other values (JSON numbers,
    lists) are kept. `milora run -S` passes its values to the flow as the strings typed, so this is the
    one place a run's override values are parsed."""
    _check_overrides(overrides)
    return {k: parse_override_value(v) if isinstance(v, str) else v for k, v in (overrides or {}).items()}


def validate_run_config(root: str | os.PathLike[str], params: str | os.PathLike[str] | None = None,
                        overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated config of a run with already parsed `overrides` (raises `ConfigError` naming key, value
    and what is allowed)."""
    _check_overrides(overrides)
    source = resolve_params_file(root, params)
    backup = Path(root) / BACKUP
    if source == Path(root) / PARAMS and backup.exists():
        source = backup  # a killed run left its overrides in params.yaml: the original is the backup
    return load_config(source, overrides)


def _yaml() -> YAML:
    y = YAML()  # round-trip: keeps comments, order and YAML 1.2 scalars (what DVC itself reads)
    y.preserve_quotes = True
    y.width = 4096
    y.representer.add_representer(  # `null`, as written in params.yaml, rather than an empty value
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def render_params(text: str, overrides: Mapping[str, Any] | None) -> bytes:
    """`text` (a params YAML document) with dotted-key overrides set, comments and layout kept."""
    y = _yaml()
    data = set_dotted(y.load(text) or CommentedMap(), overrides, CommentedMap)
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue().encode("utf-8")


def restore_leftover(root: str | os.PathLike[str]) -> bool:
    """Put back the params.yaml a killed run left overridden; True if there was one."""
    backup = Path(root) / BACKUP
    if not backup.exists():
        return False
    atomic_write_bytes(Path(root) / PARAMS, backup.read_bytes())
    backup.unlink()
    log.warning("restored %s from %s (left by a run that was killed before restoring it)", PARAMS, backup)
    return True


@contextlib.contextmanager
def run_params(root: str | os.PathLike[str], params: str | os.PathLike[str] | None = None,
               overrides: Mapping[str, Any] | None = None) -> Iterator[Config]:
    """While the block runs, `root/params.yaml` holds this run's params; the original comes back after.

    Call it holding the workspace lock. Yields the validated config."""
    root = Path(root)
    restore_leftover(root)
    cfg = validate_run_config(root, params, overrides)
    target = root / PARAMS
    source = resolve_params_file(root, params)
    original = target.read_bytes() if target.exists() else None
    wanted = render_params(source.read_text(encoding="utf-8"), overrides) if overrides else source.read_bytes()
    if wanted == original:
        yield cfg
        return
    backup = root / BACKUP
    if original is not None:
        atomic_write_bytes(backup, original)
    atomic_write_bytes(target, wanted)
    log.info("params.yaml holds this run's params (%s%s) until it ends",
             f"from {source.name}" if source != target else "params.yaml",
             ", overrides " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()) if overrides else "")
    try:
        yield cfg
    finally:
        if original is None:
            target.unlink(missing_ok=True)
        else:
            atomic_write_bytes(target, original)
            backup.unlink(missing_ok=True)
