"""MiLoRA / PiSSA / LoRA adapters on PEFT.

For every targeted weight `W = U diag(S) V^T`, MiLoRA initialises the LoRA factors from the `r`
smallest singular triplets (`B = U_r sqrt(S_r/s)`, `A = sqrt(S_r/s) V_r^T`, `s = alpha/rank`) and
replaces the frozen weight by the residual `W - s B A`, so the wrapped model equals the original at
step 0. PiSSA does the same with the `r` largest triplets; LoRA is PEFT's default init. The initial
factors (A0, B0) are kept on the model: they let an adapter be saved without the residual model,
reloaded onto the original base, and exported as a plain LoRA adapter (`dW = s(B A - B0 A0)`).

With `quantization` (nf4, fp4, int8) the frozen residual is stored quantized (bitsandbytes, see
`milora.core.quantize`): QMiLoRA, QPiSSA, and QLoRA for plain LoRA. `merge` then folds the adapter into the
dequantized residual (the model that trained and was evaluated), and `to_lora` refuses: a low-rank delta on
the original weight cannot carry the residual's quantization error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from milora.core import quantize, svd
from milora.core.errors import InvalidInput, MissingInput, Unsupported
from milora.core.io import atomic_dir, dump_json
from milora.core.schema import AdapterConfig

log = logging.getLogger(__name__)

# Two warnings PEFT raises from its own code in every process that builds or saves a PeftModel (each stage, each
# checkpoint), about nothing the user or this package can change: PEFT still calls transformers' deprecated
# `is_gradient_checkpointing`, and in offline mode it cannot look a base's name up on the Hub to tell whether the
# vocabulary was resized (adapters here never target the embeddings). Only these exact messages are silenced.
PEFT_NOISE = ((r"`is_gradient_checkpointing` is deprecated", FutureWarning),
              (r"Could not find a config file in .* - will assume that the vocabulary was not modified", UserWarning))
for _message, _category in PEFT_NOISE:
    warnings.filterwarnings("ignore", message=_message, category=_category)

ADAPTER_NAME = "default"
STATE_FILE = "milora.json"
INIT_FILE = "milora_init.safetensors"
FORMAT_VERSION = 1
_PEFT_PREFIX = "base_model.model."


@dataclass
class MiloraState:
    """What `init_adapter` records on the model: the config and the initial factors per module."""

    config: AdapterConfig
    fan_in_fan_out: bool
    init_factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (A0, B0), fp32 CPU
    cache_keys: dict[str, str] = field(default_factory=dict)
    report: svd.InitReport | None = None
    spectra: dict[str, Tensor] = field(default_factory=dict)
    quantization_error: dict[str, float] = field(default_factory=dict)  # name -> ||R - deq(Q(R))|| / ||W||
    base_dtype: torch.dtype = torch.float32  # the target weights' dtype before quantization (what merge writes)


# ----------------------------------------------------------------------------- target resolution


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's target matching: a regex is full-matched, a name list matches exact names or suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_not_quantized(model: nn.Module) -> None:
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    names = {type(m).__name__ for m in model.modules()}
    if quant is not None or getattr(model, "is_quantized", False) or names & set(quantize.QUANTIZED_LAYERS):
        raise Unsupported(
            "a pre-quantized base (bitsandbytes 4/8-bit or another quantization_config) cannot be initialised: the "
            "SVD needs the full-precision weights. Load the base in float32, bfloat16 or float16 and set "
            "adapter.quantization (nf4, fp4, int8): the residual is quantized after the SVD."
        )


def resolve_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The modules `config.target_modules` selects, checked to be linear and large enough for the rank."""
    _check_not_quantized(model)
    linear = {n: m for n, m in model.named_modules() if _is_linear(m)}
    chosen = {n: m for n, m in model.named_modules() if n and _matches(n, config.target_modules)}
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise InvalidInput(
            f"target_modules {config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Its linear modules are: {', '.join(leaves) or '(none)'}. Set adapter.target_modules to some of them."
        )
    for name, mod in chosen.items():
        if not _is_linear(mod):
            raise InvalidInput(
                f"target module {name!r} is a {type(mod).__name__}, not a linear layer; only nn.Linear "
                "(and GPT-2 Conv1D) layers can carry a LoRA adapter. Narrow adapter.target_modules."
            )
        m, n = weight_2d(mod).shape
        if config.rank >= min(m, n):
            raise InvalidInput(
                f"adapter rank {config.rank} is too large for module {name!r} ({m}x{n}): "
                f"use a rank below {min(m, n)} or exclude that module from target_modules."
            )
        if not mod.weight.dtype.is_floating_point:
            raise Unsupported(f"module {name!r} has non-float weights ({mod.weight.dtype}): not supported")
        quantize.check_quantizable(name, mod, config.quantization)
    kinds = {_is_conv1d(m) for m in chosen.values()}
    if len(kinds) > 1:
        raise InvalidInput("target_modules mixes nn.Linear and Conv1D layers; adapt one kind per adapter.")
    return chosen


