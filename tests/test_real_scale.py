"""Real scale, at test size: the Llama-shaped model builder (benchmarks/llama_shaped.py), and an external bf16
base through every stage, registered by reference and reloaded in a fresh process that refuses a changed base."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from milora.core import svd
from milora.pipeline.config import validate
from milora.pipeline.paths import Paths
from milora.stages import run_stage
from tests.mlflow_fixtures import predict_in_fresh_process, seed_embedded_store
from tests.project import write_params

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):  # noqa: ANN202 - the benchmark script as a module
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


llama_shaped = _bench("llama_shaped")


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    """A 1-layer Llama-shaped bf16 model with hidden 640 (the smallest square side `auto` solves with `gram`)."""
    out = tmp_path_factory.mktemp("ext") / "llama-shaped"
    llama_shaped.build(out, layers=1, hidden=svd.AUTO_MIN_SQUARE, intermediate=1024, heads=4, vocab=1200,
                       bpe_vocab=800, max_position=512, progress=False)
    return out


def test_builder_writes_a_sharded_bf16_llama_with_a_matching_tokenizer(small_llama):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(small_llama)
    tok = AutoTokenizer.from_pretrained(small_llama)
    assert len(tok) == config.vocab_size == 1200 and not config.tie_word_embeddings
    index = json.loads((small_llama / "model.safetensors.index.json").read_text())
    shards = sorted(small_llama.glob("model-*.safetensors"))
    assert len(shards) == 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    layer = load_file(str(shards[1]))
    assert all(t.dtype == torch.bfloat16 for t in layer.values())
    # seeded per tensor: the same arguments give the same bytes
    again = llama_shaped.layer_tensors(0, svd.AUTO_MIN_SQUARE, 1024, 0, "cpu")
    assert all(torch.equal(layer[k], again[k]) for k in layer)
    assert tok.decode(tok("question: what is 12 plus 3?")["input_ids"], skip_special_tokens=True).strip() \
        == "question: what is 12 plus 3?"


@pytest.mark.parametrize("kind", ["q_proj", "v_proj", "up_proj", "down_proj"])
def test_builder_spectra_look_trained(small_llama, kind):
    """Heavy top, Marchenko-Pastur bulk, and a near-degenerate small end, in the stored bf16 weights."""
    from safetensors.torch import load_file

    group = "self_attn" if kind in llama_shaped.ATTN else "mlp"
    shard = sorted(small_llama.glob("model-*.safetensors"))[1]
    W = load_file(str(shard))[f"model.layers.0.{group}.{kind}.weight"]
    s = torch.linalg.svdvals(W.double())
    k = s.numel()
    median = float(s[k // 2])
    assert float(W.float().pow(2).mean().sqrt()) == pytest.approx(llama_shaped.RMS, rel=0.01)
    assert float(s[0]) / median > (12 if kind == "q_proj" else 5)  # a heavy top
    assert float(s[: k // 10].square().sum() / s.square().sum()) > 0.3  # energy concentrated there
    cluster = s[-(k // 32):]  # the small end: near-degenerate (within ~2 % + the bf16 noise) ...
    assert float(cluster[-1] / cluster[0]) > 0.95
    assert float(cluster[-1]) < 0.15 * median  # ... far below the bulk
    # the stored spectrum is the prescribed one, up to bf16 rounding
    prescribed = torch.from_numpy(llama_shaped.spectrum(kind, *W.shape).copy())
    assert torch.allclose(s, prescribed, rtol=0.02, atol=2e-3 * median)


@pytest.mark.slow
def test_external_bf16_base_end_to_end_registered_by_reference(small_llama, tmp_path, monkeypatch):
    """base (identity, no copy) -> prepare (its tokenizer) -> svd (gram on bf16) -> train -> evaluate ->
    register by reference; the pyfunc reloads the base by path in a fresh process, and refuses a changed base."""
    from mlflow.pyfunc import load_model

    from milora.tracking import registration, store

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT__FLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    ext = tmp_path / "base-copy"  # a copy: the test changes its weights at the end
    import shutil

    shutil.copytree(small_llama, ext)
    root = tmp_path / "proj"
    root.mkdir()
    overrides = {"model.name_or_path": str(ext), "model.dtype": "bfloat16", "adapter.rank": 8,
                 "adapter.svd_solver": "auto", "train.max_steps": 2, "train.save_steps": 2, "data.max_length": 128,
                 "eval.max_examples": 2, "eval.max_new_tokens": 4, "register.model_name": "ext-e2e",
                 "register.log_lora_export": False}
    write_params(root, overrides)
    for stage in ("ingest", "base", "prepare", "svd", "train", "evaluate"):
        run_stage(stage, root / "params.yaml", root)
    paths = Paths(root)
    identity = json.loads(paths.base_json.read_text())
    assert identity["embedded"] is False and identity["dtype"] == "bfloat16"
    assert not list(paths.base_dir.glob("*.safetensors"))  # no copy of the weights
    report = json.loads(paths.report("svd").read_text())
    assert {m["solver"] for m in report["per_matrix"].values()} == {"gram"}
    facts = json.loads(paths.timings("svd_matrices").read_text())  # where each solve ran: a run fact
    assert {m["device"] for m in facts.values()} == {"cpu"}

    seed_embedded_store(root)
    cfg = validate(json.loads(json.dumps(__import__("yaml").safe_load((root / "params.yaml").read_text()))))
    reg = registration.register_run(cfg, paths)
    uri = store.tracking_uri(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_uri = f"models:/ext-e2e/{reg.version}"
    model = load_model(model_uri)
    mc = model.model_config
    assert mc["base_content_hash"] == identity["content_hash"] and mc["base_load_path"] == str(ext.resolve())
    local = Path(model._model_impl.context.artifacts["adapter"]).parent.parent
    assert not list(local.rglob("model-*.safetensors"))  # the model carries the adapter, not the base
    prompts = ["question: what is two plus three? answer:"]
    first = model.predict([{"prompt": p} for p in prompts], params={"max_new_tokens": 3})
    assert predict_in_fresh_process(model_uri, prompts, 3, uri, tmp_path) == first

    # a base whose weights changed (same path, same names) is refused, naming both hashes
    shard = sorted(ext.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="refusing to load it onto a different base") as err:
        load_model(model_uri)
    assert identity["content_hash"] in str(err.value)
    model = load_model(model_uri, model_config={"verify_base_hash": False})  # the explicit opt-out
    assert len(model.predict([{"prompt": p} for p in prompts], params={"max_new_tokens": 2})) == 1


def _large_fp_tensors(min_numel: int) -> int:
    """Live fp32/fp64 tensors of at least `min_numel` elements (the copies an SVD init makes)."""
    import gc

    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta
               and o.dtype in (torch.float32, torch.float64) and o.numel() >= min_numel)


def test_svd_init_streams_the_matrices_of_a_bf16_model(monkeypatch):
    """The fast solvers see one matrix at a time, converted while it is solved: when each solve starts, no
    fp32/fp64 copy of any weight is alive (not the model in fp32, nor the previous matrix's copy)."""
    import importlib

    from transformers import LlamaConfig, LlamaForCausalLM

    import milora

    factors_module = importlib.import_module("milora.core.svd.factors")  # (the package exports a `factors` too)

    torch.manual_seed(0)
    side = svd.AUTO_MIN_SQUARE  # gram on every target
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=side, intermediate_size=2 * side,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=32)).to(torch.bfloat16)
    seen: list[tuple[int, str, torch.dtype]] = []
    real = factors_module.solve

    def watched(W, rank, side_, solver, info=None):  # noqa: ANN001, ANN202
        seen.append((_large_fp_tensors(side * side), solver, W.dtype))
        return real(W, rank, side_, solver, info)

    monkeypatch.setattr(factors_module, "solve", watched)
    cfg = milora.AdapterConfig(method="milora", rank=8, target_modules=["q_proj", "up_proj", "down_proj"])
    peft_model = milora.init_adapter(model, cfg, progress=False)
    assert len(seen) == 6 and all(s == (0, "gram", torch.bfloat16) for s in seen), seen
    report = milora.core.adapter.state_of(peft_model).report
    assert {m.device for m in report.matrices} == {"cpu"}  # where each solve ran, in the report


