"""The `ingest` stage: materialise `data.source` into `data/raw`, the DVC-versioned raw data.

Sources: `embedded` (the seeded synthetic tasks), a local file or directory, an `s3://bucket/prefix`
(every object under the prefix, through boto3 with the default credential chain and endpoint), or a
Hub dataset id (needs network). The scheduled flow forces this stage on every run
(`dvc repro -f -s ingest`) so it takes the source's current contents; when they are byte-identical,
the `data/raw` hash is unchanged and DVC skips everything downstream.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from milora.core.errors import MissingInput
from milora.core.io import atomic_dir
from milora.pipeline.config import EMBEDDED, Config
from milora.pipeline.paths import Paths

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def _copy_local(src: Path, dest: Path) -> int:
    if src.is_file():
        shutil.copy2(src, dest / src.name)
        return 1
    n = 0
    for f in sorted(src.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(src).parts):
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            n += 1
    return n


def _copy_s3(uri: str, dest: Path) -> int:
    from milora.core.s3 import s3_client, split_s3_uri

    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            rel = key[len(prefix):].lstrip("/") or Path(key).name
            if key.endswith("/") or any(p.startswith(".") for p in Path(rel).parts):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
            n += 1
    if n == 0:
        raise MissingInput(f"data.source {uri}: no objects under that prefix")
    return n


def _copy_hub(dataset_id: str, dest: Path) -> int:
    from milora.data.formats import load_hub_dataset

    ds = load_hub_dataset(dataset_id)
    ds.to_json(str(dest / "data.jsonl"), lines=True, force_ascii=False)
    return 1


def materialise(cfg: Any, dest: Path) -> int:
    """Write the current contents of `data.source` into the empty directory `dest`; return the file count."""
    source = cfg.data.source
    if source == EMBEDDED:
        from milora.data.synthetic import write_task_files

        e = cfg.data.embedded
        return len(write_task_files(dest, e.math_rows, e.choice_rows, e.seed))
    if source.startswith("s3://"):
        return _copy_s3(source, dest)
    path = Path(os.path.expanduser(source))
    if path.exists():
        return _copy_local(path, dest)
    if "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return _copy_hub(source, dest)
    raise MissingInput(
        f"data.source = {source!r}: no such file or directory (give a local file or directory, an "
        "s3://bucket/prefix, a Hub dataset id like 'org/name', or 'embedded')"
    )


def run(cfg: Config, paths: Paths) -> None:
    """Replace `data/raw` with the source's current contents (atomically)."""
    raw = paths.raw_dir
    with atomic_dir(raw) as tmp:
        n = materialise(cfg, tmp)
        if n == 0:
            raise MissingInput(f"data.source = {cfg.data.source!r} holds no data files")
    log.info("ingest: %d file(s) from %s -> %s", n, cfg.data.source, raw)