def weight_2d(module: nn.Module) -> Tensor:
    """The weight as `out x in` (Conv1D stores it transposed)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def residual(weight: Tensor, A0: Tensor, B0: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
    """`W - scale * B0 @ A0` in fp32 (fp64 for fp64 weights), returned in the weight's dtype and layout.

    Two work-precision matrices in flight (the copy of `W` and the product), the subtraction in place.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    R = (weight.T if fan_in_fan_out else weight).to(work, copy=True)
    delta = B0.to(R.device, work) @ A0.to(R.device, work)
    delta.mul_(scale)
    R.sub_(delta)  # = W - delta, bit for bit
    del delta
    R = R.to(weight.dtype)
    return (R.T if fan_in_fan_out else R).contiguous()


def _shared_storage(model: nn.Module) -> Set[int]:
    """Data pointers of parameters that more than one module holds (tied weights): never written in place."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def _set_residual(module: nn.Module, A0: Tensor, B0: Tensor, scale: float, fan_in_fan_out: bool,
                  shared: Set[int] = frozenset()) -> None:
    """Replace the frozen weight by its residual *in its own storage*.

    Not `weight.data = residual`: `from_pretrained` leaves the weights in the safetensors files' memory
    maps, whose pages stay resident after the tensor is replaced, so every target matrix would then be
    held twice (the mapped original and the new residual: ~2x the model's bytes in the svd, train and
    evaluate stages). Written in place, a mapped page becomes the residual's (copy on write of a private
    map) and the model stays one copy. A weight in `shared` (tied to another module) becomes a parameter
    of its own, so the other module keeps the original.
    """
    weight = module.weight
    R = residual(weight, A0, B0, scale, fan_in_fan_out)
    if weight.data_ptr() in shared:
        module.weight = nn.Parameter(R, requires_grad=weight.requires_grad)
    else:
        weight.data.copy_(R)


def _quantize_targets(model: nn.Module, targets: dict[str, nn.Module], factors: dict[str, tuple[Tensor, Tensor]],
                      state: MiloraState) -> None:
    """Replace each target by a bitsandbytes layer holding its residual `W - s B0 A0` (`W` without factors)
    quantized, one matrix in flight; record each matrix's step-0 error."""
    config = state.config
    for name, module in targets.items():
        weight = module.weight
        R = residual(weight, *factors[name], config.scale, False) if name in factors else weight.detach()
        layer = quantize.quantized_linear(module, R, config.quantization)
        state.quantization_error[name] = quantize.relative_error(weight.detach(), R, layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        del R


def _lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and ADAPTER_NAME in mod.lora_A:
            out[name.removeprefix(_PEFT_PREFIX)] = mod
    return out


def _lora_config(config: AdapterConfig, fan_in_fan_out: bool, base_name: str | None) -> LoraConfig:
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=True,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )


# ----------------------------------------------------------------------------- public API


