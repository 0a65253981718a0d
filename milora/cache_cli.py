"""`milora cache ls | info KEY | verify | prune --older-than DAYS` on a local or S3 SVD cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora cache`."""
    p.add_argument("action", choices=["ls", "info", "verify", "prune"])
    p.add_argument("key", nargs="?", help="entry key (for info)")
    p.add_argument("--cache", help="a directory or s3://bucket/prefix (default: svd.cache of ./params.yaml, "
                                   "else ~/.cache/milora/svd)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="for prune: delete entries older than this")


def _spec(arg: str | None) -> str:
    from milora.cache import default_dir
    from milora.config import load_config

    if arg:
        return arg
    if Path("params.yaml").exists():
        cache = load_config("params.yaml").svd.cache
        if cache:
            return cache
    return str(default_dir())


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora cache`."""
    from milora.cache import decode_entry, open_cache

    cache = open_cache(_spec(args.cache), tiered=False)
    if args.action == "ls":
        entries = sorted(cache.entries(), key=lambda e: e.manifest.get("created", 0))
        print(f"{'key':40s}  {'shape':>12s}  side       rank  solver    MiB    age(d)")
        for e in entries:
            m = e.manifest
            shape = "x".join(str(x) for x in m.get("shape", []))
            print(f"{e.key:40s}  {shape:>12s}  {m.get('side', '?'):9s}  {m.get('rank', '?'):>4}  "
                  f"{m.get('solver', '?'):8s}  {m.get('bytes', 0) / 2**20:5.2f}  {e.age_days:6.1f}")
        total = sum(e.manifest.get("bytes", 0) for e in entries)
        print(f"{len(entries)} entries, {total / 2**20:.2f} MiB in {cache.name}")
        return 0
    if args.action == "info":
        if not args.key:
            raise ValueError("milora cache info needs a KEY (see milora cache ls)")
        raw = cache.read(args.key)
        if raw is None:
            raise FileNotFoundError(f"no entry {args.key} in {cache.name}")
        data, manifest = raw
        try:
            decode_entry(data, manifest)
            manifest = {**manifest, "checksum": "ok"}
        except ValueError as exc:
            manifest = {**manifest, "checksum": f"BAD: {exc}"}
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    if args.action == "verify":
        bad = cache.verify()
        for key, problem in bad:
            print(f"{key}: {problem}")
        print(f"{len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} in {cache.name}")
        return 1 if bad else 0
    if args.older_than is None:
        raise ValueError("milora cache prune needs --older-than DAYS")
    gone = cache.prune(args.older_than)
    print(f"pruned {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} older than {args.older_than} days "
          f"from {cache.name}")
    return 0
