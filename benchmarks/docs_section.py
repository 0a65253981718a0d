"""Replace (or append) one `## ` section of a markdown file such as docs/benchmarks.md, keeping the others."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, title: str, text: str) -> None:
    """Put `text` (which starts with the `title` line) in place of the section `title`, or append it."""
    from milora.core.io import atomic_write_text

    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = text.rstrip("\n") + "\n"
    if pattern.search(old):
        new = pattern.sub(lambda _: body + "\n", old).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + "\n\n" + body
    atomic_write_text(path, new)
