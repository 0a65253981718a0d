"""The S3 SVD cache against a real moto server process on 127.0.0.1 (boto3 endpoint from the env)."""

from __future__ import annotations

import json
import time

import boto3
import pytest
import torch

import milora
from milora.cache import CacheUnavailableError, LocalCache, S3Cache, TieredCache, open_cache
from milora.cli import main as cli_main
from milora.svd import solve
from tests.models import tiny_llama
from tests.servers import free_port

pytestmark = pytest.mark.slow


def _compute(W, rank=3):
    return lambda: solve(W, rank, "minor", "full")


def test_put_get_list_prune(s3_bucket):
    cache = S3Cache(f"s3://{s3_bucket}/svd")
    W = torch.randn(30, 20)
    t1, key, hit1 = cache.get_or_compute(W, 3, "minor", "full", _compute(W))
    t2, key2, hit2 = cache.get_or_compute(W, 3, "minor", "full", _compute(W))
    assert (hit1, hit2) == (False, True) and key == key2 and torch.equal(t1.Vh, t2.Vh)
    objs = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="svd/")["Contents"]
    assert {o["Key"] for o in objs} == {f"svd/{key}/manifest.json", f"svd/{key}/triplets.safetensors"}
    assert [e.key for e in cache.entries()] == [key]
    assert cache.verify() == []
    assert cache.prune(1) == []
    m = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"svd/{key}/manifest.json")["Body"].read())
    m["created"] = time.time() - 5 * 86400
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"svd/{key}/manifest.json", Body=json.dumps(m).encode())
    assert cache.prune(2) == [key]
    assert list(cache.entries()) == []


def test_corrupt_s3_entry_is_recomputed(s3_bucket, caplog):
    cache = S3Cache(f"s3://{s3_bucket}/c")
    W = torch.randn(24, 16)
    _, key, _ = cache.get_or_compute(W, 2, "minor", "full", _compute(W, 2))
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"c/{key}/triplets.safetensors", Body=b"garbage")
    assert cache.verify()[0][0] == key
    with caplog.at_level("WARNING"):
        _, _, hit = cache.get_or_compute(W, 2, "minor", "full", _compute(W, 2))
    assert not hit and "corrupt" in caplog.text and cache.verify() == []


def test_tiered_cache_serves_locally_after_first_remote_read(s3_bucket, tmp_path):
    remote = S3Cache(f"s3://{s3_bucket}/t")
    W = torch.randn(24, 16)
    remote.get_or_compute(W, 2, "minor", "full", _compute(W, 2))  # written by "another machine"
    tiered = TieredCache(LocalCache(tmp_path / "local"), remote)
    _, key, hit = tiered.get_or_compute(W, 2, "minor", "full", lambda: pytest.fail("must not recompute"))
    assert hit and LocalCache(tmp_path / "local").load(key) is not None


def test_init_adapter_with_s3_uri(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MILORA_CACHE_DIR", str(tmp_path / "localcache"))
    cfg = milora.AdapterConfig(rank=4, target_modules=["q_proj", "down_proj"], svd_solver="full", dropout=0.0)
    uri = f"s3://{s3_bucket}/team/svd"
    assert isinstance(open_cache(uri), TieredCache)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_llama()(input_ids=ids).logits
    cold = milora.init_adapter(tiny_llama(), cfg, cache=uri, progress=False)
    assert cold.milora_state.report.misses == 4
    import shutil

    shutil.rmtree(tmp_path / "localcache")  # a fresh machine: only S3 has the entries
    warm = milora.init_adapter(tiny_llama(), cfg, cache=uri, progress=False)
    assert warm.milora_state.report.hits == 4
    with torch.no_grad():
        assert (warm(input_ids=ids).logits - ref).abs().max() <= 1e-4


def test_cli_on_s3(s3_bucket, capsys):
    cache = S3Cache(f"s3://{s3_bucket}/cli")
    W = torch.randn(20, 12)
    _, key, _ = cache.get_or_compute(W, 2, "minor", "full", _compute(W, 2))
    assert cli_main(["cache", "ls", "--cache", f"s3://{s3_bucket}/cli"]) == 0
    assert key in capsys.readouterr().out
    assert cli_main(["cache", "verify", "--cache", f"s3://{s3_bucket}/cli"]) == 0


@pytest.mark.timeout(300)  # bounded retries: an unreachable endpoint must fail, never hang
def test_unreachable_endpoint_fails_clearly_and_keeps_local_data(tmp_path, monkeypatch):
    from tests.servers import S3_TEST_ENV

    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    local = LocalCache(tmp_path / "local")
    W = torch.randn(20, 12)
    _, key, _ = local.get_or_compute(W, 2, "minor", "full", _compute(W, 2))
    before = sorted(p.read_bytes() for p in (tmp_path / "local").rglob("*") if p.is_file())
    tiered = TieredCache(local, S3Cache("s3://bucket/prefix"))
    W2 = torch.randn(20, 12)
    with pytest.raises(CacheUnavailableError, match=f"cannot reach the S3 endpoint {dead}"):
        tiered.get_or_compute(W2, 2, "minor", "full", _compute(W2, 2))
    after = sorted(p.read_bytes() for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert after == before and local.load(key) is not None
    assert cli_main(["cache", "ls", "--cache", "s3://bucket/prefix"]) == 1  # connection error: exit 1
