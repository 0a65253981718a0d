"""`milora demo`: MiLoRA on a tiny Llama built from a config, checked end to end in seconds."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `milora demo`."""
    p.add_argument("--method", default="milora", choices=["milora", "pissa", "lora"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)


def main(args: argparse.Namespace) -> int:
    """Init, check step-0 equality, train, then check merge / to_lora / save-load reproduce the model."""
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    import milora

    def base() -> LlamaForCausalLM:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg).eval()

    def logits(m, ids):
        m.eval()
        with torch.no_grad():
            return m(input_ids=ids).logits

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = logits(base(), ids)
    model = milora.init_adapter(base(), milora.AdapterConfig(method=args.method, rank=args.rank, dropout=0.0))
    print(f"step-0 max |logit diff| vs base: {(logits(model, ids) - ref).abs().max():.2e}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d} loss {loss.item():.4f}")
    trained = logits(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        milora.save_adapter(model, Path(tmp) / "adapter")
        milora.to_lora(model, Path(tmp) / "lora")
        checks = {
            "merge": logits(milora.merge(model), ids),
            "save/load": logits(milora.load_adapter(base(), Path(tmp) / "adapter"), ids),
            "to_lora": logits(PeftModel.from_pretrained(base(), str(Path(tmp) / "lora")), ids),
        }
    worst = 0.0
    for name, out in checks.items():
        d = (out - trained).abs().max().item()
        worst = max(worst, d)
        print(f"{name:10s} max |logit diff| vs trained: {d:.2e}")
    return 0 if worst <= 1e-4 else 1
