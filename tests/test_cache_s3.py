"""The S3 SVD cache on a real moto server process on 127.0.0.1 (boto3 endpoint from the environment):
put/get/list/prune, corruption recovery, the local front (tiered), rank reuse across the family,
init_adapter through s3://, misconfiguration errors, an unreachable endpoint (bounded retries, clear
error, no local data lost), two processes writing one key, and the CLI in-process and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

import milora
from milora.cli import main as cli_main
from milora.core.adapter import current_factors
from milora.core.cache import (
    CacheConfigError,
    CacheUnavailableError,
    LocalCache,
    S3Cache,
    TieredCache,
    open_cache,
)
from milora.core.svd import solve
from tests.cache_race import race_two_writers
from tests.models import tiny_llama
from tests.servers import S3_TEST_ENV, free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _compute(W, rank, calls=None, side="minor"):
    def compute():
        if calls is not None:
            calls.append(rank)
        return solve(W, rank, side, "full")
    return compute



def test_put_get_list_prune(s3_bucket):
    cache = S3Cache(f"s3://{s3_bucket}/svd")
    W = torch.randn(30, 20)
    t1, key, hit1 = cache.get_or_compute(W, 3, "minor", "full", _compute(W, 3))
    t2, key2, hit2 = cache.get_or_compute(W, 3, "minor", "full", _compute(W, 3))
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


def test_rank_reuse_across_the_key_family(s3_bucket, tmp_path):
    remote = S3Cache(f"s3://{s3_bucket}/fam")
    W = torch.randn(40, 30)
    calls: list[int] = []
    _, key8, _ = remote.get_or_compute(W, 8, "principal", "full", _compute(W, 8, calls, "principal"))
    t, key, hit = remote.get_or_compute(W, 3, "principal", "full", _compute(W, 3, calls, "principal"))
    assert hit and key == key8 and calls == [8] and t.S.numel() == 8
    assert torch.allclose(t.take(3, "principal").S, solve(W, 3, "principal", "full").S)
    # a fresh machine: the local front is empty, the family lookup finds the rank-8 entry on S3
    tiered = TieredCache(LocalCache(tmp_path / "front"), remote)
    _, key, hit = tiered.get_or_compute(W, 5, "principal", "full", lambda: pytest.fail("must not recompute"))
    assert hit and key == key8 and LocalCache(tmp_path / "front").load(key8) is not None
    assert remote.get_or_compute(W, 9, "principal", "full", _compute(W, 9, calls, "principal"))[2] is False


def test_missing_bucket_is_a_clear_config_error(s3_bucket, capsys):
    W = torch.randn(20, 12)
    with pytest.raises(CacheConfigError, match=r"bucket 'no-such-bucket-x' does not exist at http://127\.0\.0\.1"):
        S3Cache("s3://no-such-bucket-x/p").get_or_compute(W, 2, "minor", "full", _compute(W, 2))
    from milora.cli import main as cli_main

    assert cli_main(["cache", "ls", "--cache", "s3://no-such-bucket-x/p"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in err


def test_wrong_credentials_are_a_clear_config_error(s3_bucket, monkeypatch, tmp_path):
    """moto accepts any key; an explicit profile that does not exist must still fail clearly, not hang."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    W = torch.randn(20, 12)
    with pytest.raises(CacheConfigError, match="no AWS credentials found"):
        S3Cache(f"s3://{s3_bucket}/p").get_or_compute(W, 2, "minor", "full", _compute(W, 2))


def test_the_local_front_keeps_a_result_when_s3_fails(s3_bucket, tmp_path):
    """The remote breaks between read and write: the freshly computed entry is kept locally."""
    local = LocalCache(tmp_path / "front")
    tiered = TieredCache(local, S3Cache(f"s3://{s3_bucket}/front"))
    W = torch.randn(24, 16)
    s3 = boto3.client("s3")

    def compute_then_break():
        t = solve(W, 3, "minor", "full")
        s3.delete_bucket(Bucket=s3_bucket)  # empty bucket: deletable; the put that follows fails
        return t

    with pytest.raises(CacheConfigError, match="does not exist"):
        tiered.get_or_compute(W, 3, "minor", "full", compute_then_break)
    _, key, hit = local.get_or_compute(W, 3, "minor", "full", lambda: pytest.fail("must not recompute"))
    assert hit and local.verify() == []


