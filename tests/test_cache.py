"""The local SVD cache: content keys, hits and misses, invalidation (weight, rank, side, solver, dtype,
method), rank reuse, corruption recovery, concurrent writers, init_adapter through the cache, and the
`milora cache` CLI in-process and as a real subprocess. The S3 backend: tests/test_cache_s3.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import milora
from milora.cli import main as cli_main
from milora.core.adapter import current_factors
from milora.core.cache import LocalCache, key_family, make_key, open_cache, weight_digest
from milora.core.svd import compute_factors, solve
from tests.cache_race import race_two_writers
from tests.models import tiny_llama

BIN = Path(sys.executable).parent
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _compute(W, rank, side="minor", solver="full", calls=None):
    def compute():
        if calls is not None:
            calls.append(rank)
        return solve(W, rank, side, solver)
    return compute


def test_keys_follow_content_shape_and_dtype():
    W = torch.randn(48, 32)
    assert weight_digest(W).startswith("xxh3:")
    assert make_key(W, 4, "minor", "full") == make_key(W.clone(), 4, "minor", "full")
    assert make_key(W.T, 4, "minor", "full") == make_key(W.T.contiguous(), 4, "minor", "full")
    assert make_key(W.reshape(32, 48), 4, "minor", "full") != make_key(W, 4, "minor", "full")  # same bytes
    assert make_key(W.to(torch.bfloat16), 4, "minor", "full") != make_key(W, 4, "minor", "full")
    key = make_key(W, 4, "minor", "gram")
    assert key == f"{key_family(W, 'minor', 'gram')}-r4" and len(key) == 43


@pytest.mark.parametrize("side", ["minor", "principal"])
def test_an_entry_of_a_larger_rank_serves_smaller_ranks(tmp_path, side):
    cache = LocalCache(tmp_path)
    W = torch.randn(60, 40)
    calls: list[int] = []
    t8, key8, hit = cache.get_or_compute(W, 8, side, "full", _compute(W, 8, side, calls=calls))
    assert not hit
    t4, key, hit = cache.get_or_compute(W, 4, side, "full", _compute(W, 4, side, calls=calls))
    assert hit and key == key8 and calls == [8]  # served by the rank-8 entry, nothing computed
    t12, key12, hit = cache.get_or_compute(W, 12, side, "full", _compute(W, 12, side, calls=calls))
    assert not hit and calls == [8, 12] and key12 != key8  # a smaller entry cannot serve a larger rank
    # compute_factors takes the right end of the stored triplets
    _, trips, report = compute_factors({"w": W}, 4, side, 1.0, "full", cache, progress=False)
    assert report.hits == 1 and report.matrices[0].key in (key8, key12)
    want = solve(W, 4, side, "full")
    assert torch.allclose(trips["w"].S, want.S) and trips["w"].S.numel() == 4
    assert torch.allclose((trips["w"].Vh.T @ trips["w"].Vh), want.Vh.T @ want.Vh, atol=1e-5)


def test_init_adapter_rank_change_and_weight_change(tmp_path):
    """A smaller rank reuses the entries; a larger rank misses; a changed weight misses only its own matrix."""
    targets = ["q_proj", "v_proj"]
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))

    def init(rank, model=None):
        cfg = milora.AdapterConfig(rank=rank, dropout=0.0, target_modules=targets, svd_solver="full")
        return milora.init_adapter(model or tiny_llama(), cfg, cache=str(tmp_path), progress=False)

    assert init(8).milora_state.report.misses == 4
    smaller = init(4)
    assert smaller.milora_state.report.hits == 4
    plain = milora.init_adapter(tiny_llama(), milora.AdapterConfig(rank=4, dropout=0.0, target_modules=targets,
                                                                   svd_solver="full"), progress=False)
    for name, (A, B) in current_factors(plain).items():
        A2, B2 = current_factors(smaller)[name]
        assert torch.allclose(A, A2, atol=1e-6) and torch.allclose(B, B2, atol=1e-6)
    assert init(12).milora_state.report.misses == 4

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] += 1e-3
        ref = model(input_ids=ids).logits
    changed = init(8, model)
    missed = [m.name for m in changed.milora_state.report.matrices if not m.hit]
    assert missed == ["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        assert (changed(input_ids=ids).logits - ref).abs().max() <= 1e-4


def test_fast_solver_through_the_cache_equals_no_cache(tmp_path):
    """The gram solver's Krylov path on 320-wide matrices, cold then warm, vs no cache: same factors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=320, intermediate_size=448, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
        return LlamaForCausalLM(cfg).eval()

    cfg = milora.AdapterConfig(rank=4, dropout=0.0, target_modules=["q_proj", "up_proj", "down_proj"],
                               svd_solver="gram")
    plain = current_factors(milora.init_adapter(model(), cfg, progress=False))
    cold = milora.init_adapter(model(), cfg, cache=tmp_path, progress=False)
    warm = milora.init_adapter(model(), cfg, cache=tmp_path, progress=False)
    assert cold.milora_state.report.misses == 3 and warm.milora_state.report.hits == 3
    assert all(m.solver == "gram" for m in warm.milora_state.report.matrices)
    for name, (A, B) in plain.items():
        for other in (cold, warm):
            A2, B2 = current_factors(other)[name]
            assert torch.equal(A, A2) and torch.equal(B, B2), name


