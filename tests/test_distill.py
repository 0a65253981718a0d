"""Rehearsal distillation (`train.rehearsal_kl`, milora.model.distill): the base's top-k targets on the rehearsal
rows' reply tokens, their collation, the KL term, and the Trainer loss that adds it as the cross-entropy is
normalised. The real profile runs it end to end (tests/test_real_model.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from milora.model import distill
from milora.pipeline.config import ConfigError, validate
from milora.stages.train import PadCollator, RehearsalKLTrainer
from tests.models import tiny_llama


def _examples() -> list[dict]:
    """Two encoded rows (prompt tokens labelled -100): a rehearsal row and a task row."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n_prompt, n_reply, task in ((5, 6, "rehearsal"), (4, 3, "generic")):
        ids = torch.randint(0, 128, (n_prompt + n_reply,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n_prompt + ids[n_prompt:],
                     "task": task})
    return rows


def test_teacher_targets_cover_exactly_the_reply_positions_and_collate_to_a_mask():
    model, rows = tiny_llama(), _examples()
    distill.teacher_targets(model, rows[:1])
    r = rows[0]
    assert r["teacher_pos"] == [4, 5, 6, 7, 8, 9]  # logits at t predict reply token t+1 (the prompt has 5 tokens)
    assert len(r["teacher_ids"]) == 6 and all(len(k) == distill.TOP_K for k in r["teacher_ids"])
    logp = torch.tensor(r["teacher_logp"])
    assert (logp[:, :-1] >= logp[:, 1:]).all() and (logp <= 0).all()  # most likely first, log-probabilities
    batch = PadCollator(0, teacher=True)(rows)
    assert batch["teacher_mask"].shape == (2, 11) and batch["teacher_ids"].shape == (2, 11, distill.TOP_K)
    assert batch["teacher_mask"][0].nonzero().flatten().tolist() == r["teacher_pos"]
    assert not batch["teacher_mask"][1].any()  # the task row has no targets
    assert set(PadCollator(0)(rows)) == {"input_ids", "attention_mask", "labels"}


def test_kl_is_the_top_k_floor_on_the_base_itself_and_grows_as_the_model_moves():
    """On the base itself only the top-k renormalisation remains (-log of the k tokens' mass per position: no
    gradient); a changed model scores more."""
    model, rows = tiny_llama(), _examples()
    distill.teacher_targets(model, rows[:1])
    batch = PadCollator(0, teacher=True)(rows)
    teacher = {k: batch[k] for k in distill.KEYS}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        floor = -torch.tensor(rows[0]["teacher_logp"]).logsumexp(-1).sum()
        assert distill.topk_kl(logits, **teacher) == pytest.approx(float(floor), abs=1e-4)
        moved = tiny_llama(seed=1)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert distill.topk_kl(moved, **teacher) > floor + 0.1
        no_targets = {k: v[1:] for k, v in teacher.items()}
        assert distill.topk_kl(logits[1:], **no_targets) == 0


def test_the_trainer_adds_the_weighted_kl_normalised_per_label_token(tmp_path):
    model, rows = tiny_llama(), _examples()
    distill.teacher_targets(model, rows[:1])
    model.train()
    batch = PadCollator(0, teacher=True)(rows)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = RehearsalKLTrainer(model=model, args=args, kl_weight=0.5)
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        torch.manual_seed(0)
        out = model(**plain)
        n = (batch["labels"][:, 1:] != -100).sum()
        want = out.loss + 0.5 * distill.topk_kl(out.logits, *(batch[k] for k in distill.KEYS)) / n
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_rehearsal_kl_needs_rehearsal_rows():
    assert validate({"train": {"rehearsal_kl": 1.0}, "data": {"rehearsal": {"rows": 8}}}).train.rehearsal_kl == 1.0
    with pytest.raises(ConfigError, match=r"train.rehearsal_kl = 1.0 .* set data.rehearsal.rows > 0"):
        validate({"train": {"rehearsal_kl": 1.0}})
