"""Shared fixtures: offline environment and tiny models built from configs (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.models import tiny_gpt2, tiny_llama  # noqa: E402


@pytest.fixture
def llama():
    """A tiny randomly initialised Llama-architecture causal LM (fp32, eval mode)."""
    return tiny_llama()


@pytest.fixture
def gpt2():
    """A tiny randomly initialised GPT-2-architecture causal LM (fp32, eval mode)."""
    return tiny_gpt2()


@pytest.fixture
def input_ids():
    """A fixed batch of token ids valid for the tiny models."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (2, 12), generator=g)
