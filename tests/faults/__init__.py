"""Fault injection for subprocess tests (see `sitecustomize.py` here)."""

import os
from pathlib import Path

SITE = str(Path(__file__).resolve().parent)


def fault_env(fault: str | None = None, kill_at_step: int | None = None, gate_barrier: tuple[str, int] | None = None,
              gate_delay: float | None = None, hold_at_step: tuple[int, str] | None = None) -> dict[str, str]:
    """Environment variables that arm the faults in `milora` subprocesses started with them."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)}
    if fault:
        env["MILORA_TEST_FAULT"] = fault
    if kill_at_step is not None:
        env["MILORA_TEST_KILL_AT_STEP"] = str(kill_at_step)
    if hold_at_step is not None:
        env["MILORA_TEST_HOLD_AT_STEP"] = f"{hold_at_step[0]}:{hold_at_step[1]}"
    if gate_barrier is not None:
        env["MILORA_TEST_GATE_BARRIER"] = f"{gate_barrier[0]}:{gate_barrier[1]}"
    if gate_delay is not None:
        env["MILORA_TEST_GATE_DELAY"] = str(gate_delay)
    return env
