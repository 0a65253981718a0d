"""Rehearsal distillation: a KL(base || tuned) term on the rehearsal rows' reply tokens (`train.rehearsal_kl`).

Rehearsal rows (`data.rehearsal`: the base's own greedy replies, task `rehearsal` in `data/prepared`) already
keep the tuned model saying what the base said; cross-entropy on them only rewards the base's top token. The
distillation term also keeps the rest of the base's next-token distribution at every reply token, so the model
stays near the base where the learning task should not move it (what it keeps on SmolLM2: docs/benchmarks.md,
"what it takes to learn without forgetting").

The teacher is the base itself, read once at the start of training before the adapter is applied (`teacher_targets`:
in the base's dtype without autocast, deterministic, recomputed identically on resume): its `TOP_K` most likely next tokens and their
log-probabilities at each reply position, renormalised over those `TOP_K` in the loss (`topk_kl`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TOP_K = 64  # the teacher's most likely tokens kept per position (the rest of its mass is renormalised away)
KEYS = ("teacher_ids", "teacher_logp", "teacher_mask")  # what a collated batch carries for `topk_kl`


@torch.no_grad()
def teacher_targets(model: nn.Module, examples: Sequence[dict[str, Any]]) -> None:
    """Attach the base `model`'s top-`TOP_K` next-token log-probabilities to each encoded example (`input_ids`,
    `labels`), in place: `teacher_pos` (logit positions t whose next token t+1 is a reply token), `teacher_ids`
    and `teacher_logp` (`[len(teacher_pos)][TOP_K]`). One unpadded example at a time, at the model's own dtype:
    the same numbers on every run."""
    model.eval()
    device = next(model.parameters()).device
    for ex in examples:
        pos = (torch.tensor(ex["labels"][1:]) != -100).nonzero().flatten()
        logits = model(input_ids=torch.tensor([ex["input_ids"]], device=device)).logits[0, pos.to(device)].float()
        logp, top = F.log_softmax(logits, dim=-1).topk(TOP_K, dim=-1)
        ex["teacher_pos"] = pos.tolist()
        ex["teacher_ids"] = top.cpu().tolist()
        ex["teacher_logp"] = logp.cpu().tolist()


def collate(batch: Sequence[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
    """The teacher targets of a padded batch of `length` tokens: `teacher_ids` / `teacher_logp` `[B, length, TOP_K]`
    and `teacher_mask` `[B, length]` (True at the logit positions that have targets; none for non-rehearsal rows)."""
    ids = torch.zeros(len(batch), length, TOP_K, dtype=torch.long)
    logp = torch.zeros(len(batch), length, TOP_K)
    mask = torch.zeros(len(batch), length, dtype=torch.bool)
    for b, ex in enumerate(batch):
        pos = ex.get("teacher_pos")
        if pos:
            ids[b, pos] = torch.tensor(ex["teacher_ids"])
            logp[b, pos] = torch.tensor(ex["teacher_logp"])
            mask[b, pos] = True
    return {"teacher_ids": ids, "teacher_logp": logp, "teacher_mask": mask}


def topk_kl(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
            teacher_mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked positions of KL(teacher || student), the teacher's top-k renormalised to a distribution
    and the student's log-probabilities (over the whole vocabulary) read at those k tokens."""
    if not bool(teacher_mask.any()):
        return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alike on every rank
    student = F.log_softmax(logits[teacher_mask].float(), dim=-1).gather(-1, teacher_ids[teacher_mask])
    t = F.log_softmax(teacher_logp[teacher_mask], dim=-1)  # renormalised over the k tokens
    return (t.exp() * (t - student)).sum()
