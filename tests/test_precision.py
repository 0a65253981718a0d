"""train.precision: `auto` resolves to bf16 autocast on a CPU with native bf16 (AMX / AVX512-BF16, as
`torch.cpu.get_capabilities()` reports them), fp32 elsewhere; bf16 is refused in one line where the CPU lacks it.
CPUs with and without it are simulated by patching PyTorch's capability function; no GPU is assumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import milora
from milora.cli import main
from milora.core.errors import InvalidInput
from milora.model.generate import generate
from milora.model.nll import mean_loss
from milora.model.precision import (
    adapter_precision,
    autocast,
    inference_precision,
    recorded_precision,
    resolve_precision,
)
from milora.pipeline.config import validate
from milora.stages.train import training_arguments
from milora.tracking import runlog
from milora.tracking.lineage import lineage_tags
from tests.project import write_params

NO_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
AVX512_BF16 = {**NO_BF16, "avx512_bf16": True}
AMX = {**NO_BF16, "amx_bf16": True, "amx_tile": True}


def cpu_with(monkeypatch, caps: dict) -> None:
    """Make this process a CPU-only machine whose CPU reports `caps`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


@pytest.mark.parametrize(("caps", "auto"), [(NO_BF16, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16")])
def test_auto_is_bf16_exactly_on_cpus_with_native_bf16(monkeypatch, caps, auto):
    cpu_with(monkeypatch, caps)
    assert resolve_precision("auto") == auto
    assert resolve_precision("fp32") == "fp32"
    assert training_arguments(validate({}), Path("unused")).bf16 is (auto == "bf16")


def test_bf16_is_accepted_with_native_bf16_and_refused_in_one_line_without(monkeypatch):
    cpu_with(monkeypatch, AVX512_BF16)
    assert resolve_precision("bf16") == "bf16"
    args = training_arguments(validate({"train": {"precision": "bf16"}}), Path("unused"))
    assert (args.bf16, args.fp16) == (True, False)

    cpu_with(monkeypatch, NO_BF16)
    with pytest.raises(InvalidInput) as err:
        resolve_precision("bf16")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train.precision = bf16") and "use fp32 or auto" in msg
    with pytest.raises(InvalidInput, match="train.precision = fp16 needs a GPU"):
        resolve_precision("fp16")


def test_milora_stage_train_refuses_bf16_without_native_bf16_as_a_user_error(monkeypatch, tmp_path, capsys):
    """Exit 2 and one message line, before anything is loaded (no pipeline outputs exist here)."""
    cpu_with(monkeypatch, NO_BF16)
    write_params(tmp_path)
    code = main(["stage", "train", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml"),
                 "-S", "train.precision=bf16"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    assert err[0] == ("milora stage: error: train.precision = bf16: this CPU (no AMX-BF16 nor AVX512-BF16) does not "
                      "compute bfloat16 natively; use fp32 or auto")
    assert err[1:] == ["(run with --debug for the full traceback)"]  # the CLI's hint after every user error


def test_autocast_runs_matmuls_in_bf16_and_keeps_fp32_weights(llama, input_ids):
    seen = []
    layer = llama.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        with autocast("bf16", "cpu"):
            low = llama(input_ids).logits
        with autocast("fp32", "cpu"):
            full = llama(input_ids).logits
    assert seen == [torch.bfloat16, torch.float32]
    assert {p.dtype for p in llama.parameters()} == {torch.float32}
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert torch.allclose(low.float(), full, atol=0.1)


def test_the_recorded_precision_comes_from_the_adapter_lineage(tmp_path):
    assert recorded_precision(None) == "fp32"  # adapters trained before the precision was recorded
    assert recorded_precision({"precision": "bf16"}) == "bf16"
    with pytest.raises(InvalidInput, match="records precision 'int4'"):
        recorded_precision({"precision": "int4"})
    assert adapter_precision(tmp_path) == "fp32"
    (tmp_path / "lineage.json").write_text(json.dumps({"precision": "bf16"}))
    assert adapter_precision(tmp_path) == "bf16"


def test_inference_runs_in_fp32_unless_eval_precision_says_otherwise(monkeypatch, tmp_path):
    """eval.precision (the evaluate stage, the served pyfunc, compare) is fp32 by default, whatever training ran at;
    `train` follows the adapter's lineage; a precision this machine lacks is refused in one line naming the key."""
    cpu_with(monkeypatch, AMX)
    assert validate({}).eval.precision == "fp32"
    assert inference_precision(validate({}).eval.precision, tmp_path) == "fp32"
    assert inference_precision("auto") == "bf16"
    (tmp_path / "lineage.json").write_text(json.dumps({"precision": "bf16"}))
    assert inference_precision("train", tmp_path) == "bf16"
    with pytest.raises(InvalidInput, match="eval.precision = train needs a trained adapter"):
        inference_precision("train")
    cpu_with(monkeypatch, NO_BF16)
    with pytest.raises(InvalidInput, match="^eval.precision = bf16: this CPU"):
        inference_precision("bf16", tmp_path)
    with pytest.raises(Exception, match="eval.precision"):
        validate({"eval": {"precision": "int8"}})


def test_run_params_and_tags_record_what_auto_resolved_to(tmp_path):
    from milora.pipeline.paths import Paths

    cfg = validate({})
    lineage = {"method": "milora", "rank": 8, "precision": "bf16",
               "params": {"train": {"precision": "auto"}}}
    params = runlog.run_params(cfg, lineage)
    assert params["train.precision"] == "auto" and params[runlog.PARAM_PRECISION] == "bf16"
    assert lineage_tags(cfg, Paths(tmp_path), lineage)["milora.precision"] == "bf16"
    assert runlog.PARAM_PRECISION not in runlog.run_params(cfg, {"params": {}})


def test_generation_and_nll_under_bf16_autocast_are_deterministic_and_close_to_fp32(tmp_path):
    """What the evaluate stage and the pyfunc compute under bf16: the same on every call, near fp32."""
    from milora.model.tokenize import encode
    from milora.pipeline.paths import Paths
    from tests.pipeline_outputs import build_base

    base, tok, _ = build_base(Paths(tmp_path))
    model = milora.init_adapter(base, milora.AdapterConfig(rank=4), progress=False).eval()
    prompts = ["question: what is two plus three? answer:", "the quick brown"]
    enc = [encode(tok, p, " five", 64) for p in prompts]
    with autocast("bf16", "cpu"):
        first, nll = generate(model, tok, prompts, 6), mean_loss(model, enc)
        assert generate(model, tok, prompts, 6) == first and mean_loss(model, enc) == nll
    assert nll == pytest.approx(mean_loss(model, enc), abs=0.05)


def test_gradient_checkpointing_reaches_the_trainer_under_transformers_5s_name_without_a_warning():
    """`train.gradient_checkpointing` sets TrainingArguments' `activation_checkpointing` (the deprecated
    `gradient_checkpointing` argument warned in every train stage); the old attribute still mirrors it."""
    import warnings

    for on in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = training_arguments(validate({"train": {"gradient_checkpointing": on}}), Path("unused"))
        assert args.activation_checkpointing is on and args.gradient_checkpointing is on
