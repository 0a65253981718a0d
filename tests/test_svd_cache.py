"""The local SVD cache: hits, misses, invalidation, corruption recovery, concurrent writers, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest
import torch

import milora
from milora.cache import LocalCache, make_key, open_cache
from milora.cli import main as cli_main
from milora.svd import solve
from tests.models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _counting(W, rank, side, calls):
    def compute():
        calls.append(1)
        return solve(W, rank, side, "full")
    return compute


def test_hit_after_miss_returns_identical_triplets(tmp_path):
    cache = LocalCache(tmp_path)
    W = torch.randn(40, 24)
    calls = []
    t1, k1, hit1 = cache.get_or_compute(W, 4, "minor", "full", _counting(W, 4, "minor", calls))
    t2, k2, hit2 = cache.get_or_compute(W, 4, "minor", "full", _counting(W, 4, "minor", calls))
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
    t_ref, key, _ = cache.get_or_compute(W, 3, "minor", "full", _counting(W, 3, "minor", calls))
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
        t, key2, hit = cache.get_or_compute(W, 3, "minor", "full", _counting(W, 3, "minor", calls))
    assert not hit and key2 == key and len(calls) == 2
    assert "corrupt" in caplog.text
    assert torch.equal(t.S, t_ref.S)
    assert cache.verify() == []
    assert cache.get_or_compute(W, 3, "minor", "full", _counting(W, 3, "minor", calls))[2] is True


def _writer(root: str, seed: int, barrier, out) -> None:
    torch.manual_seed(0)
    W = torch.randn(64, 48)
    cache = LocalCache(root)
    barrier.wait()
    for _ in range(5):
        t, key, _ = cache.get_or_compute(W, 4, "minor", "full", lambda: solve(W, 4, "minor", "full"))
        out.put((key, t.S.tolist()))


def test_two_processes_writing_the_same_key(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i, barrier, out)) for i in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(10)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len({k for k, _ in results}) == 1
    assert all(s == results[0][1] for _, s in results)
    cache = LocalCache(tmp_path)
    assert len(list(cache.entries())) == 1 and cache.verify() == []
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
    fa, fb = milora.adapter.current_factors(plain), milora.adapter.current_factors(warm)
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