def init_adapter(model: nn.Module, config: AdapterConfig, cache: Any = None, progress: bool = True) -> PeftModel:
    """Wrap a causal LM with a PEFT LoRA adapter initialised by MiLoRA, PiSSA or LoRA (outputs unchanged)."""
    targets = resolve_targets(model, config)
    fifo = _is_conv1d(next(iter(targets.values())))
    state = MiloraState(config=config, fan_in_fan_out=fifo, base_dtype=next(iter(targets.values())).weight.dtype)
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    if config.side is not None:
        from milora.core.cache import open_cache

        weights = {n: weight_2d(m).detach() for n, m in targets.items()}
        factors, trips, state.report = svd.compute_factors(
            weights, config.rank, config.side, config.scale, config.svd_solver, open_cache(cache), progress
        )
        state.cache_keys = {m.name: m.key for m in state.report.matrices if m.key}
        state.spectra = {n: t.spectrum for n, t in trips.items() if t.spectrum is not None}

    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    shared = _shared_storage(model)
    quantized = config.quantization != "none"
    if quantized:  # the residual of the fp32 factors the adapter starts from (PEFT keeps them in fp32)
        factors = {n: (A.float(), B.float()) for n, (A, B) in factors.items()}
        with torch.no_grad():
            _quantize_targets(model, targets, factors, state)
    peft_model = get_peft_model(model, _lora_config(config, fifo, base_name), autocast_adapter_dtype=True)
    layers = _lora_layers(peft_model)
    for name, layer in layers.items():
        A_param = layer.lora_A[ADAPTER_NAME].weight
        B_param = layer.lora_B[ADAPTER_NAME].weight
        if name in factors:
            A0, B0 = factors[name]
            with torch.no_grad():
                A_param.copy_(A0)
                B_param.copy_(B0)
                if not quantized:
                    _set_residual(layer.get_base_layer(), A_param.float(), B_param.float(), config.scale, fifo,
                                  shared)
        state.init_factors[name] = (A_param.detach().float().cpu().clone(), B_param.detach().float().cpu().clone())
    peft_model.milora_state = state
    log.info("%s adapter: rank %d, alpha %g on %d modules%s", config.method, config.rank, config.alpha, len(layers),
             f", frozen weights {config.quantization}" if quantized else "")
    return peft_model


def state_of(peft_model: PeftModel) -> MiloraState:
    """The MiLoRA state `init_adapter` / `load_adapter` recorded on the model."""
    state = getattr(peft_model, "milora_state", None)
    if state is None:
        raise InvalidInput(
            "this model carries no MiLoRA state: build it with milora.init_adapter or milora.load_adapter"
        )
    return state


def current_factors(peft_model: PeftModel) -> dict[str, tuple[Tensor, Tensor]]:
    """The trained factors (A, B) per module, fp32 on CPU."""
    return {
        n: (layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu(), layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu())
        for n, layer in _lora_layers(peft_model).items()
    }


def merge(peft_model: PeftModel, inplace: bool = False) -> nn.Module:
    """A plain transformers model with the adapter folded into the weights (copy unless `inplace`).

    With quantized frozen weights the merged weight is `deq(Q(R)) + s B A` in the base's dtype: the model that
    trained and was evaluated, not PEFT's merge (which quantizes the sum again and loses the adapter's update
    below the quantization step)."""
    import copy

    model = peft_model if inplace else copy.deepcopy(peft_model)
    state = getattr(model, "milora_state", None)
    if state is not None and state.config.quantization != "none":
        with torch.no_grad():
            for layer in _lora_layers(model).values():
                base = layer.get_base_layer()
                weight = quantize.dequantized(base) + layer.get_delta_weight(ADAPTER_NAME).float()
                plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                  device=weight.device, dtype=state.base_dtype)
                plain.weight.copy_(weight)
                if base.bias is not None:
                    plain.bias.copy_(base.bias)
                layer.base_layer = plain
        return model.unload()
    return model.merge_and_unload()


PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_MODEL_CARD = "README.md"


def canonical_peft_dir(out_dir: str | os.PathLike[str], base_name: str | None = None) -> None:
    """Make what `save_pretrained` wrote into `out_dir` byte-reproducible: `adapter_config.json` as canonical
    JSON with `target_modules` sorted (PEFT keeps it as a set: its order in the file changes with the
    process's hash seed, and it means nothing), `base_model_name_or_path` set to `base_name` when given (a
    name, not the machine's path the base was loaded from), and no generated model card (a template naming
    that path)."""
    out = Path(out_dir)
    path = out / PEFT_CONFIG_FILE
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    if base_name is not None:
        cfg["base_model_name_or_path"] = base_name
    path.write_text(dump_json(cfg), encoding="utf-8")
    (out / PEFT_MODEL_CARD).unlink(missing_ok=True)