def test_solve_device_puts_large_matrices_on_the_gpu_when_there_is_one(monkeypatch):
    from milora.core.svd.solvers import solve_device

    cpu = torch.device("cpu")
    big, small = (svd.AUTO_MIN_SIDE, 4096), (64, 4096)
    assert solve_device(None, big, cpu) == cpu or torch.cuda.is_available()
    assert solve_device("cpu", big, cpu) == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert solve_device(None, big, cpu).type == "cuda" and solve_device("auto", big, cpu).type == "cuda"
    assert solve_device(None, small, cpu) == cpu  # small ones stay: a GPU launch costs more than they do
    assert solve_device("cpu", big, cpu) == cpu  # an explicit device wins


@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize(("shape", "path"), [((1376, 512), "chol32"), ((512, 512), "lu32")])
def test_gram_on_a_near_degenerate_small_end_meets_the_energy_bar(rank, shape, path):
    """The builder's clustered small end (k/16 values within 2 %): the Krylov stopping rule must not take a
    rate from two steps (it stopped at 3 blocks with 3e-3 excess), nor stop on an extrapolation that the
    cluster fools (at GRAM_TOL 5e-4 the 7B shapes ended at 1.7e-3-3.4e-3); the bar is 1e-3 of the minor
    energy, on both sides."""
    W = llama_shaped.projection("q_proj", *shape, seed=11).to(torch.float32)
    ref = torch.linalg.svdvals(W.double())
    info: dict = {}
    t = svd.solve(W, rank, "minor", "gram", info=info)
    exact = float(ref[-rank:].square().sum())
    assert info["path"] == path and "fallback" not in info
    assert (svd.captured_energy(W, t.Vh) - exact) / exact <= 1e-3
    assert (svd.captured_energy(W.T, t.U.T) - exact) / exact <= 1e-3