def test_prune_removes_stale_temporary_dirs_only(tmp_path):
    cache = LocalCache(tmp_path)
    W = torch.randn(20, 12)
    _, key, _ = cache.get_or_compute(W, 2, "minor", "full", _compute(W, 2))
    stale, fresh = tmp_path / key[:2] / f".{key}.dead", tmp_path / key[:2] / f".{key}.writing"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert cache.prune(30) == []
    assert not stale.exists() and fresh.exists() and cache.load(key) is not None



def test_hit_after_miss_returns_identical_triplets(tmp_path):
    cache = LocalCache(tmp_path)
    W = torch.randn(40, 24)
    calls = []
    t1, k1, hit1 = cache.get_or_compute(W, 4, "minor", "full", _compute(W, 4, "minor", calls=calls))
    t2, k2, hit2 = cache.get_or_compute(W, 4, "minor", "full", _compute(W, 4, "minor", calls=calls))
    assert (hit1, hit2) == (False, True) and k1 == k2 and len(calls) == 1
    assert torch.equal(t1.U, t2.U) and torch.equal(t1.S, t2.S) and torch.equal(t1.Vh, t2.Vh)
    assert t2.spectrum is not None and t2.spectrum.numel() == 24


@pytest.mark.parametrize("change", ["weight", "rank", "side", "solver", "dtype"])
def test_any_change_misses(change):
    W = torch.randn(40, 24)
    base = make_key(W, 4, "minor", "full")
    W2 = W.clone()
    W2[3, 5] += 1e-3
    other = {
        "weight": lambda: make_key(W2, 4, "minor", "full"),
        "rank": lambda: make_key(W, 5, "minor", "full"),
        "side": lambda: make_key(W, 4, "principal", "full"),
        "solver": lambda: make_key(W, 4, "minor", "full64"),
        "dtype": lambda: make_key(W.to(torch.float64), 4, "minor", "full"),
    }[change]()
    assert other != base


