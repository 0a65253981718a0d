"""Scoring and generation memory at a vocabulary and sequence long enough to take the chunked path: the
log-probabilities of `milora.model.nll.sequence_nll` computed in slices of at most `LOGITS_CHUNK_BYTES` of fp32
logits equal those of the full batch x sequence x vocabulary logits (bit for bit here, fp32 rounding at most),
with the head applied by the model (a model whose logits are changed after its head), through a PEFT wrapper,
and no tensor anywhere near that size is made; generation never broadcasts the head's weight per row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import milora
from milora.model import nll
from milora.model.generate import generate
from milora.model.precision import autocast

VOCAB, BATCH, SEQ = 4096, 4, 64


def largest_allocation(fn: Callable[[], Any]) -> int:
    """The bytes of the largest allocation one torch op makes while `fn()` runs, the temporaries inside an op's
    kernel included (the profiler's memory events, each op's own)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


class SoftCapped(LlamaForCausalLM):
    """A Llama whose logits are soft-capped after the head (as Gemma 2 does): not `head(hidden states)`."""

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        out = super().forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def llama(cls: type = LlamaForCausalLM, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 1-layer Llama with hidden size 64 and a 4096-token vocabulary: the logits outweigh everything else."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return cls(cfg).to(dtype).eval()


def encoded(seed: int = 0) -> list[dict[str, list[int]]]:
    """Examples of different lengths (up to SEQ), the first third of each a prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (SEQ, SEQ - 11, SEQ // 2, 9)[:BATCH]:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


@torch.no_grad()
def full_logits_nll(model: torch.nn.Module, batch: list[dict[str, list[int]]]) -> torch.Tensor:
    """The reference: log-softmax of the whole batch x sequence x vocabulary fp32 logits (the unchunked path)."""
    ids = nll._pad([b["input_ids"] for b in batch], 0)
    mask = nll._pad([b["attention_mask"] for b in batch], 0)
    labels = nll._pad([b["labels"] for b in batch], -100)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.stack([-(tok * valid).sum(-1), valid.sum(-1).float()], dim=-1)


def head_calls(model: torch.nn.Module) -> list[int]:
    """A list that grows by the rows of logits of every call of the model's head."""
    calls: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(out.shape[:-1].numel()))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_nll_equals_the_full_logits_nll(monkeypatch, dtype):
    model, batch = llama(dtype=dtype), encoded()
    want = full_logits_nll(model, batch)
    labelled = int(want[:, 1].sum())
    assert 4 * VOCAB * labelled <= nll.LOGITS_CHUNK_BYTES  # a model this small takes one slice by default ...
    calls = head_calls(model)
    one = nll.sequence_nll(model, batch)
    assert calls == [BATCH, BATCH, labelled]  # the last positions (the model's, the check's), then one slice
    monkeypatch.setattr(nll, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 16)  # ... and several at 16 positions a slice
    calls.clear()
    sliced = nll.sequence_nll(model, batch)
    assert calls[2:] == [16] * (labelled // 16) + ([labelled % 16] if labelled % 16 else [])
    assert torch.equal(one, want) and torch.equal(sliced, want)
    with autocast("bf16", "cpu"):  # what eval.precision = bf16 computes, sliced the same way
        torch.testing.assert_close(nll.sequence_nll(model, batch), full_logits_nll(model, batch), rtol=0, atol=1e-5)


def test_logits_changed_after_the_head_are_scored_from_the_models_own_logits(monkeypatch):
    model, batch = llama(SoftCapped), encoded(1)
    monkeypatch.setattr(nll, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 16)
    want = full_logits_nll(model, batch)
    assert torch.equal(nll.sequence_nll(model, batch), want)
    assert not torch.equal(full_logits_nll(llama(), batch), want)  # the capping does change the scores


def test_an_adapted_model_is_scored_through_its_peft_wrapper(monkeypatch):
    model = milora.init_adapter(llama(), milora.AdapterConfig(rank=4), progress=False).eval()
    with torch.no_grad():  # a trained-like adapter: the tuned model differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    batch = encoded(2)
    monkeypatch.setattr(nll, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 16)
    calls = head_calls(model)
    assert torch.equal(nll.sequence_nll(model, batch), full_logits_nll(model, batch))
    assert calls[:2] == [BATCH, BATCH]  # the head's path, not the full logits


def test_no_tensor_near_the_full_logits_size_is_made(monkeypatch):
    """The largest tensor made while scoring: at most one slice of fp32 logits, not batch x sequence x vocab."""
    model, batch = llama(), encoded()
    full = BATCH * (SEQ - 1) * VOCAB * 4  # the fp32 logits (and as much again for their log-softmax)
    monkeypatch.setattr(nll, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 16)
    assert largest_allocation(lambda: nll.sequence_nll(model, batch)) <= nll.LOGITS_CHUNK_BYTES < full / 10
    assert largest_allocation(lambda: full_logits_nll(model, batch)) >= full  # what the reference makes


def test_generation_never_copies_the_head_per_row():
    """The prompt pass computes the last position's logits from a strided slice of the hidden states; the head
    gets it contiguous, so a bf16 matmul on the CPU does not broadcast the head's weight to batch x vocab x hidden
    (8 copies here; 2 GiB at a batch of 8 on a Llama-2-7B-shaped head)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w1", eos_token="w2", unk_token="w0")
    model = llama(dtype=torch.bfloat16).requires_grad_(False)  # frozen, as under an adapter (a trainable weight folds)
    model.generation_config.eos_token_id = None
    prompts = [" ".join(f"w{(7 * i + j) % VOCAB}" for j in range(5 + 3 * i)) for i in range(8)]
    head_bytes = VOCAB * 64 * 2
    out: list[str] = []
    largest = largest_allocation(lambda: out.extend(generate(model, tokenizer, prompts, 3, batch_size=8)))
    assert len(out) == 8 and all(len(o.split()) == 3 for o in out)
    assert largest < 2 * head_bytes  # the batch's activations, not 8 copies of the head
