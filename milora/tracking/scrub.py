"""Credentials never reach MLflow or the logs: every string logged to a run, and every text artifact, is scrubbed
of URL passwords (`user:password@`) and of the values of secret-looking environment variables."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL|SESSION_KEY", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]+@")
_TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".lock", ".dvc", ".yaml", ".yml", ".txt", ".md", ".py"}


def _secret_values() -> dict[str, str]:
    """Values of secret-looking environment variables (name -> value), long enough to be real secrets."""
    out = {}
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) and not name.upper().endswith("_ID") and len(value) >= 8:
            out[name] = value
    return out


def scrub(text: str) -> str:
    """`text` with URL user:password parts and secret environment values replaced by `***`."""
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    for value in sorted(_secret_values().values(), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def redact_uri(uri: str) -> str:
    """A URI safe to print: any user:password part replaced by `***`."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", uri)


def scrubbed_copy(src: Path, workdir: Path) -> Path:
    """`src` (file or directory) if no text file in it holds a credential, else a copy in `workdir` with them scrubbed."""
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    dirty: dict[Path, bytes] = {}
    for f in files:
        if f.suffix.lower() in _TEXT_SUFFIXES:
            raw = f.read_bytes()
            text = raw.decode("utf-8", errors="surrogateescape")
            clean = scrub(text)
            if clean != text:
                dirty[f] = clean.encode("utf-8", errors="surrogateescape")
    if not dirty:
        return src
    workdir.mkdir(parents=True, exist_ok=True)
    dst = Path(tempfile.mkdtemp(prefix="scrubbed-", dir=workdir)) / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    for f, data in dirty.items():
        (dst / f.relative_to(src) if src.is_dir() else dst).write_bytes(data)
        log.warning("%s holds a credential: logging a copy with it replaced by ***", f)
    return dst
