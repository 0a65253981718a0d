"""The base model: its identity (`models/base.json`, written by the `base` stage) and `load_base`.

* `model.name_or_path` names a local HF directory or a Hub id: record its identity (where to load it
  from, revision, a content hash of its weight files, dtype, parameter count) in `models/base.json`.
  No weights are copied.
* `model.name_or_path: embedded`: bootstrap a tiny Llama-architecture causal LM by really pretraining
  it on the synthetic corpus (`milora.data.synthetic`), with a byte-level BPE tokenizer trained on that
  corpus by `tokenizers`, and save both in HF format (safetensors) under `models/base`. The loss curve,
  the held-out perplexity against the uniform baseline and the weight spectra (trained vs the random
  init) are recorded, so the claim "genuinely pretrained" is checked on every build.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from milora.core.errors import InvalidInput, MissingInput
from milora.core.io import sha256_file
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
WEIGHT_PATTERNS = ("*.safetensors",)


# ----------------------------------------------------------------------------- identity


def content_hash(files: Sequence[Path]) -> str:
    """sha256 over the (name, sha256 of bytes) of each file, in name order: the weights' identity."""
    outer = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        outer.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return "sha256:" + outer.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    return sorted({f for pat in WEIGHT_PATTERNS for f in model_dir.glob(pat)})


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _hub_snapshot(name: str, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "cannot resolve this id"
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise InvalidInput(
                f"model.name_or_path {name!r} is not a local directory, and the Hugging Face Hub is offline "
                f"(HF_HUB_OFFLINE=1) with no cached snapshot of it{f' at revision {revision!r}' if revision else ''}. "
                "Download it while online (`huggingface-cli download NAME`), or set model.name_or_path to a local "
                "model directory."
            ) from None
        raise InvalidInput(f"model.name_or_path {name!r}: cannot fetch it from the Hugging Face Hub: {exc}") from None


def resolve_model(name_or_path: str, root: Path = Path("."), revision: str | None = None,
                  trust_remote_code: bool = False) -> tuple[Path, str | None]:
    """Where an external model loads from (a local directory or a Hub snapshot) and its revision."""
    local = Path(os.path.expanduser(name_or_path))
    if not local.is_absolute() and (root / local).exists():
        local = root / local
    if local.is_dir():
        return local.resolve(), revision
    if local.exists():
        raise InvalidInput(f"model.name_or_path {name_or_path!r} is a file; point it at a model directory "
                         "(config.json + *.safetensors) or a Hub id")
    if _looks_like_path(name_or_path):
        raise MissingInput(f"model.name_or_path {name_or_path!r}: no such directory")
    snap = _hub_snapshot(name_or_path, revision, trust_remote_code)
    return snap.resolve(), snap.name  # snapshots/<commit sha>


def count_parameters(config: Any, trust_remote_code: bool = False) -> int:
    """Parameter count of a causal LM from its config alone (built on the meta device: no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def is_hub_id(name_or_path: str, root: Path = Path(".")) -> bool:
    """Whether `model.name_or_path` names a Hub model (`org/name`) rather than a local directory."""
    local = Path(os.path.expanduser(name_or_path))
    return not (local.exists() or (root / local).exists() or _looks_like_path(name_or_path))


def external_identity(model_cfg: Any, root: Path = Path(".")) -> tuple[dict[str, Any], Path]:
    """The `models/base.json` record of a local or Hub model (nothing is copied), and where it loads from here.

    The record names the model the way the user did (`name_or_path`), its revision (a Hub snapshot's commit)
    and the content hash of its weights, but not the machine's path to them (a Hub cache or a directory
    elsewhere): the record is a dependency of every later stage, and must not change with the machine or
    workspace. `load_base` resolves the path again (`resolved_base_path`)."""
    from transformers import AutoConfig

    load_path, revision = resolve_model(model_cfg.name_or_path, root, model_cfg.revision, model_cfg.trust_remote_code)
    if not (load_path / "config.json").exists():
        raise InvalidInput(f"{load_path}: no config.json; model.name_or_path must be a Hugging Face model directory")
    weights = weight_files(load_path)
    if not weights:
        raise InvalidInput(
            f"{load_path}: no *.safetensors weight files. Convert the checkpoint to safetensors "
            "(`model.save_pretrained(dir, safe_serialization=True)`); pickled weights are not loaded."
        )
    config = AutoConfig.from_pretrained(load_path, trust_remote_code=model_cfg.trust_remote_code)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {
        "name_or_path": model_cfg.name_or_path,
        "revision": revision,
        "content_hash": content_hash(weights),
        "weight_files": [f.name for f in weights],
        "dtype": model_cfg.dtype,
        "stored_dtype": str(stored).removeprefix("torch.") if stored is not None else None,
        "n_params": count_parameters(config, model_cfg.trust_remote_code),
        "embedded": False,
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_type": config.model_type,
    }, load_path


# ----------------------------------------------------------------------------- the embedded base
























# ----------------------------------------------------------------------------- loading


def base_info(cfg: Config, paths: Paths) -> dict[str, Any]:
    """models/base.json, checked to describe `cfg.model.name_or_path`."""
    from milora.core.io import read_json

    if not paths.base_json.exists():
        raise MissingInput(f"{paths.base_json} not found: run `milora stage base` first")
    info = read_json(paths.base_json)
    if info.get("name_or_path") != cfg.model.name_or_path:
        raise InvalidInput(
            f"{paths.base_json} describes {info.get('name_or_path')!r} but model.name_or_path is "
            f"{cfg.model.name_or_path!r}: run `milora stage base` again"
        )
    return info


def resolved_base_path(info: dict[str, Any], root: Path, trust_remote_code: bool = False) -> Path:
    """Where the base a `models/base.json` record describes loads from on this machine: the embedded base's
    directory under `root` (`load_path`), else `name_or_path` resolved again (a local directory, or a Hub
    id's snapshot at the recorded revision in the local HF cache, offline)."""
    if info.get("load_path"):
        p = Path(info["load_path"])
        return p if p.is_absolute() else root / p
    path, _ = resolve_model(info["name_or_path"], root, info.get("revision"), trust_remote_code)
    return path


def base_path(cfg: Config, paths: Paths) -> Path:
    """The directory `from_pretrained` loads the base (and its tokenizer) from."""
    return resolved_base_path(base_info(cfg, paths), paths.root, cfg.model.trust_remote_code)


def load_tokenizer(cfg: Config, paths: Paths) -> Any:
    """The base's tokenizer, offline, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path(cfg, paths), local_files_only=True,
                                              trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base(cfg: Config, paths: Paths, dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the base recorded in models/base.json, loaded offline; the model in eval mode.

    `dtype` defaults to `model.dtype`. The tokenizer has a pad token; set `tokenizer.padding_side = "left"`
    for batched generation.
    """
    from transformers import AutoModelForCausalLM

    path = base_path(cfg, paths)
    want = dtype if dtype is not None else cfg.model.dtype
    torch_dtype = _DTYPES.get(want, want) if isinstance(want, str) else want
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True, use_safetensors=True,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model.eval()
    return model, load_tokenizer(cfg, paths)
