"""milora: scheduled, resumable MiLoRA fine-tuning of LLMs (adapter core, stages, tracking).

The adapter API (`AdapterConfig`, `init_adapter`, `merge`, `to_lora`, `save_adapter`,
`load_adapter`) is imported lazily, so that `milora --help` and light subcommands don't pay for
torch, transformers and peft.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AdapterConfig", "init_adapter", "load_adapter", "merge", "save_adapter", "to_lora"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from milora.adapter import AdapterConfig, init_adapter, load_adapter, merge, save_adapter, to_lora


def __getattr__(name: str) -> Any:
    if name in __all__:
        from milora import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module 'milora' has no attribute {name!r}")
