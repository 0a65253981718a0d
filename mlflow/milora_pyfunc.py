"""The MLflow pyfunc model of a MiLoRA fine-tune: prompts in, generated continuations out.

Logged as *models from code* by `milora.tracking.registry` (no pickle): MLflow copies this file into the
model and runs it at load time. The model directory carries everything it needs offline:

* `artifacts["adapter"]`: the MiLoRA adapter (`milora.save_adapter` format), loaded with
  `milora.load_adapter`, which rebuilds the residual weights on the original base;
* `artifacts["base"]`: the base model and tokenizer in HF format (safetensors), when the base was
  carried whole (the embedded tiny base); otherwise `model_config["base_name_or_path"]` and
  `model_config["base_revision"]` name it, resolved through the local HF cache or a path, and its
  weight files must hash to `model_config["base_content_hash"]` (the base the adapter was trained on):
  a different base is refused, since the adapter's residual is only right on its own base
  (`model_config={"verify_base_hash": False}` at load time skips the check, and its cost: reading the
  weight files once, ~1 s per GB);
* the `milora` package itself, through `code_paths`, so a plain MLflow + torch + transformers + peft
  environment can load it.

This directory has no `__init__.py` on purpose: it must never shadow the installed `mlflow` package.
"""

from __future__ import annotations

import warnings
from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

# `predict` takes no type hint for its input on purpose (see there); MLflow's nudge to add one is noise.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")

DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 32, "batch_size": 8}


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a pyfunc input: a list/array of strings, one string, or a DataFrame column `prompt`."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series | np.ndarray):
        values = np.asarray(model_input).reshape(-1).tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, dict) and "prompt" in model_input:
        values = model_input["prompt"]
        values = [values] if isinstance(values, str) else list(values)
    else:
        values = list(model_input)
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"every prompt must be a string; got {', '.join(sorted(set(bad)))}")
    return values


def verified_base(source: str, revision: str | None, expected: str, trust_remote_code: bool = False) -> str:
    """The local directory of the referenced base (a path, or a Hub id + revision through the HF cache),
    after checking that its weight files hash to `expected`; raises ValueError naming both hashes if not."""
    from pathlib import Path

    from milora.model.base import content_hash, resolve_model, weight_files

    path, _ = resolve_model(source, Path("."), revision, trust_remote_code)
    found = content_hash(weight_files(path))
    if found != expected:
        raise ValueError(
            f"the base model at {path} has content hash {found}, but this adapter was trained on the base with "
            f"content hash {expected}: refusing to load it onto a different base. Point the model at the original "
            "base weights (model_config base_load_path / base_name_or_path + base_revision), or pass "
            'model_config={"verify_base_hash": False} to load it anyway.'
        )
    return str(path)


class MiloraGenerator(PythonModel):
    """The base model plus the MiLoRA adapter, generating greedily as the evaluate stage does."""

    def load_context(self, context: Any) -> None:
        """Load the base (carried, or by reference), then the adapter on top of it."""
        import os

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import milora

        cfg = dict(context.model_config or {})
        artifacts = context.artifacts
        revision = None
        if "base" in artifacts:
            source = artifacts["base"]
        elif cfg.get("base_load_path") and os.path.isdir(cfg["base_load_path"]):
            source = cfg["base_load_path"]
        else:
            source, revision = cfg["base_name_or_path"], cfg.get("base_revision")
        trust = bool(cfg.get("trust_remote_code", False))
        if "base" not in artifacts and cfg.get("base_content_hash") and cfg.get("verify_base_hash", True):
            source, revision = verified_base(source, revision, cfg["base_content_hash"], trust), None
        dtype = getattr(torch, str(cfg.get("dtype") or "float32"))
        device = str(cfg.get("device") or "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, trust_remote_code=trust)
        self.model = milora.load_adapter(base, artifacts["adapter"]).to(device).eval()
        self.max_prompt_tokens = cfg.get("max_prompt_tokens")

    # `model_input` has no type hint on purpose: MLflow would derive the signature from it and refuse
    # the DataFrame form; the logged signature (one string column, `max_new_tokens` param) is explicit.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """Greedy generation (as in evaluation): one continuation, without the prompt, per input prompt."""
        from milora.model.generate import generate

        p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        return generate(self.model, self.tokenizer, prompts_of(model_input), int(p["max_new_tokens"]),
                        max(1, int(p["batch_size"])), self.max_prompt_tokens)


set_model(MiloraGenerator())
