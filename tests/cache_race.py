"""Two processes writing the same SVD cache key at the same moment (local directory or S3)."""

from __future__ import annotations

import multiprocessing as mp
import os

import torch

from milora.core.cache import LocalCache, S3Cache
from milora.core.svd import solve


def _writer(spec: str, env: dict[str, str], repeats: int, barrier, out) -> None:
    os.environ.update(env)
    torch.manual_seed(0)
    W = torch.randn(64, 48)
    cache = S3Cache(spec) if spec.startswith("s3://") else LocalCache(spec)
    barrier.wait()  # both processes start computing the same key together
    for _ in range(repeats):
        t, key, _ = cache.get_or_compute(W, 4, "minor", "full", lambda: solve(W, 4, "minor", "full"))
        out.put((key, t.S.tolist()))


def race_two_writers(spec: str, env: dict[str, str] | None = None, repeats: int = 5,
                     timeout: float = 120) -> str:
    """Run two writers of one key in spawned processes; check they got identical results; return the key."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(spec, env or {}, repeats, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=timeout) for _ in range(2 * repeats)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len({k for k, _ in results}) == 1 and all(s == results[0][1] for _, s in results)
    return results[0][0]
