"""Prompt templates: the one place the training, evaluation and serving prompts come from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The Alpaca prompt template, as LLM-Adapters uses it for commonsense_170k and math_10k.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca / LLM-Adapters prompt for an instruction and an optional input."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any = None) -> str:
    """The prompt text of a conversation up to the reply: the tokenizer's chat template, else `### Role:` tags."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    turns = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return turns + "### Assistant:\n"