def to_lora(peft_model: PeftModel, out_dir: str | os.PathLike[str], base_name: str | None = None) -> Path:
    """Write a plain PEFT LoRA adapter (rank 2r) against the original base: `dW = s(B A - B0 A0)`."""
    state = state_of(peft_model)
    cfg = state.config
    if cfg.quantization != "none":
        worst = max(state.quantization_error.values(), default=0.0)
        raise Unsupported(
            f"to_lora: this adapter trained on {cfg.quantization}-quantized frozen weights deq(Q(W - s B0 A0)) "
            f"({cfg.method}); a low-rank delta on the original weight W would drop their quantization error "
            f"(up to {worst:.2%} of ||W|| per matrix at step 0), so it would not reproduce the trained model. "
            "Use merge() (the exact merged model in full precision) or the adapter directory itself."
        )
    trained = current_factors(peft_model)
    tensors: dict[str, Tensor] = {}
    for name, (A, B) in trained.items():
        if cfg.method == "lora":
            A2, B2 = A, B  # B0 = 0: the adapter is already a delta on the original base
        else:
            A0, B0 = state.init_factors[name]
            A2, B2 = torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A2.contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B2.contiguous()
    rank = cfg.rank if cfg.method == "lora" else 2 * cfg.rank
    export = AdapterConfig(
        method="lora", rank=rank, alpha=cfg.scale * rank, dropout=cfg.dropout,
        target_modules=cfg.target_modules, svd_solver=cfg.svd_solver,
    )
    recorded_base = peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path
    with atomic_dir(out_dir) as tmp:
        _lora_config(export, state.fan_in_fan_out, base_name or recorded_base).save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        canonical_peft_dir(tmp)
    log.info("exported plain LoRA adapter (rank %d) to %s", rank, out_dir)
    return Path(out_dir)


def save_adapter(
    peft_model: PeftModel, out_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None,
    base_name: str | None = None,
) -> Path:
    """Save a PEFT adapter directory plus the initial factors (never the residual model).

    The directory is byte-reproducible: the same adapter gives the same bytes in any process (canonical
    JSON, sorted lists; see `canonical_peft_dir`). `base_name` names the base in `adapter_config.json`
    (default: what the base was loaded from)."""
    state = state_of(peft_model)
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
        canonical_peft_dir(tmp, base_name)
        if state.config.method != "lora":
            init = {}
            for name, (A0, B0) in state.init_factors.items():
                init[f"{name}.A0"] = A0.contiguous()
                init[f"{name}.B0"] = B0.contiguous()
            save_file(init, tmp / INIT_FILE, metadata={"format": "pt"})
        meta = {
            "format_version": FORMAT_VERSION,
            "config": state.config.model_dump(mode="json"),
            "scale": state.config.scale,
            "fan_in_fan_out": state.fan_in_fan_out,
            "modules": sorted(state.init_factors),
            "cache_keys": state.cache_keys,
            **(extra or {}),
        }
        (tmp / STATE_FILE).write_text(dump_json(meta), encoding="utf-8")
    return Path(out_dir)


def read_adapter_meta(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The `milora.json` metadata of a saved adapter directory."""
    path = Path(adapter_dir) / STATE_FILE
    if not path.exists():
        raise MissingInput(
            f"{adapter_dir} is not a MiLoRA adapter directory (no {STATE_FILE}); "
            "a plain LoRA adapter loads with peft.PeftModel.from_pretrained"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise InvalidInput(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def load_adapter(
    original_base: nn.Module, adapter_dir: str | os.PathLike[str], is_trainable: bool = False
) -> PeftModel:
    """Load a saved adapter onto the original base, rebuilding the residual weights from the initial factors."""
    meta = read_adapter_meta(adapter_dir)
    config = AdapterConfig.model_validate(meta["config"])
    fifo = bool(meta["fan_in_fan_out"])
    targets = resolve_targets(original_base, config)
    state = MiloraState(config=config, fan_in_fan_out=fifo, cache_keys=meta.get("cache_keys", {}),
                        base_dtype=next(iter(targets.values())).weight.dtype)
    missing = sorted(set(meta["modules"]) - set(targets))
    if missing:
        raise InvalidInput(f"{adapter_dir}: the base has no module(s) {missing[:5]}: is it the adapter's base model?")
    init = load_file(str(Path(adapter_dir) / INIT_FILE)) if config.method != "lora" else {}
    factors = {n: (init[f"{n}.A0"], init[f"{n}.B0"]) for n in meta["modules"]} if init else {}
    with torch.no_grad():
        if config.quantization != "none":  # the same residual quantized the same way: the same bytes
            _quantize_targets(original_base, {n: targets[n] for n in meta["modules"]}, factors, state)
        else:
            shared = _shared_storage(original_base)
            for name, (A0, B0) in factors.items():
                _set_residual(targets[name], A0, B0, config.scale, fifo, shared)
    state.init_factors.update(factors)
    peft_model = PeftModel.from_pretrained(original_base, str(adapter_dir), is_trainable=is_trainable)
    if config.method == "lora":
        state.init_factors = {n: (A.clone(), torch.zeros_like(B)) for n, (A, B) in current_factors(peft_model).items()}
    peft_model.milora_state = state
    return peft_model
