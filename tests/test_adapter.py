"""Adapter core: step-0 equality, subspaces, merge / to_lora / save-load round trips, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

import milora
from milora.core.adapter import AdapterConfig, current_factors, residual, state_of
from tests.models import tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
METHODS = ["milora", "pissa", "lora"]
FP32_TOL = 1e-4


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def train_some_steps(model: nn.Module, ids: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def cfg(method: str, targets=LLAMA_TARGETS, rank: int = 4, alpha: float | None = None) -> AdapterConfig:
    return AdapterConfig(method=method, rank=rank, alpha=alpha, dropout=0.0, target_modules=targets)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step0_outputs_equal_base(method, arch, input_ids):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    ref = logits(base, input_ids)
    peft_model = milora.init_adapter(base, cfg(method, targets), progress=False)
    assert isinstance(peft_model, PeftModel)
    diff = (logits(peft_model, input_ids) - ref).abs().max().item()
    assert diff <= FP32_TOL, f"{method}/{arch}: step-0 logits moved by {diff}"


def _weights(model: nn.Module, targets) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            w = mod.weight.detach().double()
            out[name] = w.T if type(mod).__name__ == "Conv1D" else w
    return out


@pytest.mark.parametrize("method,side", [("milora", "minor"), ("pissa", "principal")])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_spans_the_chosen_singular_subspace(method, side, arch):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    originals = _weights(base, targets)
    r = 4
    config = cfg(method, targets, rank=r, alpha=8.0)
    peft_model = milora.init_adapter(base, config, progress=False)
    factors = current_factors(peft_model)
    assert set(factors) == set(originals)
    for name, W in originals.items():
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # fp64 reference
        sl = slice(len(S) - r, None) if side == "minor" else slice(0, r)
        A, B = (t.double() for t in factors[name])
        # column space of B and row space of A are the chosen singular subspaces
        Pu = U[:, sl] @ U[:, sl].T
        Pv = Vh[sl].T @ Vh[sl]
        assert torch.allclose(Pu @ B, B, atol=1e-5), name
        assert torch.allclose(A @ Pv, A, atol=1e-5), name
        # and the adapter captures exactly those singular values
        got = torch.linalg.svdvals(config.scale * B @ A)[:r]
        assert torch.allclose(got.sort().values, S[sl].sort().values, rtol=1e-4, atol=1e-6), name


def test_lora_leaves_base_untouched(llama):
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    peft_model = milora.init_adapter(llama, cfg("lora"), progress=False)
    for name, layer in peft_model.named_modules():
        if hasattr(layer, "base_layer") and hasattr(layer, "lora_A"):
            key = name.removeprefix("base_model.model.") + ".weight"
            assert torch.equal(layer.get_base_layer().weight, before[key])
            assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert state_of(peft_model).config.alpha == 8.0  # 2r for LoRA


def test_default_alpha_follows_the_paper():
    assert AdapterConfig(method="milora", rank=16).alpha == 16
    assert AdapterConfig(method="pissa", rank=16).alpha == 16
    assert AdapterConfig(method="lora", rank=16).alpha == 32


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alpha", [None, 16.0])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_to_lora_reproduce_trained_model(method, alpha, arch, input_ids, tmp_path):
    make = tiny_llama if arch == "llama" else tiny_gpt2
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    peft_model = milora.init_adapter(make(), cfg(method, targets, alpha=alpha), progress=False)
    train_some_steps(peft_model, input_ids)
    trained = logits(peft_model, input_ids)
    assert (trained - logits(make(), input_ids)).abs().max() > 1e-3, "training did not move the model"

    merged = milora.merge(peft_model)
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (logits(merged, input_ids) - trained).abs().max() <= FP32_TOL
    # merge copies by default: the PEFT model still works
    assert (logits(peft_model, input_ids) - trained).abs().max() <= FP32_TOL

    milora.to_lora(peft_model, tmp_path / "lora")
    plain = PeftModel.from_pretrained(make(), str(tmp_path / "lora"))
    rank = plain.peft_config["default"].r
    assert rank == (4 if method == "lora" else 8)
    assert (logits(plain, input_ids) - trained).abs().max() <= FP32_TOL


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_onto_fresh_base(method, input_ids, tmp_path):
    peft_model = milora.init_adapter(tiny_llama(), cfg(method), progress=False)
    train_some_steps(peft_model, input_ids)
    trained = logits(peft_model, input_ids)
    out = milora.save_adapter(peft_model, tmp_path / "adapter")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "milora.json"} <= files
    total = sum(p.stat().st_size for p in out.iterdir())
    base_size = sum(p.numel() * 4 for p in tiny_llama().parameters())
    assert total < base_size / 4, "the adapter directory must not carry the residual model"

    loaded = milora.load_adapter(tiny_llama(), out)
    assert (logits(loaded, input_ids) - trained).abs().max() <= FP32_TOL
    # the loaded model can be merged and exported again
    assert (logits(milora.merge(loaded), input_ids) - trained).abs().max() <= FP32_TOL
    milora.to_lora(loaded, tmp_path / "lora")
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    assert (logits(plain, input_ids) - trained).abs().max() <= FP32_TOL


def test_loaded_adapter_trains_further(input_ids, tmp_path):
    peft_model = milora.init_adapter(tiny_llama(), cfg("milora"), progress=False)
    train_some_steps(peft_model, input_ids, steps=2)
    milora.save_adapter(peft_model, tmp_path / "a")
    loaded = milora.load_adapter(tiny_llama(), tmp_path / "a", is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = logits(loaded, input_ids)
    train_some_steps(loaded, input_ids, steps=2)
    after = logits(loaded, input_ids)
    assert (after - before).abs().max() > 1e-4
    milora.to_lora(loaded, tmp_path / "lora")
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    assert (logits(plain, input_ids) - after).abs().max() <= FP32_TOL


# bf16: the residual W - sBA is rounded to bf16 (8 mantissa bits), which moves logits by about
# |logit| * 2^-8. We state the tolerance relative to the logit scale: 2% of max |logit| at step 0,
# 3% after training/merging (merging also rounds the merged weight to bf16).
BF16_STEP0_REL = 0.02
BF16_TRAINED_REL = 0.03


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base(method, input_ids, tmp_path):
    ref = logits(tiny_llama(dtype=torch.bfloat16), input_ids)
    scale = ref.abs().max().item()
    peft_model = milora.init_adapter(tiny_llama(dtype=torch.bfloat16), cfg(method), progress=False)
    for _, layer in peft_model.named_modules():
        if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {}):
            assert layer.get_base_layer().weight.dtype == torch.bfloat16
            assert layer.lora_A["default"].weight.dtype == torch.float32
    assert (logits(peft_model, input_ids) - ref).abs().max().item() <= BF16_STEP0_REL * scale
    train_some_steps(peft_model, input_ids, steps=3, lr=5e-3)
    trained = logits(peft_model, input_ids)
    merged = logits(milora.merge(peft_model), input_ids)
    assert (merged - trained).abs().max().item() <= BF16_TRAINED_REL * scale
    milora.save_adapter(peft_model, tmp_path / "a")
    loaded = milora.load_adapter(tiny_llama(dtype=torch.bfloat16), tmp_path / "a")
    # loading rebuilds the same bf16 residual bit for bit: equal logits
    assert (logits(loaded, input_ids) - trained).abs().max().item() <= 1e-6
    milora.to_lora(peft_model, tmp_path / "lora")
    plain = PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), str(tmp_path / "lora"))
    assert (logits(plain, input_ids) - trained).abs().max().item() <= BF16_TRAINED_REL * scale


def test_svd_runs_in_fp32_for_low_precision_bases():
    W = torch.randn(32, 24).to(torch.bfloat16)
    A0, B0 = torch.randn(4, 24), torch.randn(32, 4)
    R = residual(W, A0, B0, 0.5, fan_in_fan_out=False)
    assert R.dtype == torch.bfloat16
    expected = (W.float() - 0.5 * B0 @ A0).to(torch.bfloat16)
    assert torch.equal(R, expected)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        AdapterConfig(rank=rank)


def test_rank_too_large_names_module(llama):
    with pytest.raises(ValueError, match=r"rank 64 is too large for module 'model\.layers\.0\.self_attn\.q_proj' \(64x64\)"):
        milora.init_adapter(llama, AdapterConfig(rank=64, target_modules=["q_proj"]), progress=False)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown adapter method 'dora'; use one of milora, pissa, lora"):
        AdapterConfig(method="dora")


def test_pattern_matching_nothing_lists_linear_modules(llama):
    with pytest.raises(ValueError, match="matches no module") as err:
        milora.init_adapter(llama, AdapterConfig(target_modules=["query_key_value"]), progress=False)
    for name in ["q_proj", "k_proj", "gate_proj", "down_proj", "lm_head"]:
        assert name in str(err.value)


def test_non_linear_target_rejected(llama):
    with pytest.raises(ValueError, match=r"'model\.embed_tokens' is a Embedding, not a linear layer"):
        milora.init_adapter(llama, AdapterConfig(target_modules=["embed_tokens"]), progress=False)


def test_regex_targets(llama, input_ids):
    ref = logits(copy.deepcopy(llama), input_ids)
    peft_model = milora.init_adapter(
        llama, AdapterConfig(rank=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"), progress=False
    )
    assert sorted(current_factors(peft_model)) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert (logits(peft_model, input_ids) - ref).abs().max() <= FP32_TOL


def test_a_pre_quantized_base_is_refused_with_the_way_to_quantize(llama):
    llama.config.quantization_config = {"load_in_4bit": True}
    with pytest.raises(NotImplementedError, match="pre-quantized base .* set adapter.quantization"):
        milora.init_adapter(llama, AdapterConfig(rank=2), progress=False)


def test_load_rejects_plain_directory(tmp_path, llama):
    with pytest.raises(FileNotFoundError, match="not a MiLoRA adapter directory"):
        milora.load_adapter(llama, tmp_path)