def _entry_files(cache: LocalCache):
    return sorted(cache.root.glob("*/*/triplets.safetensors"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest"])
def test_corrupt_entry_is_detected_recomputed_and_replaced(tmp_path, caplog, damage):
    cache = LocalCache(tmp_path)
    W = torch.randn(32, 20)
    calls = []
    t_ref, key, _ = cache.get_or_compute(W, 3, "minor", "full", _compute(W, 3, "minor", calls=calls))
    (data,) = _entry_files(cache)
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        (data.parent / "manifest.json").write_text("{not json")
    assert cache.verify() and cache.verify()[0][0] == key
    with caplog.at_level("WARNING"):
        t, key2, hit = cache.get_or_compute(W, 3, "minor", "full", _compute(W, 3, "minor", calls=calls))
    assert not hit and key2 == key and len(calls) == 2
    assert "corrupt" in caplog.text
    assert torch.equal(t.S, t_ref.S)
    assert cache.verify() == []
    assert cache.get_or_compute(W, 3, "minor", "full", _compute(W, 3, "minor", calls=calls))[2] is True


def test_two_processes_writing_the_same_key(tmp_path):
    key = race_two_writers(str(tmp_path))
    cache = LocalCache(tmp_path)
    assert [e.key for e in cache.entries()] == [key] and cache.verify() == []
    assert not list(tmp_path.glob("*/.*"))  # no temporary directories left behind


def test_init_adapter_with_cache_dir_matches_no_cache(tmp_path):
    cfg = milora.AdapterConfig(rank=4, target_modules=TARGETS, dropout=0.0, svd_solver="full")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    ref_model = tiny_llama()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    plain = milora.init_adapter(tiny_llama(), cfg, progress=False)
    cold = milora.init_adapter(tiny_llama(), cfg, cache=str(tmp_path), progress=False)
    warm = milora.init_adapter(tiny_llama(), cfg, cache=str(tmp_path), progress=False)
    rep_cold, rep_warm = cold.milora_state.report, warm.milora_state.report
    assert (rep_cold.hits, rep_cold.misses) == (0, 6) and (rep_warm.hits, rep_warm.misses) == (6, 0)
    assert cold.milora_state.cache_keys == warm.milora_state.cache_keys and len(warm.milora_state.cache_keys) == 6
    fa, fb = milora.core.adapter.current_factors(plain), milora.core.adapter.current_factors(warm)
    for name in fa:
        assert torch.equal(fa[name][0], fb[name][0]) and torch.equal(fa[name][1], fb[name][1])
    with torch.no_grad():
        assert (warm(input_ids=ids).logits - ref).abs().max() <= 1e-4


def test_method_change_misses(tmp_path):
    cfg = milora.AdapterConfig(rank=4, target_modules=["q_proj"], svd_solver="full")
    milora.init_adapter(tiny_llama(), cfg, cache=str(tmp_path), progress=False)
    pissa = milora.AdapterConfig(method="pissa", rank=4, target_modules=["q_proj"], svd_solver="full")
    rep = milora.init_adapter(tiny_llama(), pissa, cache=str(tmp_path), progress=False).milora_state.report
    assert rep.hits == 0 and rep.misses == 2


def test_open_cache_specs(tmp_path):
    assert open_cache(None) is None
    c = LocalCache(tmp_path)
    assert open_cache(c) is c
    assert isinstance(open_cache(str(tmp_path)), LocalCache)
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_cache("gs://bucket/x")


def test_cli_ls_info_verify_prune(tmp_path, capsys):
    cache = LocalCache(tmp_path)
    W = torch.randn(30, 20)
    _, key, _ = cache.get_or_compute(W, 2, "minor", "full", lambda: solve(W, 2, "minor", "full"))
    assert cli_main(["cache", "ls", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert key in out and "30x20" in out and "1 entries" in out
    assert cli_main(["cache", "info", key, "--cache", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checksum"] == "ok" and info["rank"] == 2 and info["side"] == "minor"
    assert cli_main(["cache", "verify", "--cache", str(tmp_path)]) == 0
    assert cli_main(["cache", "prune", "--older-than", "1", "--cache", str(tmp_path)]) == 0
    assert len(list(cache.entries())) == 1
    manifest = next(tmp_path.glob("*/*/manifest.json"))
    m = json.loads(manifest.read_text())
    m["created"] = time.time() - 3 * 86400
    manifest.write_text(json.dumps(m))
    assert cli_main(["cache", "prune", "--older-than", "2", "--cache", str(tmp_path)]) == 0
    assert "pruned 1 entry" in capsys.readouterr().out
    assert list(cache.entries()) == []
    assert cli_main(["cache", "info", "nope", "--cache", str(tmp_path)]) == 2


def _milora(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "milora"), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_cli_subprocess_uses_params_yaml_and_repairs(tmp_path):
    (tmp_path / "params.yaml").write_text("svd:\n  cache: my_svd_cache\n")
    cache = LocalCache(tmp_path / "my_svd_cache")
    keys = []
    for shape in ((30, 20), (24, 16)):
        W = torch.randn(*shape)
        keys.append(cache.get_or_compute(W, 2, "minor", "full", _compute(W, 2))[1])

    ls = _milora("cache", "ls", cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    assert all(k in ls.stdout for k in keys) and "2 entries" in ls.stdout and "my_svd_cache" in ls.stdout
    lines = _milora("cache", "ls", "--json", cwd=tmp_path).stdout.splitlines()
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(keys)

    info = _milora("cache", "info", keys[0][:12], cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["key"] == keys[0] and json.loads(info.stdout)["checksum"] == "ok"

    data = next((tmp_path / "my_svd_cache").glob(f"*/{keys[1]}/triplets.safetensors"))
    data.write_bytes(data.read_bytes()[:-7])  # truncated
    verify = _milora("cache", "verify", cwd=tmp_path)
    assert verify.returncode == 1 and keys[1] in verify.stdout and "1 bad entry found" in verify.stdout
    fixed = _milora("cache", "verify", "--delete", cwd=tmp_path)
    assert fixed.returncode == 0 and "1 bad entry deleted" in fixed.stdout
    assert [e.key for e in cache.entries()] == [keys[0]]

    dry = _milora("cache", "prune", "--older-than", "0", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and keys[0] in dry.stdout and "would prune 1 entry" in dry.stdout
    assert [e.key for e in cache.entries()] == [keys[0]]
    bad = _milora("cache", "prune", cwd=tmp_path)
    assert bad.returncode == 2 and "needs --older-than DAYS" in bad.stderr
    missing = _milora("cache", "info", "0123456789", cwd=tmp_path)
    assert missing.returncode == 2 and "no entry 0123456789" in missing.stderr and "Traceback" not in missing.stderr
    gone = _milora("cache", "prune", "--older-than", "0", cwd=tmp_path)
    assert gone.returncode == 0 and "pruned 1 entry" in gone.stdout and list(cache.entries()) == []


@pytest.mark.slow
def test_cli_default_without_params_is_the_user_cache(tmp_path):
    env = {"MILORA_CACHE_DIR": str(tmp_path / "user-cache")}
    cache = LocalCache(tmp_path / "user-cache")
    W = torch.randn(16, 12)
    _, key, _ = cache.get_or_compute(W, 2, "minor", "full", _compute(W, 2))
    out = _milora("cache", "ls", cwd=tmp_path, env=env)
    assert out.returncode == 0 and key in out.stdout and str(tmp_path / "user-cache") in out.stdout
