"""Quantized frozen weights (QMiLoRA, QPiSSA, QLoRA) with bitsandbytes on the CPU: the step-0 error the recipe
guarantees on real SmolLM2 weights, a quantized train step, the bit-for-bit rebuild of save/load, the exact merge,
the refused plain-LoRA export, and the combinations that fail in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import milora
from milora.core import quantize
from milora.core.adapter import _lora_layers, residual
from milora.core.errors import InvalidInput, Unsupported, UserError
from tests.models import tiny_gpt2, tiny_llama

KINDS = ("nf4", "fp4", "int8")


def _frozen(model) -> dict[str, dict[str, torch.Tensor]]:
    return {n: quantize.quantized_bytes(layer.get_base_layer()) for n, layer in _lora_layers(model).items()}


def _same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n])
                                        for n in a)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["milora", "pissa", "lora"])
def test_step0_error_is_the_residuals_quantization_error_and_reloads_bit_for_bit(method, kind, input_ids, tmp_path):
    """The frozen targets become bitsandbytes layers holding Q(W - s B0 A0) (Q(W) for LoRA); the recorded step-0
    error is ||W - (deq(Q(R)) + s B0 A0)|| / ||W||; save/load rebuilds the same quantized bytes and outputs."""
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    cfg = milora.AdapterConfig(method=method, rank=4, dropout=0.0, quantization=kind, target_modules=["q_proj", "v_proj"])
    model = milora.init_adapter(base, cfg, progress=False)
    layers = _lora_layers(model)
    assert {type(layer.get_base_layer()).__name__ for layer in layers.values()} == \
        {"Linear8bitLt" if kind == "int8" else "Linear4bit"}
    state = model.milora_state
    for name, layer in layers.items():
        W = weights[name]
        A0, B0 = state.init_factors[name]
        effective = quantize.dequantized(layer.get_base_layer()) + cfg.scale * (B0 @ A0)
        assert state.quantization_error[name] == pytest.approx(float((W - effective).norm() / W.norm()), rel=1e-4)
        assert layer.lora_A["default"].weight.dtype == torch.float32  # the factors stay in full precision
    assert 0 < max(state.quantization_error.values()) < (0.02 if kind == "int8" else 0.15)

    milora.save_adapter(model, tmp_path / "adapter")
    again = milora.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert _same_bytes(_frozen(model), _frozen(again))
    assert again.milora_state.quantization_error == state.quantization_error
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, again(input_ids).logits)


def _gguf_weights(names: list[str]) -> dict[str, torch.Tensor]:
    """Real trained weights: SmolLM2-135M-Instruct's tensors, dequantized from the packaged GGUF file."""
    from milora.model.gguf import read_tensors, resolve_gguf

    return read_tensors(resolve_gguf("smollm2-135m-instruct"), names)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_step0_error_ordering_on_real_smollm2_weights(kind):
    """On real weights: QPiSSA's residual quantizes with less error than W itself (QLoRA): its principal part
    is carried exactly by the factors; QMiLoRA's error is at most QLoRA's plus the adapter's own term
    ||s B0 A0|| / ||W||, which is small (the minor components carry little energy)."""
    real = _gguf_weights(["blk.14.attn_q.weight", "blk.14.ffn_down.weight", "blk.29.attn_v.weight"])
    r = 16
    for name, W in real.items():
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        err, term = {}, {}
        for side, idx in (("lora", None), ("minor", slice(len(S) - r, None)), ("principal", slice(0, r))):
            if idx is None:
                R, term[side] = W, 0.0
            else:
                B, A = U[:, idx] * S[idx].sqrt(), S[idx].sqrt()[:, None] * Vh[idx]
                R, term[side] = residual(W, A, B, 1.0, False), float((B @ A).norm() / W.norm())
            layer = quantize.quantized_linear(nn.Linear(W.shape[1], W.shape[0], bias=False), R, kind)
            err[side] = quantize.relative_error(W, R, layer)
        assert err["principal"] < err["lora"], (name, err)
        assert err["minor"] <= err["lora"] + term["minor"], (name, err, term)
        assert term["minor"] < 0.15 < term["principal"], (name, term)


