"""The pipeline as DVC records it, read through DVC's own Python API (`dvc.repo.Repo`): the one reader of
`dvc.yaml` and `dvc.lock` for the flow and for tracking.

* `stage_order`: the stages of `dvc.yaml` in dependency order (DVC's stage graph; file order among
  independent stages);
* `lock_record`: a stage's `dvc.lock` record (its deps, params and outs hashes), to tell what a repro did;
* `out_hash`: the hash DVC recorded for one output of one stage (e.g. the data version, `ingest`'s `data/raw`);
* `data_hashes`: the data versions a registered model's lineage names;
* `status`: the stages `dvc status` finds out of date;
* `default_remote`: the DVC default remote (`core.remote`);
* `lock_digest`: sha256 of `dvc.lock`, the version of the whole pipeline (its bytes, not parsed).

`import dvc` takes a while: each function imports it when called. A project without `.dvc/` (outputs copied
elsewhere) is read as DVC reads an uninitialised repo: its `dvc.yaml`, `dvc.lock` and `.dvc` files still count.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.core.errors import InvalidInput, MissingInput

if TYPE_CHECKING:
    from dvc.repo import Repo
    from dvc.stage import Stage

log = logging.getLogger(__name__)

PIPELINE_FILE = "dvc.yaml"
LOCK_FILE = "dvc.lock"
# the data versions of a pipeline run: (stage, output, lineage key); a `.dvc` file tracking data/raw wins for raw
DATA_OUTS = (("prepare", "data/prepared", "data_hash"), ("ingest", "data/raw", "raw_data_hash"),
             ("ingest", "data/suites", "suites_data_hash"))
RAW_DVC_FILE = "data/raw.dvc"


@contextlib.contextmanager
def _repo(root: str | os.PathLike[str]) -> Iterator[Repo]:
    from dvc.repo import Repo

    with Repo(str(root), uninitialized=not (Path(root) / ".dvc").is_dir()) as repo:
        yield repo


def _pipeline_stages(repo: Repo) -> list[Stage]:
    """The stages of the project's `dvc.yaml`, in file order (DVC's `.dvc` files and other pipelines left out)."""
    from dvc.stage import PipelineStage

    path = os.path.join(repo.root_dir, PIPELINE_FILE)
    return [s for s in repo.index.stages if isinstance(s, PipelineStage) and s.path == path]


def _out_path(stage: Stage, out: Any) -> str:
    return Path(os.path.relpath(out.fs_path, stage.repo.root_dir)).as_posix()


def stage_order(root: str | os.PathLike[str]) -> list[str]:
    """The stages of `dvc.yaml` in dependency order (file order among independent stages), from DVC's graph."""
    import networkx as nx
    from dvc.exceptions import CyclicGraphError, DvcException

    path = Path(root) / PIPELINE_FILE
    if not path.is_file():
        raise MissingInput(f"{path}: no dvc.yaml (run from the project root, or pass --root)")
    try:
        with _repo(root) as repo:
            stages = _pipeline_stages(repo)
            position = {s: i for i, s in enumerate(stages)}
            needs = repo.index.graph.subgraph(stages).reverse(copy=True)  # DVC's edges point at what a stage needs
            return [s.name for s in nx.lexicographical_topological_sort(needs, key=position.__getitem__)]
    except CyclicGraphError as exc:
        raise InvalidInput(f"{path}: the stages depend on each other in a cycle ({' '.join(str(exc).split())})") \
            from None
    except DvcException as exc:  # a bad dvc.yaml: DVC's own message
        raise InvalidInput(f"{path}: {' '.join(str(exc).split())}") from None


def _stage(repo: Repo, name: str) -> Stage | None:
    return next((s for s in _pipeline_stages(repo) if s.name == name), None)


def lock_record(root: str | os.PathLike[str], stage: str) -> dict[str, Any] | None:
    """The `dvc.lock` record of one stage (its deps, params and outs hashes) as DVC loaded it, or None."""
    if not (Path(root) / LOCK_FILE).is_file():
        return None
    with _repo(root) as repo:
        found = _stage(repo, stage)
        return None if found is None else (found.dvcfile.lockfile_contents.get("stages") or {}).get(stage)


def _hashes(stage: Stage) -> dict[str, str]:
    return {_out_path(stage, o): o.hash_info.value for o in stage.outs if o.hash_info and o.hash_info.value}


def out_hash(root: str | os.PathLike[str], stage: str, out: str) -> str | None:
    """The hash DVC recorded in `dvc.lock` for one output of one stage (e.g. the data version), or None."""
    if not (Path(root) / LOCK_FILE).is_file():
        return None
    with _repo(root) as repo:
        found = _stage(repo, stage)
        return None if found is None else _hashes(found).get(out.rstrip("/"))


def data_hashes(root: str | os.PathLike[str]) -> dict[str, str]:
    """DVC's content hashes of the data: `data_hash` (`prepare`'s `data/prepared`), `raw_data_hash` (`ingest`'s
    `data/raw`, or `data/raw.dvc` where the raw data is tracked by a `.dvc` file), `suites_data_hash`
    (`ingest`'s `data/suites`). Empty (with a log line) when DVC cannot read the project."""
    from dvc.exceptions import DvcException

    root = Path(root)
    if not (root / LOCK_FILE).is_file() and not (root / RAW_DVC_FILE).is_file():
        log.info("no %s: no DVC data hash from it", root / LOCK_FILE)
        return {}
    out: dict[str, str] = {}
    try:
        with _repo(root) as repo:
            by_stage = {s.name: _hashes(s) for s in _pipeline_stages(repo)}
            for stage, path, key in DATA_OUTS:
                if by_stage.get(stage, {}).get(path):
                    out[key] = by_stage[stage][path]
            raw = os.path.join(repo.root_dir, RAW_DVC_FILE)
            for s in repo.index.stages:
                if s.path == raw and s.outs and s.outs[0].hash_info.value:
                    out["raw_data_hash"] = s.outs[0].hash_info.value
    except DvcException as exc:
        log.warning("DVC cannot read %s (%s): no DVC data hash from it", root, " ".join(str(exc).split()))
        return {}
    return out


def status(root: str | os.PathLike[str]) -> dict[str, Any]:
    """What `dvc status` reports for the whole pipeline: {} when every stage is up to date."""
    with _repo(root) as repo:
        return dict(repo.status())


def default_remote(root: str | os.PathLike[str]) -> str | None:
    """The name of the DVC default remote (`core.remote`), or None when there is none."""
    with _repo(root) as repo:
        return repo.config["core"].get("remote") or None


def lock_digest(root: str | os.PathLike[str]) -> str | None:
    """sha256 of `dvc.lock` (every stage's deps, params and outs): the pipeline's current version."""
    path = Path(root) / LOCK_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