@pytest.mark.timeout(300)
def test_init_adapter_unreachable_endpoint_is_bounded_and_keeps_local_entries(tmp_path, monkeypatch):
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("MILORA_CACHE_DIR", str(tmp_path / "user"))
    cfg = milora.AdapterConfig(rank=4, target_modules=["q_proj"], svd_solver="full", dropout=0.0)
    milora.init_adapter(tiny_llama(), cfg, cache=tmp_path / "user" / "s3" / "bucket" / "svd", progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "user").rglob("*") if p.is_file()}
    assert before
    remote = S3Cache("s3://bucket/svd")
    retries = remote.client.meta.config.retries
    assert retries["total_max_attempts"] <= 4 and remote.client.meta.config.connect_timeout <= 10
    with pytest.raises(CacheUnavailableError, match=f"cannot reach the S3 endpoint {dead}.*AWS_ENDPOINT_URL_S3"):
        milora.init_adapter(tiny_llama(seed=1), cfg, cache="s3://bucket/svd", progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "user").rglob("*") if p.is_file()} == before
    assert cli_main(["cache", "ls", "--cache", "s3://bucket/svd"]) == 1  # a connection error: exit 1, retryable


def test_two_processes_writing_the_same_s3_key(s3_bucket):
    env = {k: os.environ[k] for k in (*S3_TEST_ENV, "AWS_ENDPOINT_URL_S3")}
    uri = f"s3://{s3_bucket}/race"
    key = race_two_writers(uri, env, repeats=4, timeout=180)
    cache = S3Cache(uri)
    assert [e.key for e in cache.entries()] == [key] and cache.verify() == []


def test_fast_solver_through_s3_equals_no_cache(s3_bucket, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("MILORA_CACHE_DIR", str(tmp_path / "user"))

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=320, intermediate_size=448, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
        return LlamaForCausalLM(cfg).eval()

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model()(input_ids=ids).logits
    cfg = milora.AdapterConfig(rank=4, dropout=0.0, target_modules=["q_proj", "down_proj"], svd_solver="auto")
    plain = current_factors(milora.init_adapter(model(), cfg, progress=False))
    uri = f"s3://{s3_bucket}/svd"
    cold = milora.init_adapter(model(), cfg, cache=uri, progress=False)
    import shutil

    shutil.rmtree(tmp_path / "user")  # only S3 has the entries now
    warm = milora.init_adapter(model(), cfg, cache=uri, progress=False)
    assert cold.milora_state.report.misses == 2 and warm.milora_state.report.hits == 2
    for name, (A, B) in plain.items():
        A2, B2 = current_factors(warm)[name]
        assert torch.equal(A, A2) and torch.equal(B, B2), name
    with torch.no_grad():
        assert (warm(input_ids=ids).logits - ref).abs().max() <= 1e-4


def test_cli_subprocess_on_s3(s3_bucket):
    uri = f"s3://{s3_bucket}/cli"
    cache = S3Cache(uri)
    W = torch.randn(20, 12)
    _, key, _ = cache.get_or_compute(W, 2, "minor", "full", _compute(W, 2))

    def run(*args):
        return subprocess.run([str(BIN / "milora"), "cache", *args, "--cache", uri], capture_output=True,
                              text=True, timeout=300, env=os.environ.copy())

    ls = run("ls")
    assert ls.returncode == 0 and key in ls.stdout and "1 entries" in ls.stdout, ls.stderr
    info = run("info", key[:10])
    assert info.returncode == 0 and json.loads(info.stdout)["checksum"] == "ok"
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"cli/{key}/triplets.safetensors", Body=b"\x00" * 9)
    bad = run("verify")
    assert bad.returncode == 1 and key in bad.stdout
    assert run("verify", "--delete").returncode == 0 and list(cache.entries()) == []
    for out in (ls, info, bad):
        assert S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
