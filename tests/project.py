"""Temporary copies of the project for pipeline tests: test-sized params, fresh git + DVC, isolated caches."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from milora.pipeline.config import apply_overrides

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Small enough for seconds per stage on 2 CPU cores, big enough to learn something.
TEST_OVERRIDES: dict[str, Any] = {
    "model.embedded.vocab_size": 320,
    "model.embedded.hidden_size": 32,
    "model.embedded.intermediate_size": 64,
    "model.embedded.num_layers": 2,
    "model.embedded.num_heads": 2,
    "model.embedded.max_position_embeddings": 256,
    "model.embedded.pretrain_steps": 30,
    "model.embedded.pretrain_batch_size": 8,
    "model.embedded.pretrain_seq_len": 64,
    "data.embedded.math_rows": 60,
    "data.embedded.choice_rows": 60,
    "data.embedded.corpus_documents": 200,
    "data.max_length": 256,
    "data.max_eval_rows": 24,
    "adapter.rank": 4,
    "train.max_steps": 12,
    "train.batch_size": 4,
    "train.save_steps": 4,
    "train.logging_steps": 2,
    "train.warmup_steps": 2,
    "eval.max_new_tokens": 8,
    "eval.max_examples": 8,
    "eval.batch_size": 8,
    "flow.retry_delays": [1],  # a killed stage's retry starts after 1 s, not the 10-30-90 s a deployment waits
}


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, offline, analytics off."""
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
         "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
         "TOKENIZERS_PARALLELISM": "false", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
         "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return {**e, **(extra or {})}


def write_params(root: Path, overrides: dict[str, Any] | None = None, profile: str = "params.yaml") -> Path:
    """params.yaml of the committed project (or of another committed `profile`, e.g. params.smol.yaml) with
    test-sized values and `overrides` applied."""
    data = yaml.safe_load((ROOT / profile).read_text())
    data = apply_overrides(data, {**TEST_OVERRIDES, "svd.cache": str(root / ".svd_cache"), **(overrides or {})})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(cmd: list[str], cwd: Path, check: bool = True, extra_env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in the project copy, capturing output (shown on failure)."""
    p = subprocess.run(cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n"
                             f"{p.stderr[-6000:]}")
    return p


def make_project(dest: Path, overrides: dict[str, Any] | None = None, profile: str = "params.yaml") -> Path:
    """A copy of the git-tracked project files in `dest` with test params (from `profile`), fresh git repo and
    DVC caches."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    write_params(dest, overrides, profile)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "test project"], dest)
    run(["dvc", "config", "--local", "core.site_cache_dir", str(dest / ".dvc-site-cache")], dest)
    run(["dvc", "config", "--local", "cache.dir", str(dest / ".dvc-cache")], dest)
    return dest


_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


def stages_ran(output: str) -> list[str]:
    """Stages `dvc repro` ran, from its output."""
    return _RAN.findall(output)


def stages_skipped(output: str) -> list[str]:
    """Stages `dvc repro` skipped as unchanged, from its output."""
    return _SKIPPED.findall(output)