def test_a_quantized_train_step_on_the_cpu_moves_the_factors_only(input_ids):
    model = milora.init_adapter(tiny_llama(), milora.AdapterConfig(rank=4, dropout=0.0, quantization="nf4"),
                                progress=False)
    frozen = _frozen(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert _same_bytes(frozen, _frozen(model))  # the quantized residual never changes
    A0 = model.milora_state.init_factors
    moved = [n for n, (A, B) in milora.core.adapter.current_factors(model).items() if not torch.equal(A, A0[n][0])]
    assert moved


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_is_the_trained_model_and_to_lora_refuses_with_the_reason(kind, input_ids, tmp_path):
    """merge folds s B A into the dequantized residual, in full precision: the model that trained (4-bit: equal to
    fp32 rounding; int8: LLM.int8() also rounds the activations in each matmul, so to that rounding). A plain LoRA
    delta on the original W would drop the residual's quantization error: to_lora refuses and says so."""
    model = milora.init_adapter(tiny_llama(), milora.AdapterConfig(rank=4, dropout=0.0, quantization=kind),
                                progress=False)
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            layer.lora_B["default"].weight.add_(0.05)  # a trained adapter, not the init
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids).logits
        merged = milora.merge(model)
        assert not {type(m).__name__ for m in merged.modules()} & set(quantize.QUANTIZED_LAYERS)
        assert all(p.dtype == torch.float32 for p in merged.parameters())
        gap = (merged(input_ids).logits - tuned).abs().max().item()
    assert gap < (1e-2 if kind == "int8" else 1e-5)
    with pytest.raises(Unsupported, match=f"{kind}-quantized frozen weights.*quantization error.*merge"):
        milora.to_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_a_bf16_base_keeps_its_dtype_through_quantization_and_merge(input_ids):
    model = milora.init_adapter(tiny_llama(dtype=torch.bfloat16),
                                milora.AdapterConfig(rank=4, dropout=0.0, quantization="nf4"), progress=False)
    assert {layer.get_base_layer().compute_dtype for layer in _lora_layers(model).values()} == {torch.bfloat16}
    merged = milora.merge(model)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_unsupported_combinations_fail_in_one_line():
    with pytest.raises(Unsupported, match="bitsandbytes quantizes nn.Linear layers only"):  # GPT-2's Conv1D
        milora.init_adapter(tiny_gpt2(), milora.AdapterConfig(rank=4, quantization="nf4", target_modules=["c_attn"]),
                            progress=False)
    quantized = milora.init_adapter(tiny_llama(), milora.AdapterConfig(rank=4, quantization="nf4"), progress=False)
    with pytest.raises(Unsupported, match="pre-quantized base.*SVD needs the full-precision weights"):
        milora.init_adapter(quantized.unload(), milora.AdapterConfig(rank=4), progress=False)
    with pytest.raises(InvalidInput, match="unknown adapter quantization 'q4'; use one of none, nf4, fp4, int8"):
        milora.AdapterConfig(quantization="q4")
    assert issubclass(Unsupported, UserError)  # the CLI and the stages exit 2


PYFUNC_PREDICT = """
import json, sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
print(json.dumps(model.predict([{"prompt": p} for p in json.loads(sys.argv[3])])))
"""


@pytest.mark.slow
def test_milora_run_with_nf4_registers_a_quantized_version_that_serves_as_evaluated(prefect_env, prefect_api,
                                                                                    tmp_path):
    """`milora run -S adapter.quantization=nf4` on the embedded default: svd records the step-0 error, the
    registered version and its run are tagged nf4, the lineage names it, the model needs bitsandbytes, the
    merged export is logged and the plain-LoRA export is not; the pyfunc, loaded in a fresh process, rebuilds
    the quantized residual and answers as the evaluate stage predicted."""
    import json
    import subprocess
    import sys

    from mlflow import MlflowClient

    from flows.report import load_report
    from milora.core.io import read_json, read_jsonl
    from tests.project import env, make_project, run

    root = make_project(tmp_path / "proj", {"register.log_merged": True})
    clean = {k: "" for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT__FLOW_RUN_ID")}
    run(["milora", "run", "-S", "adapter.quantization=nf4"], root, extra_env={**prefect_env, **clean})
    report = load_report(root)
    assert report is not None and report.status == "completed"
    svd = read_json(root / "reports" / "svd.json")["quantization"]
    assert svd["type"] == "nf4" and 0 < svd["relative_error_mean"] <= svd["relative_error_max"] < 0.5
    assert read_json(root / "models" / "adapter" / "lineage.json")["quantization"] == "nf4"

    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'milora'")
    assert version.tags["milora.quantization"] == "nf4"
    assert client.get_run(version.run_id).data.tags["milora.quantization"] == "nf4"
    logged = {a.path for a in client.list_artifacts(version.run_id)}
    assert "merged" in logged and "lora_export" not in logged
    requirements = next((root / "mlflow").rglob("model/requirements.txt")).read_text()
    assert "bitsandbytes==" in requirements

    suite = sorted((root / "eval" / "suites").glob("*.jsonl"))[0]
    expected = read_jsonl(suite)[:4]
    p = subprocess.run([sys.executable, "-c", PYFUNC_PREDICT, uri, f"models:/milora/{version.version}",
                        json.dumps([r["prompt"] for r in expected])], cwd=tmp_path, env=env(clean),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [r["prediction"] for r in expected]


@pytest.mark.slow
@pytest.mark.parametrize(("quantization", "loaded"), [("none", False), ("nf4", True)])
def test_a_stage_process_loads_bitsandbytes_only_when_the_run_quantizes(quantization, loaded, tmp_path):
    """`milora stage` and `milora register` leave bitsandbytes out of a run that quantizes nothing (PEFT would
    import it, ~0.85 s and a warning per process): PEFT and transformers then see it as not installed. A run that
    quantizes imports it as before."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys\nfrom milora.cli import leave_out_bitsandbytes\n"
            f"leave_out_bitsandbytes({str(root / 'params.yaml')!r}, {{'adapter.quantization': {quantization!r}}})\n"
            "import peft, transformers.utils.import_utils as iu\n"
            "print(sys.modules.get('bitsandbytes') is not None, iu.is_bitsandbytes_available(), "
            "peft.import_utils.is_bnb_available())\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == [str(loaded)] * 3, p.stdout
    if not loaded:  # nor bitsandbytes' import-time warning (on CPUs without the `kernels` package)
        assert "bitsandbytes" not in p.stderr, p.stderr[-3000:]
