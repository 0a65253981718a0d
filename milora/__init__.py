"""milora: scheduled, resumable MiLoRA fine-tuning of LLMs (adapter core, stages, tracking).

The adapter API (`AdapterConfig`, `init_adapter`, `merge`, `to_lora`, `save_adapter`,
`load_adapter`) and the evaluation API (`load_records`: rows of any supported format as records;
`judge(record, prediction)`: the one scoring rule) are imported lazily, so that `milora --help` and
light subcommands don't pay for torch, transformers and peft.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# scipy's OpenBLAS (syrk, potrf and eigh in `milora.core.svd.linalg`) keeps its idle threads spinning for
# 2^28 cycles (~0.1 s) after each call, taking a core from the torch (MKL) work that follows: measured
# ~0.3 s lost per large `gram` solve on 2 cores. OpenBLAS reads this once, when scipy.linalg first loads
# it, so it is set here, on the package's import, before any stage imports transformers or scipy (a
# user's script that loads scipy before milora keeps the default). A value set by the user wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__all__ = ["AdapterConfig", "init_adapter", "judge", "load_adapter", "load_records", "merge", "save_adapter",
           "to_lora"]
_HOMES = {"judge": "milora.model.scoring", "load_records": "milora.data.formats"}  # the rest: milora.core.adapter
__version__ = "0.1.0"

if TYPE_CHECKING:
    from milora.core.adapter import AdapterConfig, init_adapter, load_adapter, merge, save_adapter, to_lora
    from milora.data.formats import load_records
    from milora.model.scoring import judge


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(_HOMES.get(name, "milora.core.adapter")), name)
    raise AttributeError(f"module 'milora' has no attribute {name!r}")
