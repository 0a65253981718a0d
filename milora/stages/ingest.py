"""The `ingest` stage: materialise `data.source` into `data/raw`, the DVC-versioned raw data, and each
benchmark suite of `eval.suites` into `data/suites/<name>/` (what the evaluate stage scores).

Sources: `embedded` (the seeded synthetic tasks, or a generated suite), a local file or directory, an
`s3://bucket/prefix` (every object under the prefix, through boto3 with the default credential chain and
endpoint), or a Hub dataset id (needs network; a suite takes its `split`, the training data `train`). The scheduled flow forces this stage on every run
(`dvc repro -f -s ingest`) so it takes the source's current contents; when they are byte-identical,
the `data/raw` hash is unchanged and DVC skips everything downstream.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from milora.core.errors import InvalidInput, MissingInput
from milora.core.io import atomic_dir, write_json
from milora.pipeline.config import EMBEDDED, Config, SuiteConfig
from milora.pipeline.paths import Paths

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
SUITES_MANIFEST = "suites.json"  # in data/suites: the suites materialised (never empty, so DVC tracks it)


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


def _copy_hub(dataset_id: str, dest: Path, split: str) -> int:
    from milora.data.formats import load_hub_dataset

    ds = load_hub_dataset(dataset_id, split)
    ds.to_json(str(dest / "data.jsonl"), lines=True, force_ascii=False)
    return 1


def copy_source(source: str, dest: Path, key: str = "data.source", split: str = "train") -> int:
    """Copy a file, directory, s3:// prefix or Hub dataset (its `split`) into the empty directory `dest`;
    return the file count. `key` names the params key in errors."""
    if source.startswith("s3://"):
        from milora.core.s3 import download_prefix

        return download_prefix(source, dest)
    path = Path(os.path.expanduser(source))
    if path.exists():
        return _copy_local(path, dest)
    if "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return _copy_hub(source, dest, split)
    raise MissingInput(
        f"{key} = {source!r}: no such file or directory (give a local file or directory, an "
        "s3://bucket/prefix, a Hub dataset id like 'org/name', or 'embedded')"
    )


def materialise(cfg: Any, dest: Path) -> int:
    """Write the current contents of `data.source` into the empty directory `dest`; return the file count."""
    if cfg.data.source == EMBEDDED:
        from milora.data import lab, smol
        from milora.data.synthetic import write_task_files

        e = cfg.data.embedded
        if e.profile == lab.LAB:
            return len(lab.write_train_files(dest, e.new_people, e.seed))
        if e.profile == smol.SMOL:
            return len(smol.write_train_files(dest, e.seed))
        return len(write_task_files(dest, e.math_rows, e.choice_rows, e.seed))
    return copy_source(cfg.data.source, dest)


def materialise_suite(cfg: Config, index: int, suite: SuiteConfig, dest: Path) -> int:
    """Write benchmark suite `suite` (`eval.suites[index]`) into the empty directory `dest`; return the file
    count. An `embedded` suite is generated (`data.embedded.seed`), without the embedded training questions; in
    format `qa` it is the smol profile's learning suite (the held-out phrasing of every trained fact)."""
    key = f"eval.suites[{index}].source"
    if suite.source == EMBEDDED:
        from milora.data import smol, synthetic

        e = cfg.data.embedded
        if suite.format == "qa":
            if e.profile != smol.SMOL:
                raise InvalidInput(f"eval.suites[{index}] ({suite.name}): an embedded qa suite is the smol profile's "
                                   "learning suite; set data.embedded.profile: smol, or give the suite a source file")
            smol.write_suite(dest, e.seed, suite.max_examples)
            return 1
        exclude = synthetic.training_texts(e.math_rows, e.choice_rows, e.seed) if cfg.data.source == EMBEDDED else set()
        if suite.format not in synthetic.SUITE_FORMATS:
            raise InvalidInput(f"eval.suites[{index}] ({suite.name}): an embedded suite is generated in format "
                               f"{', '.join(synthetic.SUITE_FORMATS)} or qa (profile smol), not {suite.format!r}")
        rows = synthetic.suite_rows(suite.format, suite.max_examples or 100, e.seed, exclude)
        synthetic.write_jsonl(dest / "test.jsonl", rows)
        return 1
    return copy_source(suite.source, dest, key, suite.split)


def run(cfg: Config, paths: Paths) -> None:
    """Replace `data/raw` with the source's current contents and `data/suites` with the suites' (atomically)."""
    raw = paths.raw_dir
    with atomic_dir(raw) as tmp:
        n = materialise(cfg, tmp)
        if n == 0:
            raise MissingInput(f"data.source = {cfg.data.source!r} holds no data files")
    log.info("ingest: %d file(s) from %s -> %s", n, cfg.data.source, raw)
    with atomic_dir(paths.suites_dir) as tmp:
        manifest = {}
        for i, suite in enumerate(cfg.eval.suites):
            (tmp / suite.name).mkdir()
            files = materialise_suite(cfg, i, suite, tmp / suite.name)
            manifest[suite.name] = {"format": suite.format, "files": files}
            log.info("ingest: suite %s: %d file(s) from %s -> %s", suite.name, files, suite.source,
                     paths.suites_dir / suite.name)
        write_json(tmp / SUITES_MANIFEST, manifest)
