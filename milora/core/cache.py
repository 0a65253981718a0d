"""The SVD-initialisation cache: content-addressed, shared across runs, local or on S3.

An entry holds the singular triplets one init needs (plus the full spectrum when the solver produced
it) as safetensors, with a JSON manifest carrying a sha256 of those bytes. The key hashes the weight's
bytes, shape and dtype, the side (minor/principal), the rank and the solver name and version, so a
changed weight can never hit a stale entry. A corrupted or truncated entry is reported, recomputed
and replaced, never loaded. Writes are atomic: a local entry is written to a temporary directory and
renamed into place (two writers of one key: the first rename wins, the other discards its copy); on
S3 the manifest is put after the data, so an entry without a manifest does not exist yet.

Backends: `LocalCache(dir)`, `S3Cache("s3://bucket/prefix")` through boto3 (endpoint, region and
credentials from the environment or profiles), and `TieredCache` (a local directory in front of S3),
which is what an `s3://` spec opens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from milora.core.errors import InvalidInput, UnavailableError
from milora.core.svd import SOLVER_VERSION, Triplets

log = logging.getLogger(__name__)

FORMAT = 1
DATA = "triplets.safetensors"
MANIFEST = "manifest.json"


class CacheUnavailableError(UnavailableError):
    """The cache backend cannot be reached (after bounded retries)."""


class CacheConfigError(InvalidInput):
    """The cache is misconfigured (missing bucket, no or wrong credentials): the message says how to fix it."""


def default_dir() -> Path:
    """`$MILORA_CACHE_DIR` or `~/.cache/milora/svd`."""
    return Path(os.environ.get("MILORA_CACHE_DIR") or Path.home() / ".cache" / "milora" / "svd")


def weight_digest(weight: Tensor) -> str:
    """A 128-bit hash of the weight's raw bytes (any dtype, any device), prefixed by the algorithm.

    xxh3 (~10 GB/s, no copy: a 7B model's targets hash in about a second) when `xxhash` is
    installed, else blake2b (~1 GB/s); the prefix keeps the two from ever sharing a key.
    """
    t = weight.detach().contiguous().cpu().reshape(-1)
    buf = memoryview(t.view(torch.uint8).numpy())
    try:
        import xxhash
    except ImportError:  # pragma: no cover - xxhash is a dependency; blake2b keeps keys sound without it
        return "b2:" + hashlib.blake2b(buf, digest_size=16).hexdigest()
    return "xxh3:" + xxhash.xxh3_128(buf).hexdigest()


def key_family(weight: Tensor, side: str, solver: str) -> str:
    """What the key of every rank of one weight, side and solver shares (hex, 40 chars)."""
    desc = f"{weight_digest(weight)}|{tuple(weight.shape)}|{weight.dtype}|{side}|{solver}|v{SOLVER_VERSION}|f{FORMAT}"
    return hashlib.sha256(desc.encode()).hexdigest()[:40]


def make_key(weight: Tensor, rank: int, side: str, solver: str) -> str:
    """The content address of one entry: `<family>-r<rank>` (an entry of a larger rank serves smaller ones)."""
    return f"{key_family(weight, side, solver)}-r{rank}"


def _key_rank(key: str) -> int | None:
    head, sep, tail = key.rpartition("-r")
    return int(tail) if sep and len(head) == 40 and tail.isdigit() else None


def encode_entry(t: Triplets, key: str, weight: Tensor, rank: int, side: str) -> tuple[bytes, dict[str, Any]]:
    """Safetensors bytes and manifest of one entry."""
    tensors = {"U": t.U.clone().contiguous(), "S": t.S.clone().contiguous(), "Vh": t.Vh.clone().contiguous()}
    if t.spectrum is not None:
        tensors["spectrum"] = t.spectrum.clone().contiguous()  # clones: views of one buffer can't be saved
    data = st_save(tensors, metadata={"solver": t.solver})
    manifest = {
        "format": FORMAT, "key": key, "shape": list(weight.shape), "dtype": str(weight.dtype), "side": side,
        "rank": rank, "stored": int(t.S.numel()), "solver": t.solver, "solver_version": SOLVER_VERSION,
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "created": time.time(),
    }
    return data, manifest


def decode_entry(data: bytes, manifest: dict[str, Any]) -> Triplets:
    """Triplets from entry bytes, after checking the manifest's checksum (ValueError if corrupt)."""
    if manifest.get("format") != FORMAT:
        raise ValueError(f"unknown entry format {manifest.get('format')!r}")
    if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ValueError("checksum mismatch (truncated or corrupted entry)")
    t = st_load(data)
    return Triplets(t["U"], t["S"], t["Vh"], t.get("spectrum"), manifest.get("solver", ""))


@dataclass
class Entry:
    """A cache entry as listed by `ls`."""

    key: str
    manifest: dict[str, Any]

    @property
    def age_days(self) -> float:
        """Days since the entry was written."""
        return (time.time() - float(self.manifest.get("created", 0))) / 86400


class SvdCache:
    """Shared behaviour: `get_or_compute` over a backend's `read` / `write`."""

    name = "cache"

    def read(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        """Raw entry (data, manifest), or None when absent."""
        raise NotImplementedError

    def write(self, key: str, data: bytes, manifest: dict[str, Any]) -> None:
        """Store an entry atomically (a concurrent writer of the same key may win)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove an entry."""
        raise NotImplementedError

    def entries(self) -> Iterator[Entry]:
        """Every entry's manifest."""
        raise NotImplementedError

    def load(self, key: str) -> Triplets | None:
        """The entry's triplets; None when absent or corrupt (corrupt entries are dropped with a warning)."""
        raw = self.read(key)
        if raw is None:
            return None
        try:
            return decode_entry(*raw)
        except Exception as exc:  # any decoding failure is corruption
            log.warning("SVD cache %s: entry %s is corrupt (%s): recomputing it", self.name, key, exc)
            self.delete(key)
            return None

    def store(self, key: str, t: Triplets, weight: Tensor, rank: int, side: str) -> None:
        """Encode and write an entry."""
        data, manifest = encode_entry(t, key, weight, rank, side)
        self.write(key, data, manifest)

    def family_keys(self, family: str) -> list[str]:
        """Keys of the entries of one key family (any rank); may include entries being written."""
        return []

    def get_or_compute(self, weight: Tensor, rank: int, side: str, solver: str,
                       compute: Callable[[], Triplets]) -> tuple[Triplets, str, bool]:
        """(triplets, key, hit): from the cache (an entry of this or a larger rank), or computed and stored.

        An entry of a larger rank holds `stored >= rank` triplets of the same side: the caller takes
        the `rank` it needs (`Triplets.take`). A smaller one cannot serve: that is a miss.
        """
        key = make_key(weight, rank, side, solver)
        family = key.rpartition("-r")[0]
        t = self.load(key)
        if t is not None:
            return t, key, True
        larger = sorted((r, k) for k in self.family_keys(family) if (r := _key_rank(k) or 0) > rank)
        for _, other in larger:
            t = self.load(other)
            if t is not None and t.S.numel() >= rank:
                log.debug("SVD cache %s: rank %d served by entry %s", self.name, rank, other)
                return t, other, True
        t = compute()
        self.store(key, t, weight, rank, side)
        return t, key, False

    def verify(self) -> list[tuple[str, str]]:
        """(key, problem) for every entry that fails its checksum."""
        bad = []
        for e in list(self.entries()):
            raw = self.read(e.key)
            if raw is None:
                bad.append((e.key, "data missing"))
                continue
            try:
                decode_entry(*raw)
            except Exception as exc:
                bad.append((e.key, str(exc)))
        return bad

    def prune(self, older_than_days: float) -> list[str]:
        """Delete entries older than the given age; return their keys."""
        gone = [e.key for e in list(self.entries()) if e.age_days > older_than_days]
        for key in gone:
            self.delete(key)
        return gone


class LocalCache(SvdCache):
    """A directory: `<root>/<key[:2]>/<key>/{triplets.safetensors, manifest.json}`."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(os.path.expanduser(str(root))) if root is not None else default_dir()
        self.name = str(self.root)

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def read(self, key: str) -> tuple[bytes, dict[str, Any]] | None:  # noqa: D102
        d = self._dir(key)
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            return (d / DATA).read_bytes(), manifest
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return b"", {"format": None}  # unreadable manifest: reported as corrupt by `load`

    def write(self, key: str, data: bytes, manifest: dict[str, Any]) -> None:  # noqa: D102
        final = self._dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            (tmp / DATA).write_bytes(data)
            (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
            if final.exists():  # a corrupt entry being replaced, or a concurrent writer that won
                if self.load_quiet(key):
                    return
                shutil.rmtree(final, ignore_errors=True)
            with contextlib.suppress(OSError):  # another process renamed its copy first: keep theirs
                os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_quiet(self, key: str) -> bool:
        """Whether a valid entry exists (no warning, no deletion)."""
        raw = self.read(key)
        if raw is None:
            return False
        try:
            decode_entry(*raw)
            return True
        except Exception:
            return False

    def delete(self, key: str) -> None:  # noqa: D102
        shutil.rmtree(self._dir(key), ignore_errors=True)

    def family_keys(self, family: str) -> list[str]:  # noqa: D102
        return [d.name for d in (self.root / family[:2]).glob(f"{family}-r*") if d.is_dir()]

    def prune(self, older_than_days: float) -> list[str]:
        """Delete entries older than the given age, and temporary directories a killed writer left behind."""
        gone = super().prune(older_than_days)
        cutoff = time.time() - 3600
        for tmp in self.root.glob("*/.*"):
            with contextlib.suppress(OSError):
                if tmp.is_dir() and tmp.stat().st_mtime < cutoff:
                    shutil.rmtree(tmp, ignore_errors=True)
        return gone

    def entries(self) -> Iterator[Entry]:  # noqa: D102
        if not self.root.exists():
            return
        for m in sorted(self.root.glob(f"*/*/{MANIFEST}")):
            try:
                yield Entry(m.parent.name, json.loads(m.read_text()))
            except (OSError, ValueError):
                yield Entry(m.parent.name, {"format": None, "created": 0})


class S3Cache(SvdCache):
    """`s3://bucket/prefix`: objects `<prefix>/<key>/triplets.safetensors` and `.../manifest.json`."""

    def __init__(self, uri: str, client: Any = None):
        from milora.core.s3 import s3_client, split_s3_uri

        self.bucket, self.prefix = split_s3_uri(uri)
        self.name = uri
        self.client = client or s3_client()

    def _key(self, key: str, leaf: str) -> str:
        return f"{self.prefix}/{key}/{leaf}" if self.prefix else f"{key}/{leaf}"

    def _call(self, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        endpoint = self.client.meta.endpoint_url
        try:
            return fn()
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
            raise CacheUnavailableError(
                f"SVD cache {self.name}: cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}). "
                "Check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the network, or set svd.cache to a local "
                "directory."
            ) from None
        except NoCredentialsError:
            raise CacheConfigError(
                f"SVD cache {self.name}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or set svd.cache to a local directory."
            ) from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise CacheConfigError(
                    f"SVD cache {self.name}: bucket {self.bucket!r} does not exist at {endpoint}. Create it "
                    "(aws s3 mb s3://" + self.bucket + ") or fix svd.cache."
                ) from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                raise CacheConfigError(
                    f"SVD cache {self.name}: access denied by {endpoint} ({code}). Check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy."
                ) from None
            raise

    def read(self, key: str) -> tuple[bytes, dict[str, Any]] | None:  # noqa: D102
        from botocore.exceptions import ClientError

        try:
            m = self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key, MANIFEST)))
            manifest = json.loads(m["Body"].read())
            d = self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key, DATA)))
            return d["Body"].read(), manifest
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        except ValueError:
            return b"", {"format": None}

    def write(self, key: str, data: bytes, manifest: dict[str, Any]) -> None:  # noqa: D102
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key, DATA), Body=data))
        body = json.dumps(manifest, sort_keys=True).encode()
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key, MANIFEST), Body=body))

    def delete(self, key: str) -> None:  # noqa: D102
        for leaf in (MANIFEST, DATA):
            self._call(lambda leaf=leaf: self.client.delete_object(Bucket=self.bucket, Key=self._key(key, leaf)))

    def family_keys(self, family: str) -> list[str]:  # noqa: D102
        start = self._key(family, "")[: -1] + "-r"  # "<prefix>/<family>-r"
        page = self._call(lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=start))
        return sorted({o["Key"].split("/")[-2] for o in page.get("Contents", []) if o["Key"].endswith(MANIFEST)})

    def entries(self) -> Iterator[Entry]:  # noqa: D102
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket,
                                                           Prefix=f"{self.prefix}/" if self.prefix else "")))
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/" + MANIFEST):
                    key = obj["Key"].split("/")[-2]
                    body = self._call(lambda k=obj["Key"]: self.client.get_object(Bucket=self.bucket, Key=k))
                    try:
                        yield Entry(key, json.loads(body["Body"].read()))
                    except ValueError:
                        yield Entry(key, {"format": None, "created": 0})


class TieredCache(SvdCache):
    """A local directory in front of a remote cache: reads local first, then remote (copied locally)."""

    def __init__(self, local: LocalCache, remote: SvdCache):
        self.local, self.remote = local, remote
        self.name = f"{local.name} -> {remote.name}"

    def load(self, key: str) -> Triplets | None:  # noqa: D102
        t = self.local.load(key)
        if t is not None:
            return t
        raw = self.remote.read(key)
        if raw is None:
            return None
        try:
            t = decode_entry(*raw)
        except Exception as exc:
            log.warning("SVD cache %s: entry %s is corrupt (%s): recomputing it", self.remote.name, key, exc)
            self.remote.delete(key)
            return None
        self.local.write(key, *raw)
        return t

    def write(self, key: str, data: bytes, manifest: dict[str, Any]) -> None:
        """Local first: a result that took minutes to compute survives an unreachable remote."""
        self.local.write(key, data, manifest)
        self.remote.write(key, data, manifest)

    def read(self, key: str) -> tuple[bytes, dict[str, Any]] | None:  # noqa: D102
        return self.local.read(key) or self.remote.read(key)

    def family_keys(self, family: str) -> list[str]:  # noqa: D102
        return sorted(set(self.local.family_keys(family)) | set(self.remote.family_keys(family)))

    def delete(self, key: str) -> None:  # noqa: D102
        self.local.delete(key)
        self.remote.delete(key)

    def entries(self) -> Iterator[Entry]:  # noqa: D102
        return self.remote.entries()


def open_cache(spec: Any, tiered: bool = True) -> Any:
    """A cache from `None`, a local directory, an `s3://bucket/prefix` URI, or a cache object."""
    if spec is None or hasattr(spec, "get_or_compute"):
        return spec
    spec = str(spec)
    if spec.startswith("s3://"):
        remote = S3Cache(spec)
        if not tiered:
            return remote
        from milora.core.s3 import split_s3_uri

        bucket, prefix = split_s3_uri(spec)
        return TieredCache(LocalCache(default_dir() / "s3" / bucket / prefix), remote)
    if "://" in spec:
        raise InvalidInput(f"svd.cache = {spec!r}: unsupported scheme (use a local directory or s3://bucket/prefix)")
    return LocalCache(spec)
