"""Prefect flows of the pipeline: thin orchestration over the DVC stages (see `flows.pipeline`).

`from flows import milora_pipeline` imports Prefect (so do its tasks, `flows.tasks`); the helper modules
(`flows.steps`, `flows.params`, `flows.report`, `flows.workspace`) do not, so Prefect settings can still be
chosen before it loads.
`flows.fanout` is the fan-out flow over many runs of a deployment (`python -m flows.fanout`).
"""

from typing import Any

__all__ = ["milora_pipeline"]


def __getattr__(name: str) -> Any:
    if name == "milora_pipeline":
        from flows.pipeline import milora_pipeline

        return milora_pipeline
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
