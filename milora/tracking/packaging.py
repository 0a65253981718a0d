"""The registered model's packaging: an offline-loadable MLflow pyfunc (models from code, `mlflow/milora_pyfunc.py`)
holding the adapter, the base carried whole or referenced by name and content hash, the `milora` package, its
signature, input example and pinned requirements; `log_model` logs it to a run once, with the plain-LoRA export
and/or the merged model when configured."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora.core.errors import MissingInput
from milora.core.io import read_json
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths
from milora.tracking.scrub import scrubbed_copy

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
TAG_MODEL_URI = "milora.model_uri"
PYFUNC_FILE = "milora_pyfunc.py"
DEFAULT_EXAMPLE = {"instruction": "What is 2 + 3?", "input": ""}


def pyfunc_code_path(root: str | os.PathLike[str] = ".") -> Path:
    """`mlflow/milora_pyfunc.py`: next to the `milora` package in a checkout, else under the project root."""
    import milora

    for cand in (Path(milora.__file__).resolve().parents[1] / "mlflow" / PYFUNC_FILE,
                 Path(root).resolve() / "mlflow" / PYFUNC_FILE):
        if cand.is_file():
            return cand
    raise MissingInput(
        f"the pyfunc model code mlflow/{PYFUNC_FILE} is missing (looked next to the milora package and under "
        f"{Path(root).resolve()}): run from a checkout of milora-pipeline"
    )


def _requirements(identity: Mapping[str, Any], quantized: bool) -> list[str]:
    """The serving environment: torch and the HF stack at this run's versions (plus `gguf`, which converts a
    GGUF base again on a machine without this pipeline's models/base, and `bitsandbytes`, which quantizes the
    frozen weights of a quantized adapter again)."""
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    pkgs = ["transformers", "peft", "safetensors", "tokenizers", *(["gguf"] if identity.get("gguf_sha256") else []),
            *(["bitsandbytes"] if quantized else [])]
    for pkg in pkgs:
        reqs.append(f"{pkg}=={importlib.metadata.version(pkg)}")
    return reqs


def _input_example(paths: Paths) -> dict[str, str]:
    """A request for the model's input example: a raw prompt of the eval split, else an instruction."""
    p = paths.prepared_dir / "eval.jsonl"
    if p.is_file():
        with p.open(encoding="utf-8") as f:
            for line in f:
                try:
                    prompt = json.loads(line).get("prompt")
                except (ValueError, AttributeError):
                    continue
                if isinstance(prompt, str) and prompt.strip():
                    return {"prompt": prompt[:1000]}
    return dict(DEFAULT_EXAMPLE)


