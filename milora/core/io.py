"""Small file helpers: atomic writes of files and directories (temp + rename), stable JSON, JSONL.

Atomic writes give their results the modes a plain `open(path, "w")` / `mkdir` would (0666 / 0777 less
the umask): the temporary files and directories they start from are private (0600 / 0700), and a
directory built by a library (safetensors writes 0600) is normalised the same way, so every output of a
run has the same, predictable mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored, which is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(executable: bool = False) -> int:
    """The mode a new file gets from `open()` under the current umask (0644 under umask 022)."""
    return (0o777 if executable else 0o666) & ~umask()


def normalise_modes(root: str | os.PathLike[str]) -> None:
    """Give `root` (a file or a directory tree) the modes a plain `open`/`mkdir` would have given it."""
    mask = umask()
    top = Path(root)
    for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        else:
            executable = bool(p.stat().st_mode & 0o111)
            os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically: readers see the old file or the new one, never a partial one.

    The file gets the mode `open(path, "w")` would give it (0644 under umask 022), not mkstemp's 0600."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temp directory next to `dest`; when the block succeeds, swap it in as `dest`.

    Readers see the old directory or the new one, never a half-written one; a failed block leaves `dest`
    untouched and removes the temp directory. The directory and everything in it get umask-default modes."""
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        normalise_modes(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dump_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write deterministic JSON atomically."""
    return atomic_write_text(path, dump_json(obj))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def dump_jsonl(rows: Iterable[Any]) -> str:
    """Deterministic JSON Lines (sorted keys, one row per line)."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def sha256_file(path: Path) -> str:
    """The sha256 of one file's bytes (hex), as `sha256sum` prints it."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(*paths: Path) -> str:
    """sha256 over the bytes of the given files (and of every file under given directories), in order."""
    h = hashlib.sha256()
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
