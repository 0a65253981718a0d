"""SVD-initialisation cache (see `open_cache`)."""

from __future__ import annotations

from typing import Any


def open_cache(spec: Any) -> Any:
    """A cache object from `None`, a local directory, an `s3://bucket/prefix` URI, or a cache object."""
    if spec is None or hasattr(spec, "get_or_compute"):
        return spec
    raise NotImplementedError(f"SVD cache backends are not available yet (got {spec!r})")
