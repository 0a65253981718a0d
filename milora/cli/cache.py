"""`milora cache ls | info KEY | verify | prune --older-than DAYS` on a local or S3 SVD cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from milora.core.errors import InvalidInput, MissingInput


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora cache`."""
    p.add_argument("action", choices=["ls", "info", "verify", "prune"])
    p.add_argument("key", nargs="?", help="entry key, or a unique prefix of it (for info)")
    p.add_argument("--cache", help="a directory or s3://bucket/prefix (default: svd.cache of ./params.yaml, "
                                   "else ~/.cache/milora/svd)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="for prune: delete entries older than this")
    p.add_argument("--dry-run", action="store_true", help="for prune: list what would be deleted, delete nothing")
    p.add_argument("--delete", action="store_true", help="for verify: delete the bad entries (they are "
                                                         "recomputed on next use anyway)")
    p.add_argument("--json", action="store_true", help="for ls: one JSON manifest per line")


def _spec(arg: str | None) -> str:
    from milora.core.cache import default_dir
    from milora.pipeline.config import load_config

    if arg:
        return arg
    if Path("params.yaml").exists():
        cache = load_config("params.yaml").svd.cache
        if cache:
            return cache
    return str(default_dir())


def _resolve(cache, key: str) -> str:
    """An exact key, or the one key starting with `key`."""
    if cache.read(key) is not None:
        return key
    matches = sorted(e.key for e in cache.entries() if e.key.startswith(key)) if len(key) >= 6 else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidInput(f"key prefix {key!r} matches {len(matches)} entries in {cache.name}: give more of it")
    raise MissingInput(f"no entry {key} in {cache.name} (see milora cache ls)")


def main(args: argparse.Namespace) -> int:
    """Entry point of `milora cache`."""
    from milora.core.cache import decode_entry, open_cache

    cache = open_cache(_spec(args.cache), tiered=False)
    if args.action == "ls":
        entries = sorted(cache.entries(), key=lambda e: e.manifest.get("created", 0))
        if args.json:
            for e in entries:
                print(json.dumps({"key": e.key, **e.manifest}, sort_keys=True))
            return 0
        print(f"{'key':46s}  {'shape':>12s}  side       rank  solver    MiB    age(d)")
        for e in entries:
            m = e.manifest
            shape = "x".join(str(x) for x in m.get("shape", []))
            print(f"{e.key:46s}  {shape:>12s}  {m.get('side', '?'):9s}  {m.get('rank', '?'):>4}  "
                  f"{m.get('solver', '?'):8s}  {m.get('bytes', 0) / 2**20:5.2f}  {e.age_days:6.1f}")
        total = sum(e.manifest.get("bytes", 0) for e in entries)
        print(f"{len(entries)} entries, {total / 2**20:.2f} MiB in {cache.name}")
        return 0
    if args.action == "info":
        if not args.key:
            raise InvalidInput("milora cache info needs a KEY (see milora cache ls)")
        key = _resolve(cache, args.key)
        data, manifest = cache.read(key)
        try:
            decode_entry(data, manifest)
            manifest = {**manifest, "checksum": "ok"}
        except ValueError as exc:
            manifest = {**manifest, "checksum": f"BAD: {exc}"}
        print(json.dumps({"key": key, **manifest}, indent=2, sort_keys=True))
        return 0
    if args.action == "verify":
        bad = cache.verify()
        for key, problem in bad:
            print(f"{key}: {problem}")
            if args.delete:
                cache.delete(key)
        done = "deleted" if args.delete and bad else "found"
        print(f"{len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} {done} in {cache.name}")
        return 1 if bad and not args.delete else 0
    if args.older_than is None:
        raise InvalidInput("milora cache prune needs --older-than DAYS")
    if args.dry_run:
        old = [e.key for e in cache.entries() if e.age_days > args.older_than]
        for key in old:
            print(key)
        print(f"would prune {len(old)} entr{'y' if len(old) == 1 else 'ies'} older than {args.older_than} days "
              f"from {cache.name}")
        return 0
    gone = cache.prune(args.older_than)
    print(f"pruned {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} older than {args.older_than} days "
          f"from {cache.name}")
    return 0
