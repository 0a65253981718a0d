"""The MLflow pyfunc model of a MiLoRA fine-tune: requests in, generated answers out.

Each input row is one request (`milora.data.formats.request_prompt`, the code that builds training and
evaluation prompts): `instruction` (+ `input`) gets the training template, chat `messages` the
tokenizer's chat template (as chat training rows), and a raw `prompt` is used as given. Generation is
greedy with the evaluate stage's settings (`max_new_tokens`, `batch_size` params; their defaults are the
training run's `eval.max_new_tokens` / `eval.batch_size`) and at its precision (`model_config["precision"]`:
fp32, or the bf16 / fp16 autocast the adapter was trained and evaluated under), so the served model answers
an example with exactly the text the evaluate stage predicted for it in the same batch.

Logged as *models from code* by `milora.tracking.packaging` (no pickle): MLflow copies this file into the
model and runs it at load time. The model directory carries everything it needs offline:

* `artifacts["adapter"]`: the MiLoRA adapter (`milora.save_adapter` format), loaded with
  `milora.load_adapter`, which rebuilds the residual weights on the original base;
* `artifacts["base"]`: the base model and tokenizer in HF format (safetensors), when the base was
  carried whole (the embedded tiny base); a GGUF base (`model_config["base_gguf_sha256"]`) loads from the
  pipeline's converted copy where it exists, else is converted again from the GGUF file the name resolves
  to (a path, or a packaged name such as `smollm2-135m-instruct` in its installed wheel), refused unless
  the file's sha256 matches; otherwise `model_config["base_name_or_path"]` and
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

import threading
import warnings
from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

# `predict` takes no type hint for its input on purpose (see there); MLflow's nudge to add one is noise.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")

DEFAULT_PARAMS = ("max_new_tokens", "batch_size")  # defaults: EvalConfig's, unless the run recorded its own
REQUEST_COLUMNS = ("instruction", "input", "messages", "prompt")


def _plain(value: Any) -> Any:
    """numpy arrays / scalars from a DataFrame cell as plain Python values (messages arrive as arrays)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


def requests_of(model_input: Any) -> list[dict[str, Any]]:
    """The requests of a pyfunc input: DataFrame rows / dicts with `instruction` (+ `input`), `messages` or
    `prompt`; bare strings (outside the signature's enforcement) are raw prompts. Missing cells are dropped."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input if any(isinstance(v, list) for v in model_input.values())
                                   else [model_input])
    if isinstance(model_input, pd.Series | np.ndarray):
        model_input = np.asarray(model_input).reshape(-1).tolist()
    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    else:
        rows = [{"prompt": r} if isinstance(r, str) else r for r in model_input]
    out = []
    for r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"each request must be a record or a prompt string; got {type(r).__name__}")
        out.append({k: _plain(v) for k, v in r.items()
                    if v is not None and not (isinstance(v, float) and v != v)})  # NaN: a missing cell
    if not out or not any(out):
        raise ValueError("no requests: send records with `instruction` (and optional `input`), chat `messages` "
                         'or a raw `prompt`, e.g. {"dataframe_records": [{"instruction": "..."}]}')
    return out


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
        from milora.model.precision import default_device, recorded_precision, warn_if_emulated
        from milora.pipeline.config import EvalConfig

        cfg = dict(context.model_config or {})
        artifacts = context.artifacts
        revision = None
        if "base" in artifacts:
            source = artifacts["base"]
        elif cfg.get("base_load_path") and os.path.isdir(cfg["base_load_path"]):
            source = cfg["base_load_path"]
        elif cfg.get("base_gguf_sha256"):  # a GGUF base: convert the same file again (checked by its sha256)
            from milora.model.gguf import converted_copy

            dtype_name = str(cfg.get("dtype") or "float32")
            source = str(converted_copy(cfg["base_name_or_path"], cfg["base_gguf_sha256"], dtype_name))
        else:
            source, revision = cfg["base_name_or_path"], cfg.get("base_revision")
        trust = bool(cfg.get("trust_remote_code", False))
        if "base" not in artifacts and cfg.get("base_content_hash") and cfg.get("verify_base_hash", True):
            source, revision = verified_base(source, revision, cfg["base_content_hash"], trust), None
        dtype = getattr(torch, str(cfg.get("dtype") or "float32"))
        device = str(cfg.get("device") or "auto")
        if device == "auto":
            device = default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, trust_remote_code=trust)
        self.model = milora.load_adapter(base, artifacts["adapter"]).to(device).eval()
        # the precision the adapter was trained and evaluated at (set when the model was logged; fp32 before)
        self.precision = warn_if_emulated(recorded_precision({"precision": cfg.get("precision")}), device)
        self.device = device
        self.max_prompt_tokens = cfg.get("max_prompt_tokens")
        self.defaults = {k: cfg[k] if cfg.get(k) is not None else EvalConfig.model_fields[k].default
                         for k in DEFAULT_PARAMS}
        self.base_source, self.base_revision, self.dtype, self.trust_remote_code = source, revision, dtype, trust
        self._lock = threading.Lock()

    def load_base(self) -> Any:
        """A fresh copy of the original base model (without the adapter), e.g. for base-model comparisons."""
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.base_source, revision=self.base_revision, dtype=self.dtype,
                                                    trust_remote_code=self.trust_remote_code)
        return base.to(next(self.model.parameters()).device).eval()

    def prompts(self, model_input: Any) -> list[str]:
        """The prompt text of each request (the training template / chat template applied)."""
        from milora.data.formats import request_prompt

        return [request_prompt(r, self.tokenizer) for r in requests_of(model_input)]

    # `model_input` has no type hint on purpose: MLflow would derive the signature from it; the logged
    # signature (the request columns and the generation params) is explicit.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """Greedy generation (as in evaluation, under the same autocast): one answer, without the prompt, per
        request."""
        from milora.model.generate import generate
        from milora.model.precision import autocast

        p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = self.prompts(model_input)
        # One generation at a time: `mlflow models serve` runs concurrent requests in threads, and a fast
        # tokenizer shared across threads fails ("Already borrowed") or pads on the wrong side mid-batch.
        with self._lock, autocast(self.precision, self.device):
            return generate(self.model, self.tokenizer, prompts, int(p["max_new_tokens"]),
                            max(1, int(p["batch_size"])), self.max_prompt_tokens)


set_model(MiloraGenerator())
