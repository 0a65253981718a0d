"""Quantized frozen weights for QMiLoRA / QPiSSA / QLoRA (bitsandbytes).

The SVD runs on the full-precision weight `W`; what stays frozen is the residual `R = W - s B0 A0` (for
LoRA: `W` itself), and that is what is quantized: `nf4`/`fp4` into a `bnb.nn.Linear4bit` (blocks of 64,
double-quantized statistics, QLoRA's layout), `int8` into a `bnb.nn.Linear8bitLt` (LLM.int8(), outlier
threshold 6). The adapter factors stay in full precision. Quantization is deterministic: the same residual
on the same device gives the same bytes, so `load_adapter` rebuilds exactly what `init_adapter` built.

The step-0 error of the recipe is the residual's own quantization error: the model computes with
`deq(Q(R)) + s B0 A0`, so `||W - (deq(Q(R)) + s B0 A0)||_F = ||R - deq(Q(R))||_F` (`relative_error`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from milora.core.errors import MissingInput, Unsupported

FOUR_BIT = ("nf4", "fp4")
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (transformers' BitsAndBytesConfig default)
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MissingInput(f"adapter.quantization needs the `bitsandbytes` package ({exc}); `pip install "
                           "bitsandbytes` (`make setup` installs the pinned one)") from None
    return bnb


def check_quantizable(name: str, module: nn.Module, kind: str) -> None:
    """A target bitsandbytes can hold quantized: an `nn.Linear` (GPT-2's Conv1D has no bitsandbytes twin)."""
    if kind != "none" and type(module) is not nn.Linear:
        raise Unsupported(f"adapter.quantization={kind}: target module {name!r} is a {type(module).__name__}; "
                          "bitsandbytes quantizes nn.Linear layers only. Set adapter.quantization=none.")


def quantized_linear(module: nn.Linear, weight: Tensor, kind: str) -> nn.Module:
    """A bitsandbytes layer computing like `module` with frozen weight `weight` (out x in) quantized as `kind`,
    on the weight's device, with `module`'s bias."""
    bnb = _bnb()
    has_bias = module.bias is not None
    if kind in FOUR_BIT:
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=has_bias, compute_dtype=weight.dtype,
                                  compress_statistics=True, quant_type=kind, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                         quant_type=kind, module=layer)
        # Not bitsandbytes' CPU inference path: in eval mode on a CPU with AVX512-BF16 it repacks the weight and
        # computes in bf16, so evaluation, serving and the merged model would differ from the model that trained
        # (and from one machine to the next). Dequantize-and-matmul in `compute_dtype`, everywhere.
        layer.support_avx512bf16_for_cpu = False
    elif kind == "int8":
        layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"no quantization {kind!r}")
    if has_bias:
        layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)  # bitsandbytes quantizes when the weight is placed


def dequantized(module: nn.Module) -> Tensor:
    """The weight a quantized layer computes with (out x in, fp32)."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).float()


def relative_error(weight: Tensor, residual: Tensor, layer: nn.Module) -> float:
    """`||R - deq(Q(R))||_F / ||W||_F`: the step-0 error of the quantized model on this matrix."""
    gap = residual.float() - dequantized(layer)
    return float(gap.norm() / weight.float().norm().clamp_min(torch.finfo(torch.float32).tiny))


def quantized_bytes(layer: nn.Module) -> dict[str, Tensor]:
    """The tensors that define a quantized layer's frozen weight (the packed data and its scales): what a
    rebuild must reproduce bit for bit."""
    w = layer.weight
    out = {"data": w.data}
    state = getattr(w, "quant_state", None)
    if state is not None:
        out["absmax"] = state.absmax
        if state.state2 is not None:
            out["absmax2"] = state.state2.absmax
            out["offset"] = state.offset
    scb = getattr(w, "SCB", None)
    if scb is not None:
        out["scb"] = scb
    return out