def signature(cfg: Config) -> Any:
    """The pyfunc's MLflow signature: one request per row, `instruction` (+ `input`), chat `messages`
    (`[{role, content}]`) or a raw `prompt`, all optional columns; one string out; the generation params
    with the evaluate stage's values as defaults."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(
        inputs=Schema([ColSpec("string", "instruction", required=False), ColSpec("string", "input", required=False),
                       ColSpec(Array(message), "messages", required=False),
                       ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", cfg.eval.max_new_tokens),
                            ParamSpec("batch_size", "long", cfg.eval.batch_size)]),
    )


def base_identity(paths: Paths) -> dict[str, Any]:
    """`models/base.json`, required to log a model (it says whether the base is carried or referenced)."""
    if not paths.base_json.is_file():
        raise MissingInput(f"{paths.base_json} is missing: run the base stage first (dvc repro base)")
    return json.loads(paths.base_json.read_text(encoding="utf-8"))


def _carries_base(identity: Mapping[str, Any]) -> bool:
    return bool(identity.get("embedded")) or identity.get("name_or_path") == "embedded"


def _dtype_name(identity: Mapping[str, Any], cfg: Config) -> str:
    name = str(identity.get("dtype") or cfg.model.dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "auto"


def _evaluated_precision(cfg: Config, paths: Paths, adapter_dir: str) -> str:
    """The precision the evaluate stage scored at (its report), else `eval.precision` resolved here."""
    from milora.model.precision import inference_precision

    report = paths.report("eval")
    recorded = read_json(report).get("precision") if report.is_file() else None
    return recorded or inference_precision(cfg.eval.precision, adapter_dir)


def save_pyfunc(dest: str | os.PathLike[str], cfg: Config, paths: Paths, run_id: str | None = None,
                adapter_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the pyfunc model directory (models from code, no pickle) for the outputs under `paths`."""
    from mlflow.models import Model
    from mlflow.pyfunc import save_model

    import milora
    identity = base_identity(paths)
    artifacts = {"adapter": str(Path(adapter_dir or paths.adapter_dir).resolve())}
    model_config: dict[str, Any] = {
        "dtype": _dtype_name(identity, cfg),
        "precision": _evaluated_precision(cfg, paths, artifacts["adapter"]),  # served as the evaluate stage scored
        "trust_remote_code": cfg.model.trust_remote_code,
        "max_prompt_tokens": cfg.data.max_length,
        "device": "auto",
        "max_new_tokens": cfg.eval.max_new_tokens,  # the evaluate stage's generation, the serving default
        "batch_size": cfg.eval.batch_size,
    }
    if _carries_base(identity):
        if not (paths.base_dir / "config.json").is_file():
            raise MissingInput(f"the embedded base {paths.base_dir} is missing: run the base stage first")
        artifacts["base"] = str(paths.base_dir.resolve())
    else:
        # A reference to the base: a Hub id at its recorded revision resolves through the loading machine's HF
        # cache (or the Hub); a local directory is also named by its path on this machine.
        from milora.model.base import is_hub_id, resolved_base_path

        name = identity.get("name_or_path") or cfg.model.name_or_path
        model_config.update(base_name_or_path=name, base_revision=identity.get("revision") or cfg.model.revision)
        if identity.get("gguf_sha256"):  # converted here; elsewhere converted again from the same GGUF file
            model_config.update(base_gguf_sha256=identity["gguf_sha256"], base_converter=identity.get("converter"))
        if identity.get("gguf_sha256") or not is_hub_id(name, paths.root):
            model_config["base_load_path"] = str(resolved_base_path(identity, paths.root).resolve())
        model_config.update(base_content_hash=identity.get("content_hash"),  # the pyfunc refuses other weights
                            verify_base_hash=True)  # (False at load time skips that check)
    with tempfile.TemporaryDirectory(prefix="milora-code-") as tmp:
        code = Path(tmp) / "milora"  # the package the model code imports, carried so it loads anywhere
        shutil.copytree(Path(milora.__file__).resolve().parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        save_model(
            str(dest), python_model=str(pyfunc_code_path(paths.root)), artifacts=artifacts,
            code_paths=[str(code)], signature=signature(cfg), input_example=[_input_example(paths)],
            pip_requirements=_requirements(identity, _quantization(artifacts["adapter"]) != "none"),
            model_config=model_config,
            mlflow_model=Model(run_id=run_id, artifact_path=MODEL_ARTIFACT) if run_id else None,
        )
    return Path(dest)


def _quantization(adapter_dir: str | os.PathLike[str]) -> str:
    """The adapter's `quantization` (none | nf4 | fp4 | int8), as saved."""
    from milora.core.adapter import read_adapter_meta

    return str(read_adapter_meta(adapter_dir)["config"].get("quantization", "none"))


def _load_base(identity: Mapping[str, Any], cfg: Config, paths: Paths) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from milora.model.base import resolved_base_path

    trust = cfg.model.trust_remote_code
    source = str(paths.base_dir if _carries_base(identity) else resolved_base_path(dict(identity), paths.root, trust))
    dt = _dtype_name(identity, cfg)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust,
                                                 dtype="auto" if dt == "auto" else getattr(torch, dt))
    return model, AutoTokenizer.from_pretrained(source, trust_remote_code=trust)


def log_model(mlflow_client: MlflowClient, run_id: str, cfg: Config, paths: Paths) -> str:
    """Log the pyfunc model (and the configured exports) to the run once; return the model's artifact URI."""
    import milora
    from milora.core.adapter import state_of

    run = mlflow_client.get_run(run_id)
    done = run.data.tags.get(TAG_MODEL_URI)
    if done:
        log.info("run %s already has its model at %s", run_id, done)
        return done
    with tempfile.TemporaryDirectory(prefix="milora-model-") as tmp_dir:
        tmp = Path(tmp_dir)
        adapter = scrubbed_copy(paths.adapter_dir, tmp / "clean")
        model_dir = save_pyfunc(tmp / MODEL_ARTIFACT, cfg, paths, run_id, adapter_dir=adapter)
        mlflow_client.log_artifacts(run_id, str(scrubbed_copy(model_dir, tmp / "clean")), MODEL_ARTIFACT)
        rc = cfg.register
        if rc.log_lora_export or rc.log_merged:
            base, tokenizer = _load_base(base_identity(paths), cfg, paths)
            peft_model = milora.load_adapter(base, paths.adapter_dir)
            exports = []
            quantization = state_of(peft_model).config.quantization  # as load_adapter read it
            if rc.log_lora_export and quantization != "none":
                log.warning("register.log_lora_export: no plain-LoRA export of a %s-quantized adapter (a low-rank "
                            "delta on the original weights cannot carry the quantization error); the merged "
                            "export (register.log_merged) is exact", quantization)
            elif rc.log_lora_export:
                exports.append(("lora_export", milora.to_lora(peft_model, tmp / "lora_export")))
            if rc.log_merged:
                out = tmp / "merged"
                milora.merge(peft_model, inplace=True).save_pretrained(out, safe_serialization=True)
                tokenizer.save_pretrained(out)
                exports.append(("merged", out))
            for name, out in exports:
                mlflow_client.log_artifacts(run_id, str(scrubbed_copy(out, tmp / "clean")), name)
    uri = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    mlflow_client.set_tag(run_id, TAG_MODEL_URI, uri)
    log.info("logged the pyfunc model of run %s", run_id)
    return uri
