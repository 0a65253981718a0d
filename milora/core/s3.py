"""S3 access through boto3's default chain: endpoint, region and credentials from the environment.

`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` and profiles work unchanged against AWS, MinIO or any S3-compatible server.
Credentials are never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from milora.core.errors import InvalidInput, MissingInput


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> (`bucket`, `some/prefix`)."""
    if not uri.startswith("s3://"):
        raise InvalidInput(f"{uri!r} is not an s3:// URI (expected s3://bucket/prefix)")
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidInput(f"{uri!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def s3_client(max_attempts: int = 3, connect_timeout: float = 5.0, read_timeout: float = 30.0) -> Any:
    """A boto3 S3 client with bounded retries and timeouts (endpoint/region/credentials from the env)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.session.Session().client("s3", config=config)


def download_prefix(uri: str, dest: str | Path) -> int:
    """Download every object under `s3://bucket/prefix` into `dest` (keys relative to the prefix; hidden
    files and folder markers skipped); returns the file count, MissingInput when there is none."""
    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            rel = key[len(prefix):].lstrip("/") or Path(key).name
            if key.endswith("/") or any(p.startswith(".") for p in Path(rel).parts):
                continue
            target = Path(dest) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
            n += 1
    if n == 0:
        raise MissingInput(f"{uri}: no objects under that prefix")
    return n
