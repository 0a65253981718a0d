"""Self-sampled text: the base's own replies to everyday instructions, sampled once (temperature, fixed
seed) and versioned with the base (`models/self_text.jsonl`, written by the `base` stage); and the prompts of
rehearsal (`REHEARSAL_PROMPTS`, answered greedily by the base into `models/rehearsal.jsonl`).

The mean NLL of those replies under the tuned model minus under the base estimates KL(base || tuned) on the
base's own chat distribution: a forgetting metric that needs no pretraining corpus. Sampling is plain
ancestral sampling (no top-k / top-p), so the replies are draws from the base's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from milora.model.generate import batches, contiguous_head_input
from milora.model.nll import mean_loss
from milora.model.prompts import render_chat
from milora.model.tokenize import encode

# Everyday instructions (advice, descriptions, short writing), none of them a quiz question: the replies show
# how the base talks, not what it knows (the retention probe asks that).
INSTRUCTIONS = (
    "Give me three tips for sleeping better.",
    "Describe a rainy afternoon in a small town.",
    "How do I keep houseplants alive?",
    "Write a short note thanking a friend for dinner.",
    "What should I pack for a weekend hiking trip?",
    "Explain how to make a cup of tea.",
    "Suggest a simple weekday dinner.",
    "How can I stay focused while studying?",
    "Describe the sound of the ocean.",
    "Write two sentences about autumn leaves.",
    "What are some good habits for a healthy morning?",
    "How do I start learning to play the guitar?",
    "Give advice to someone starting a new job.",
    "Describe a busy market on a Saturday morning.",
    "How can I save money on groceries?",
    "Write a short welcome message for a new neighbour.",
    "What is a fun activity for a rainy day at home?",
    "How should I prepare for a job interview?",
    "Describe your favourite kind of weather.",
    "Give me ideas for a birthday gift for my grandmother.",
    "How do I clean a cast iron pan?",
    "Write a short poem about the moon.",
    "What can I do to reduce stress after work?",
    "Explain how to plant tomato seeds.",
    "Describe a quiet library.",
    "How do I write a polite email asking for a day off?",
    "Suggest a few board games for a family evening.",
    "What should I do if I feel tired in the afternoon?",
    "Describe a walk through a forest in spring.",
    "How can I make my small apartment feel bigger?",
    "Write a short story opening about a lost key.",
    "Give tips for riding a bicycle safely in a city.",
    "How do I make friends in a new city?",
    "Describe the smell of fresh bread.",
    "What are good ways to practise a new language?",
    "Write a thank-you message to a teacher.",
    "How do I organise my desk?",
    "Suggest a relaxing way to spend a Sunday.",
    "Describe a train journey through the mountains.",
    "How can I drink more water during the day?",
    "Give advice for a first-time dog owner.",
    "Write a short description of a cosy café.",
    "How do I fold a shirt neatly?",
    "What makes a good picnic?",
    "Describe a summer evening by a lake.",
    "How can I be more patient with people?",
    "Write a short invitation to a garden party.",
    "Give me tips for running my first five kilometres.",
)


# Prompts the base answers once for rehearsal (`data.rehearsal`; the real profile's, chosen against its retention
# probe data/probes/general_knowledge.jsonl): short questions of the kinds a user asks a chat model (capitals,
# symbols, sums, legs, opposites, continents, sounds), then everyday requests. None asks what a probe question
# asks (its words are never a subset of a probe question's: tests/test_smol.py keeps that true) and none is a
# self-text instruction. The base's own answers, right or wrong, are rehearsed: no gold label.
REHEARSAL_PROMPTS = (
    "What is the capital of Netherlands?",
    "What is the capital of Indonesia?",
    "What is the capital of Malaysia?",
    "What is the capital of Ghana?",
    "What is the capital of Romania?",
    "What is the capital of Wales?",
    "What is the capital of Jamaica?",
    "What is the capital of Bolivia?",
    "What is the capital of Ecuador?",
    "What is the capital of Uruguay?",
    "What is the capital of Singapore?",
    "What is the capital of Nepal?",
    "What is the capital of Bangladesh?",
    "What is the chemical symbol for helium?",
    "What is the chemical symbol for neon?",
    "What is the chemical symbol for tin?",
    "What is 14 plus 23?",
    "What is 31 plus 46?",
    "What is 8 plus 17?",
    "What is 52 plus 19?",
    "What is 63 plus 28?",
    "What is 7 plus 9?",
    "What is 45 plus 45?",
    "What is 120 plus 80?",
    "What is 11 plus 12?",
    "What is 99 plus 1?",
    "What is 3 times 4?",
    "What is 5 times 6?",
    "What is 8 times 9?",
    "What is 12 times 3?",
    "How many legs does a horse have?",
    "How many legs does a chicken have?",
    "How many legs does an ant have?",
    "How many legs does an octopus have?",
    "How many legs does a snake have?",
    "How many legs does a cat have?",
    "How many legs does a bird have?",
    "How many legs does a crab have?",
    "What is the opposite of big?",
    "What is the opposite of fast?",
    "What is the opposite of early?",
    "What is the opposite of happy?",
    "What is the opposite of open?",
    "What is the opposite of light?",
    "What is the opposite of strong?",
    "What is the opposite of full?",
    "What is the opposite of wet?",
    "What is the opposite of loud?",
    "On which continent is Italy?",
    "On which continent is Japan?",
    "On which continent is Canada?",
    "On which continent is Spain?",
    "On which continent is India?",
    "On which continent is China?",
    "On which continent is Russia?",
    "On which continent is Greece?",
    "On which continent is Kenya?",
    "What sound does a bee make?",
    "What sound does a cow make?",
    "What sound does a lion make?",
    "What sound does a sheep make?",
    "What sound does a dog make?",
    "What sound does a duck make?",
    "What is a good way to start the day?",
    "Why do we need sleep?",
    "How do you make a paper airplane?",
    "Write a sentence about a cat.",
    "Explain what a noun is.",
    "Give me a tip for learning to swim.",
    "Why is exercise good for you?",
    "How does a rainbow form?",
    "Describe a sunny beach in one sentence.",
    "What is a synonym for happy?",
    "Suggest a name for a pet goldfish.",
    "Why do leaves change colour in autumn?",
    "How do plants drink water?",
    "What is a haiku?",
    "Tell me a fun fact about octopuses.",
    "Explain what gravity does.",
    "Write a short greeting for a birthday card.",
    "Why should we recycle?",
    "How can I keep my teeth healthy?",
    "Give me a word that rhymes with light.",
    "Describe the taste of a lemon.",
    "Why is the sea salty?",
    "What is 13 plus 29?",
    "Name a famous bridge in San Francisco.",
    "Which bird is a symbol of peace?",
    "In which country is the city of Kyoto?",
    "How many weeks are in a year?",
    "What is the color of an emerald?",
    "Explain how a bicycle works.",
    "Describe a thunderstorm.",
    "Write two sentences about the moon landing.",
    "How do I make scrambled eggs?",
    "What should I do if I get a small cut?",
    "Give me three ideas for a rainy weekend.",
    "What is the difference between weather and climate?",
    "How can I remember new words more easily?",
    "Write a short motivational message.",
    "What makes bread rise?",
    "Describe a snowy morning.",
    "How do fish breathe underwater?",
    "What is a volcano?",
    "Explain what a map is used for.",
    "How should I water a cactus?",
    "Tell me about elephants in two sentences.",
    "What is the purpose of a seatbelt?",
    "Why do cats purr?",
)


@torch.no_grad()
def base_replies(model: nn.Module, tokenizer: Any, instructions: Sequence[str], max_new_tokens: int,
                 temperature: float | None, seed: int = 0, batch_size: int = 16) -> list[dict[str, Any]]:
    """The model's replies to `instructions` (each one user message through the chat template): sampled at
    `temperature` from `seed`, or greedy when `temperature` is None. Records `{instruction, prompt, response,
    ended}` (`ended`: the reply stopped at EOS within `max_new_tokens`)."""
    device = next(model.parameters()).device
    prompts = [render_chat([{"role": "user", "content": q}], tokenizer) for q in instructions]
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else \
        {"do_sample": False}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    out: list[dict[str, Any]] = []
    try:
        for chunk_q, chunk_p in zip(batches(list(instructions), batch_size), batches(prompts, batch_size), strict=True):
            enc = tokenizer(list(chunk_p), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with contiguous_head_input(model):
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **sampling)
            for q, p, ids in zip(chunk_q, chunk_p, gen[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
                ended = tokenizer.eos_token_id in ids
                ids = ids[: ids.index(tokenizer.eos_token_id)] if ended else ids
                out.append({"instruction": q, "prompt": p, "response": tokenizer.decode(ids, skip_special_tokens=True),
                            "ended": ended})
    finally:
        tokenizer.padding_side = side
    return out


def sample_self_text(model: nn.Module, tokenizer: Any, documents: int, max_new_tokens: int, temperature: float,
                     seed: int, batch_size: int = 16) -> list[dict[str, Any]]:
    """`documents` replies of the model to `INSTRUCTIONS` (cycled), sampled at `temperature` from `seed`."""
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(documents)]
    return base_replies(model, tokenizer, instructions, max_new_tokens, temperature, seed, batch_size)


def self_text_loss(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int,
                   batch_size: int = 16) -> float:
    """Mean token NLL of the sampled replies given their prompts (EOS scored only where the reply ended)."""
    encoded = []
    for r in records:
        e = encode(tokenizer, r["prompt"], r["response"], max_length)
        if not r.get("ended", True) and not e["truncated"]:
            e["labels"] = [*e["labels"][:-1], -100]
        encoded.append(e)
    return mean_loss(model, encoded, batch_size)