def test_residual_is_written_into_the_loaded_weights_own_storage(small_llama, tmp_path):
    """`from_pretrained` leaves the weights in the safetensors memory maps; the residual must go into that
    storage (else the mapped original stays resident beside it: two copies of every target matrix), for
    init_adapter and load_adapter alike, with the same values as before."""
    from transformers import AutoModelForCausalLM

    import milora
    from milora.core.adapter import residual, state_of

    def load():  # noqa: ANN202
        return AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.bfloat16)

    base = load()
    weight = base.model.layers[0].mlp.up_proj.weight
    ptr, original = weight.data_ptr(), weight.detach().clone()
    cfg = milora.AdapterConfig(method="milora", rank=8, target_modules=["q_proj", "up_proj"])
    model = milora.init_adapter(base, cfg, progress=False)
    assert weight.data_ptr() == ptr
    A0, B0 = state_of(model).init_factors["model.layers.0.mlp.up_proj"]
    assert torch.equal(weight, residual(original, A0, B0, cfg.scale, False))
    milora.save_adapter(model, tmp_path / "adapter")
    fresh = load()
    w2 = fresh.model.layers[0].mlp.up_proj.weight
    ptr2 = w2.data_ptr()
    reloaded = milora.load_adapter(fresh, tmp_path / "adapter")
    assert w2.data_ptr() == ptr2 and torch.equal(w2, weight)
    assert reloaded is not None


def test_a_tied_target_weight_is_replaced_not_written_in_place():
    """A weight two modules share (tied head and embeddings) gets a new residual tensor: the embeddings keep
    the original, and the wrapped model still equals the base at step 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import milora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                         tie_word_embeddings=True)).eval()
    embed = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cfg = milora.AdapterConfig(method="milora", rank=4, dropout=0.0, target_modules=["lm_head", "q_proj"])
    peft_model = milora.init_adapter(model, cfg, progress=False)
    assert torch.equal(peft_model.base_model.model.model.embed_tokens.weight, embed)
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, before, atol=1e-4)
