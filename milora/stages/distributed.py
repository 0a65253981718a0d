"""Stages under torchrun: DDP processes on one node, or several nodes joined by a rendezvous.

`train.processes > 1` or `train.nnodes > 1` make the `svd` and `train` stages re-launch themselves under
`python -m torch.distributed.run` with the run's resolved config (written to `.milora/<stage>_dist_params.yaml`):

* one node: `--standalone --nproc_per_node P`;
* several nodes: `--nnodes N --nproc_per_node P --rdzv_backend c10d|static --rdzv_endpoint HOST:PORT
  --rdzv_id milora-<stage>` (and `--node_rank K` under `static`); every node runs the same stage with the same
  params, each in its own workspace, and the stage starts when all N nodes have joined.

A stage already under a launcher (`torchrun`, `accelerate launch`, a cluster's job controller: `WORLD_SIZE` is
set) runs as is. Under several nodes the rendezvous may give global rank 0 to any node, so the *local* rank 0 of
every node writes the stage's outputs into its node's workspace (the ranks hold identical results, checked), and
training checkpoints are saved on each node, so that any node resumes from its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch

from milora.core.io import atomic_write_text
from milora.pipeline.config import Config, dump_params
from milora.pipeline.paths import Paths

log = logging.getLogger(__name__)


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch / a cluster launcher."""
    return "WORLD_SIZE" in os.environ


def wants_launch(cfg: Config) -> bool:
    """True when the stage must re-launch itself under torchrun (several processes or nodes, no launcher yet)."""
    return (cfg.train.processes > 1 or cfg.train.nnodes > 1) and not under_launcher()


def is_local_main() -> bool:
    """True in the process that writes this node's outputs (local rank 0; the only process without a launcher)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def multi_node() -> bool:
    """True when the processes of this run span more than one node (from the launcher's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def torchrun_args(cfg: Config, stage: str) -> list[str]:
    """The torchrun options for this run's processes and nodes."""
    t = cfg.train
    if t.nnodes == 1:
        return ["--standalone", "--nproc_per_node", str(t.processes)]
    args = ["--nnodes", str(t.nnodes), "--nproc_per_node", str(t.processes), "--rdzv_backend", t.rdzv_backend,
            "--rdzv_endpoint", str(t.rdzv_endpoint), "--rdzv_id", f"milora-{stage}"]
    if t.rdzv_backend == "static":
        args += ["--node_rank", str(t.node_rank)]
    return args


def launch(cfg: Config, paths: Paths, stage: str) -> None:
    """Run `milora stage STAGE` under torchrun with the same, already resolved config; raise if it fails."""
    params = paths.root / ".milora" / f"{stage}_dist_params.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(params, dump_params(cfg.model_dump(mode="json")))
    env = dict(os.environ)
    if not torch.cuda.is_available():  # CPU ranks on this node share its cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.train.processes)))
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, stage),
           "-m", "milora.cli", "stage", stage, "--params", str(params), "--root", str(paths.root)]
    t = cfg.train
    where = f"node {t.node_rank} of {t.nnodes}, rendezvous {t.rdzv_endpoint}" if t.nnodes > 1 else "this node"
    log.info("%s: launching %d process(es) on %s: %s", stage, t.processes, where, " ".join(cmd))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"the {stage} stage's torchrun ({t.processes} process(es) on {where}) failed with exit "
                           f"status {rc}; see its log above")


def check_own_workspaces(root: os.PathLike[str] | str) -> None:
    """Under several nodes, fail unless every node works in its own workspace (not one shared directory).

    Each node's local rank 0 writes its node's outputs and checkpoints: nodes sharing one directory would write
    over each other. The local rank 0s each drop a marker named after their node into `.milora/`, with a token
    of this run; a node that then sees another node's marker shares its workspace."""
    import uuid
    from pathlib import Path

    import torch.distributed as dist

    if not (multi_node() and dist.is_available() and dist.is_initialized()):
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marks = Path(root) / ".milora" / "nodes"
    node = os.environ.get("GROUP_RANK", "0")
    if is_local_main():
        marks.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marks / f"node-{node}", token[0])
    dist.barrier()
    shared = []
    if is_local_main():
        for mark in marks.glob("node-*"):
            try:
                if mark.name != f"node-{node}" and mark.read_text() == token[0]:
                    shared.append(mark.name.removeprefix("node-"))
            except OSError:
                continue
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, shared)
    dist.barrier()
    if is_local_main():
        (marks / f"node-{node}").unlink(missing_ok=True)
    clashes = sorted({n for s in everyone for n in (s or [])})
    if clashes:
        from milora.core.errors import InvalidInput

        raise InvalidInput(f"{Path(root).resolve()}: nodes {', '.join(clashes)} and others share this workspace; "
                           "under train.nnodes > 1 every node needs its own checkout of the project (each node "
                           "writes its outputs and checkpoints there)")


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Under a launcher with several processes, a gloo process group for the block (unless one exists), so that
    collective steps such as the SVD init's split of the matrices (`milora.core.svd.compute_factors`) see the
    other ranks; outside a launcher, nothing."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")  # env:// from the launcher (MASTER_ADDR/PORT, RANK, WORLD_SIZE)
    try:
        yield
    finally:
        dist.destroy_process_group()


def same_on_every_rank(value: Any, what: str) -> Any:
    """`value`, checked equal on every rank (a no-op without a process group); raise naming what differs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    if any(v != everyone[0] for v in everyone):
        from milora.core.errors import InvalidInput

        raise InvalidInput(f"the ranks disagree on {what}: {sorted({str(v) for v in everyone})}; every node must "
                           "run the same params on the same inputs (each node's workspace at the same commit)")
    return value
