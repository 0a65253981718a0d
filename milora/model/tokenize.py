"""Tokenization of (prompt, response) pairs for supervised fine-tuning: loss on the response only."""

from __future__ import annotations

from typing import Any

from milora.core.errors import InvalidInput


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    eos_id = tokenizer.eos_token_id
    if ids and eos_id is not None and ids[-1] == eos_id and not prompt.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # some tokenizers append EOS to every text; a prompt must not end the sequence
    return list(ids)


def tokenize_pair(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with BOS as the tokenizer adds it) and of the response (with EOS appended).

    The pair is tokenized as one text when that keeps the prompt's tokens a prefix (so the response is
    tokenized as in context), else separately.
    """
    if tokenizer.eos_token_id is None:
        raise InvalidInput(f"tokenizer {type(tokenizer).__name__} has no EOS token: cannot mark the end of a response")
    p_ids = _prompt_ids(tokenizer, prompt)
    full = _prompt_ids(tokenizer, prompt + response)
    if full[: len(p_ids)] == p_ids:
        r_ids = full[len(p_ids):]
    else:
        r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return p_ids, r_ids + [tokenizer.eos_token_id]


def _fit(n_prompt: int, n_response: int, max_length: int) -> tuple[int, int]:
    """How many prompt and response tokens to keep within `max_length` (some response always survives)."""
    if n_prompt + n_response <= max_length:
        return n_prompt, n_response
    keep_r = min(n_response, max(max_length - n_prompt, max(1, max_length // 4)))
    return max_length - keep_r, keep_r


def encode(tokenizer: Any, prompt: str, response: str, max_length: int, padding: bool = False) -> dict[str, Any]:
    """Token ids, labels (-100 on prompt and padding: loss on the response only), attention mask, truncated flag.

    EOS is appended to the response. Over-long rows are truncated to `max_length`: the response keeps at
    least a quarter of `max_length` (all of it if shorter) and is cut from its end; the prompt keeps as
    much of its *end* as fits (plus BOS), so the tokens next to the response always remain and every row
    has response tokens to learn from. `padding=True` right-pads to `max_length`.
    """
    p_ids, r_ids = tokenize_pair(tokenizer, prompt, response)
    keep_p, keep_r = _fit(len(p_ids), len(r_ids), max_length)
    truncated = keep_p < len(p_ids) or keep_r < len(r_ids)
    if keep_p < len(p_ids):
        head = p_ids[:1] if p_ids and p_ids[0] == tokenizer.bos_token_id and keep_p > 1 else []
        p_ids = head + p_ids[len(p_ids) - (keep_p - len(head)):]
    r_ids = r_ids[:keep_r]
    input_ids = p_ids + r_ids
    labels = [-100] * len(p_ids) + r_ids
    attention = [1] * len(input_ids)
    if padding and len(input_ids) < max_length:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        n = max_length - len(input_ids)
        input_ids, labels, attention = input_ids + [pad_id] * n, labels + [-100] * n, attention + [0] * n
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "truncated": truncated}

