"""The numeric precision of training, evaluation and serving, resolved in one place.

* `fp32`: plain float32.
* `bf16`: the weights (and the optimizer state) stay in the model's dtype, float32 by default; the forward pass
  runs under `torch.autocast(dtype=torch.bfloat16)`, so matmuls run in bfloat16 (tensor cores on a GPU;
  oneDNN on a CPU with AMX-BF16 or AVX512-BF16), while the ops autocast keeps in float32 and the model's own
  upcasts (RMSNorm, the loss on float logits) stay in float32.
* `fp16`: float16 autocast with the Trainer's loss scaling; GPU only.
* `auto`: bf16 where the device runs it natively (a CUDA GPU that supports it, a CPU with AMX-BF16 or
  AVX512-BF16 as `torch.cpu.get_capabilities()` reports), fp32 elsewhere.

Training resolves `train.precision` here and records the result in the adapter's lineage (`precision`); the
evaluate stage, `milora eval` and the served pyfunc then compute under that same precision (`autocast`), so
a served answer is the evaluate stage's prediction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from milora.core.errors import InvalidInput

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
LINEAGE_FILE = "lineage.json"  # in a trained adapter's directory (the train stage writes it)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    """The device the stages compute on: `cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: AMX-BF16 or AVX512-BF16, as PyTorch detects them."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def has_native_bf16(device: str) -> bool:
    """Whether `device` (`cpu` or `cuda`) runs bfloat16 matmuls natively."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu_has_bf16()


def resolve_precision(requested: str, device: str | None = None, key: str = "train.precision") -> Precision:
    """`fp32`, `bf16` or `fp16` for `requested` (one of those, or `auto`) on `device` (default: `default_device()`).

    `auto` is bf16 where `device` has native bf16, else fp32. bf16 on a device without it, and fp16 off a GPU,
    are user errors (`InvalidInput`, one line naming `key`)."""
    device = device or default_device()
    if requested == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    if requested == "fp32":
        return "fp32"
    if requested == "bf16":
        if not has_native_bf16(device):
            where = "this GPU" if device == "cuda" else "this CPU (no AMX-BF16 nor AVX512-BF16)"
            raise InvalidInput(f"{key} = bf16: {where} does not compute bfloat16 natively; use fp32 or auto")
        return "bf16"
    if requested == "fp16":
        if device != "cuda":
            raise InvalidInput(f"{key} = fp16 needs a GPU; use fp32, auto, or bf16 on a CPU with AMX or AVX512-BF16")
        return "fp16"
    raise InvalidInput(f"{key} = {requested!r}: not a precision; use auto, fp32, bf16 or fp16")


def autocast(precision: str, device: str | None = None) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in at `precision` (resolved): `torch.autocast` for bf16 / fp16 on
    `device` (default: `default_device()`), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device or default_device(), dtype=_AUTOCAST_DTYPES[precision])


def inference_precision(requested: str, adapter_dir: str | os.PathLike[str] | None = None,
                        device: str | None = None, key: str = "eval.precision") -> Precision:
    """The precision generation and scoring run at (`eval.precision`): `train` is the precision the adapter in
    `adapter_dir` was trained at (its lineage), anything else resolves as `resolve_precision` does.

    fp32 by default: on SmolLM2 under bf16 autocast, the adapter before its first training step (the base's function,
    split into residual and factors) lost 14 of the 184 probe answers the base had right, bf16 rounding alone (fp32:
    0 of 179), noise that retention would count as forgetting."""
    if requested == "train":
        if adapter_dir is None:
            raise InvalidInput(f"{key} = train needs a trained adapter to read its precision from")
        return adapter_precision(adapter_dir)
    return resolve_precision(requested, device, key)


def trainer_flags(precision: str) -> dict[str, bool]:
    """`TrainingArguments(bf16=..., fp16=...)` for a resolved precision: the Trainer (through accelerate) then
    runs the forward pass under the same autocast as `autocast`, keeping the weights and AdamW state in fp32."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def recorded_precision(lineage: Mapping[str, Any] | None) -> Precision:
    """The precision an adapter was trained at, and so is evaluated and served at: its lineage's `precision`
    (fp32 for adapters trained before it was recorded)."""
    p = (lineage or {}).get("precision") or "fp32"
    if p not in PRECISIONS:
        raise InvalidInput(f"the adapter's lineage records precision {p!r}; expected one of {', '.join(PRECISIONS)}")
    return p  # type: ignore[return-value]


def adapter_precision(adapter_dir: str | os.PathLike[str]) -> Precision:
    """`recorded_precision` of the adapter directory `adapter_dir` (its `lineage.json`; fp32 without one)."""
    path = Path(adapter_dir) / LINEAGE_FILE
    return recorded_precision(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None)


def warn_if_emulated(precision: str, device: str | None = None) -> str:
    """`precision`, with a warning when `device` does not compute it natively: a model trained under bf16 autocast
    is still evaluated / served under it there (the same answers, at emulated speed)."""
    device = device or default_device()
    if (precision == "bf16" and not has_native_bf16(device)) or (precision == "fp16" and device != "cuda"):
        log.warning("%s autocast is not native on this %s: computing under it anyway (the answers of the trained "
                    "model, slower)", precision, device)
    return precision
