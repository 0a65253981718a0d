"""milora: scheduled, resumable MiLoRA fine-tuning of LLMs (adapter core, stages, tracking)."""

from milora.adapter import (
    AdapterConfig,
    init_adapter,
    load_adapter,
    merge,
    save_adapter,
    to_lora,
)

__all__ = ["AdapterConfig", "init_adapter", "load_adapter", "merge", "save_adapter", "to_lora"]
__version__ = "0.1.0"
