"""Token-weighted negative log-likelihood: eval loss, perplexity, held-out (forgetting) loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from milora.core.errors import InvalidInput
from milora.model.generate import batches


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


@torch.no_grad()
def sequence_nll(model: nn.Module, batch: list[dict[str, list[int]]]) -> torch.Tensor:
    """Summed NLL and token count of the labelled tokens of each encoded example: (n, 2)."""
    device = next(model.parameters()).device
    ids = _pad([b["input_ids"] for b in batch], 0).to(device)
    mask = _pad([b["attention_mask"] for b in batch], 0).to(device)
    labels = _pad([b["labels"] for b in batch], -100).to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(tok * valid).sum(-1)
    return torch.stack([nll, valid.sum(-1).float()], dim=-1).cpu()


def nll_totals(model: nn.Module, encoded: list[dict[str, list[int]]], batch_size: int = 16) -> tuple[float, int]:
    """Summed NLL (nats) and number of labelled tokens over encoded examples."""
    total, count = 0.0, 0.0
    for chunk in batches(encoded, batch_size):
        r = sequence_nll(model, list(chunk))
        total += r[:, 0].sum().item()
        count += r[:, 1].sum().item()
    return total, int(count)


def mean_loss(model: nn.Module, encoded: list[dict[str, list[int]]], batch_size: int = 16) -> float:
    """Token-weighted mean NLL over encoded examples."""
    total, count = nll_totals(model, encoded, batch_size)
    return total / max(count, 1)


def encode_text(tokenizer: Any, text: str, max_length: int) -> list[dict[str, list[int]]]:
    """Chunks of plain text encoded for a language-modelling loss on every token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = max_length - len(bos)
    out = []
    for i in range(0, len(ids), step):
        chunk = bos + ids[i: i + step]
        if len(chunk) > 1:
            out.append({"input_ids": chunk, "attention_mask": [1] * len(chunk), "labels": chunk})
    return out


def heldout_nll(model: nn.Module, tokenizer: Any, lines: Sequence[str], max_length: int,
                batch_size: int = 16) -> tuple[float, int]:
    """Mean token NLL of the model on held-out text documents, and the number of tokens scored."""
    encoded = [e for line in lines for e in encode_text(tokenizer, line, max_length)]
    if not encoded:
        raise InvalidInput("held-out text is empty: nothing to measure forgetting on")
    was_training = model.training
    model.eval()
    total, count = nll_totals(model, encoded, batch_size)
    model.train(was_training)
    return total / max(count, 1), count


def heldout_loss(model: nn.Module, tokenizer: Any, lines: Sequence[str], max_length: int,
                 batch_size: int = 16) -> float:
    """Mean token NLL of the model on held-out text documents."""
    return heldout_nll(model, tokenizer, lines, max_length, batch_size)[0]

