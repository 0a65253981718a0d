"""Greedy batched generation (used by evaluation and by the served pyfunc).

Memory: generation computes the logits of the last position only (transformers' `logits_to_keep=1`), but on
the prompt pass that position's hidden states are a strided slice (batch x 1 x hidden of batch x prompt x
hidden), and `torch.matmul` of a strided 3-d input with a frozen bf16 weight on the CPU broadcasts the weight
to a batch of copies: batch x the head's bytes (2 GiB at a batch of 8 on a Llama-2-7B-shaped head of 32000 x
4096, 4 GiB at 16). `contiguous_head_input` hands the head a contiguous input (batch x hidden, a plain matrix
product).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


def batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's output embeddings (the LM head) as a module (through a PEFT wrapper too), or None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def _contiguous(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


@contextlib.contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Within: the model's head gets a contiguous input (a forward pre-hook on its output embeddings), so the
    last-position logits of a generation step never copy the head's weight once per row (see the module doc)."""
    head = output_embeddings(model)
    handle = head.register_forward_pre_hook(_contiguous) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 16, max_prompt_tokens: int | None = None) -> list[str]:
    """Greedy, batched generation with the KV cache; returns only the new text of each prompt."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for chunk in batches(list(prompts), batch_size):
            enc = tokenizer(list(chunk), return_tensors="pt", padding=True, add_special_tokens=True,
                            truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)
            enc = {k: v.to(device) for k, v in enc.items()}
            with contiguous_head_input(model):
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outputs

