"""A model to evaluate outside the pipeline (`milora eval --model ...`), whatever form it comes in:

* a registered or logged model, `models:/name@alias`, `models:/name/version` or `runs:/<run>/model`: the
  pyfunc is loaded through MLflow (the very code that serves it), so its base, adapter, template and
  generation defaults are the served model's;
* a MiLoRA adapter directory (`milora.json`; `models/adapter` of a project): loaded on its base, found
  from `--base`, else from the adapter's `lineage.json` (relative to its project) or `adapter_config.json`;
* a plain Hugging Face model directory (`config.json`, safetensors): evaluated as it is (no base to compare).

Each is evaluated at its precision (`EvalModel.precision`): a registered model's is the one it was evaluated and
is served at (the pyfunc's `model_config`), so `milora eval` scores as the evaluate stage and the served model
compute; an adapter directory's and a plain model's is fp32 (`eval.precision`'s default; `--precision` overrides).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.core.errors import InvalidInput, MissingInput

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    """A model ready to evaluate: the model (eval mode), its tokenizer, how to load its base (for lm-eval
    deltas; None for a plain model), and the generation settings it was evaluated / is served with."""

    model: Any
    tokenizer: Any
    load_base: Callable[[], Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # max_new_tokens, batch_size, max_length
    description: str = ""
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast: what the model was evaluated and is served at


def _pretrained(source: str | Path, dtype: str = "float32", revision: str | None = None,
                trust_remote_code: bool = False) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _on_device(model: Any) -> Any:
    from milora.model.precision import default_device

    return model.to(default_device()).eval()


def adapter_base(adapter_dir: Path, base: str | os.PathLike[str] | None = None) -> Path:
    """The base model directory of a MiLoRA adapter: `base`, else its lineage's `load_path`, else
    `adapter_config.json`'s `base_model_name_or_path`, whichever exists."""
    candidates: list[Path] = [Path(base)] if base else []
    if not base:
        lineage = adapter_dir / "lineage.json"
        load_path = (json.loads(lineage.read_text(encoding="utf-8")).get("base") or {}).get("load_path") \
            if lineage.is_file() else None
        if load_path:
            p = Path(load_path)
            candidates += [p] if p.is_absolute() else [adapter_dir.parent.parent / p, Path.cwd() / p]
        cfg = adapter_dir / "adapter_config.json"
        if cfg.is_file():
            name = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
            if name:
                candidates.append(Path(name))
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise MissingInput(f"cannot find the base model of the adapter {adapter_dir} (looked at "
                       f"{', '.join(map(str, candidates)) or 'nothing'}): pass --base DIR")


def _registered(uri: str, root: str | os.PathLike[str]) -> EvalModel:
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from milora.tracking.scrub import redact_uri
    from milora.tracking.store import tracking_uri

    store = tracking_uri(root)
    # The store for this load only (the registry follows it): a process-wide set_tracking_uri would outlive the
    # call. Not download_artifacts(tracking_uri=): MLflow 3 resolves a models:/ URI with the process-wide store.
    try:
        with _use_tracking_uri(store):
            served = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except mlflow.exceptions.MlflowException as exc:
        raise MissingInput(f"cannot load {uri} from {redact_uri(store)}: {exc.message} (check the name, "
                           "alias or version, and MLFLOW_TRACKING_URI)") from None
    defaults = {**served.defaults, "max_length": served.max_prompt_tokens}
    return EvalModel(served.model, served.tokenizer, served.load_base, defaults, f"{uri} (MLflow pyfunc)",
                     getattr(served, "precision", "fp32"))  # models logged before precision was recorded: fp32


def load_eval_model(spec: str, base: str | None = None, root: str | os.PathLike[str] = ".") -> EvalModel:
    """The model `spec` names (see the module docstring), loaded for evaluation."""
    if spec.startswith(("models:/", "runs:/")):
        return _registered(spec, root)
    path = Path(os.path.expanduser(spec))
    if (path / "milora.json").is_file():
        import milora
        base_dir = adapter_base(path, base)
        model, tokenizer = _pretrained(base_dir)
        peft_model = _on_device(milora.load_adapter(model, path))  # the residual is rebuilt where the factors are
        return EvalModel(peft_model, tokenizer, lambda: _on_device(_pretrained(base_dir)[0]), {},
                         f"adapter {path} on base {base_dir}", "fp32")
    if (path / "config.json").is_file():
        model, tokenizer = _pretrained(path)
        return EvalModel(_on_device(model), tokenizer, None, {}, f"model {path}", "fp32")
    if not path.exists():
        raise MissingInput(f"--model {spec!r}: no such directory, and not a models:/ or runs:/ URI")
    raise InvalidInput(f"--model {spec!r}: not a MiLoRA adapter directory (milora.json) nor a Hugging Face model "
                       "directory (config.json); give models:/NAME@ALIAS, an adapter directory or a model directory")
