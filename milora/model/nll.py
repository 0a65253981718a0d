"""Token-weighted negative log-likelihood: eval loss, perplexity, held-out (forgetting) loss.

Memory: log-probabilities are computed at the labelled positions only, in slices of at most
`LOGITS_CHUNK_BYTES` of fp32 logits (the slice's log-softmax takes as much again), so no `batch x sequence x
vocabulary` fp32 tensor is made (at a 32000-token vocabulary, 16 x 256 positions are 0.5 GiB of fp32 logits,
and their log-softmax another 0.5 GiB). Where the model's logits are its output embeddings (the head) applied
to its last hidden states, which is checked on every batch (`_position_logits`), the model itself computes
the logits of one position per row and the labelled positions' hidden states go through the head slice by
slice: not even the model's own logits exist in full. Otherwise (the model does not call its head module,
or changes the logits after it, e.g. soft-capping them) its full logits, in its own dtype, are scored slice
by slice. The model runs without a KV cache (scoring needs none; Llama-2-7B's would take 2 GiB at 16 x 256
tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from milora.core.errors import InvalidInput
from milora.model.generate import batches, output_embeddings

# The most fp32 logits scored at once: a slice of `LOGITS_CHUNK_BYTES // (4 * vocabulary)` positions (512 at a
# 32000-token vocabulary; one slice for a small model's batch).
LOGITS_CHUNK_BYTES = 64 * 2**20


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def target_logprobs(logits_of: Callable[[int, int], Tensor], targets: Tensor, vocab: int) -> Tensor:
    """log p(target) for each of `targets` (n,) in fp32, where `logits_of(s, e)` gives the (e - s, vocab) logits of
    targets s..e-1; computed in slices of at most `LOGITS_CHUNK_BYTES` of fp32 logits."""
    n = targets.shape[0]
    step = max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
    out = torch.empty(n, dtype=torch.float32, device=targets.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        logp = torch.log_softmax(logits_of(s, e).float(), dim=-1)
        out[s:e] = logp.gather(-1, targets[s:e].unsqueeze(-1)).squeeze(-1)
        del logp
    return out


def _position_logits(model: nn.Module, ids: Tensor, mask: Tensor) -> tuple[Callable[[Tensor, Tensor], Tensor], int]:
    """One forward pass: a function from positions (row and column index tensors, n each) to their logits
    (n, vocabulary), and the vocabulary size.

    A forward pre-hook on the output embeddings (the head) keeps their input, the last hidden states (batch x
    sequence x hidden), and passes on the last position only. When the model's logits there equal the head's
    on that input bit for bit (nothing scales or caps them after the head), the positions' logits are the
    head's on their hidden states; otherwise (or when the model never called its head module) they are read
    from the model's full logits (a second forward pass when the first computed one position)."""
    head = output_embeddings(model)
    kept: list[Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if kept or not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != tuple(ids.shape):
            return None
        kept.append(x)
        return (x[:, -1:].contiguous(), *args[1:])  # contiguous: a strided 3-d input makes matmul copy the head

    handle = head.register_forward_pre_hook(keep) if head is not None else None
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if kept:
        hidden = kept[0]
        if logits.shape[:2] == (ids.shape[0], 1) and torch.equal(logits.float(), head(hidden[:, -1:].contiguous()).float()):
            return (lambda r, c: head(hidden[r, c])), logits.shape[-1]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return (lambda r, c: logits[r, c]), logits.shape[-1]


@torch.no_grad()
def sequence_nll(model: nn.Module, batch: list[dict[str, list[int]]]) -> torch.Tensor:
    """Summed NLL and token count of the labelled tokens of each encoded example: (n, 2)."""
    device = next(model.parameters()).device
    ids = _pad([b["input_ids"] for b in batch], 0).to(device)
    mask = _pad([b["attention_mask"] for b in batch], 0).to(device)
    labels = _pad([b["labels"] for b in batch], -100).to(device)
    tgt = labels[:, 1:]
    valid = tgt != -100
    rows, cols = valid.nonzero(as_tuple=True)  # the labelled positions, row by row
    logits_at, vocab = _position_logits(model, ids, mask)
    picked = target_logprobs(lambda s, e: logits_at(rows[s:e], cols[s:e]), tgt[rows, cols], vocab)
    tok = torch.zeros(tgt.shape, dtype=torch.float32, device=device)
    tok[rows, cols] = picked
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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Within: the model in eval mode (no dropout); after: back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _documents(tokenizer: Any, lines: Sequence[str], max_length: int) -> list[tuple[int, dict[str, list[int]]]]:
    """Every chunk of the held-out documents `lines`, encoded, with the index of its document."""
    encoded = [(i, e) for i, line in enumerate(lines) for e in encode_text(tokenizer, line, max_length)]
    if not encoded:
        raise InvalidInput("held-out text is empty: nothing to measure forgetting on")
    return encoded


def heldout_nll(model: nn.Module, tokenizer: Any, lines: Sequence[str], max_length: int,
                batch_size: int = 16) -> tuple[float, int]:
    """Mean token NLL of the model on held-out text documents, and the number of tokens scored."""
    encoded = [e for _, e in _documents(tokenizer, lines, max_length)]
    with eval_mode(model):
        total, count = nll_totals(model, encoded, batch_size)
    return total / max(count, 1), count


def document_nll(model: nn.Module, tokenizer: Any, lines: Sequence[str], max_length: int,
                 batch_size: int = 16) -> list[float]:
    """Each held-out text document's mean token NLL (a long document over all its chunks): one value per
    document, so a forgetting measure can be resampled by document."""
    totals = [[0.0, 0.0] for _ in lines]
    with eval_mode(model):
        for chunk in batches(_documents(tokenizer, lines, max_length), batch_size):
            r = sequence_nll(model, [e for _, e in chunk])
            for (i, _), (nll, count) in zip(chunk, r.tolist(), strict=True):
                totals[i][0] += nll
                totals[i][1] += count
    return [total / count for total, count in totals if count > 0]


def heldout_loss(model: nn.Module, tokenizer: Any, lines: Sequence[str], max_length: int,
                 batch_size: int = 16) -> float:
    """Mean token NLL of the model on held-out text documents."""
    return heldout_nll(model, tokenizer, lines, max_length, batch_size)[0]

