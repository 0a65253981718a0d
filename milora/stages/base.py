"""The `base` stage: the model to fine-tune, recorded in `models/base.json` (loaded by `milora.model.base`).

* `model.name_or_path` names a local HF directory or a Hub id: record its identity (where to load it
  from, revision, a content hash of its weight files, dtype, parameter count). No weights are copied.
* `model.name_or_path` names a GGUF file (a `.gguf` path, or a packaged name such as
  `smollm2-135m-instruct`): convert it once to a safetensors directory under `models/base` (tokenizer and
  chat template included) in `model.dtype`; its identity is the GGUF file's sha256 plus the converter.
* `data.self_text.documents > 0`: sample the base's own replies to everyday instructions once
  (`models/self_text.jsonl`), the forgetting metric of a base without pretraining text;
  `data.rehearsal.rows > 0`: the base's greedy replies to the profile's rehearsal prompts
  (`models/rehearsal.jsonl`), which `prepare` adds to the training split.
* `model.name_or_path: embedded`: bootstrap a tiny Llama-architecture causal LM by really pretraining
  it on the synthetic corpus (`milora.data.synthetic`), with a byte-level BPE tokenizer trained on that
  corpus by `tokenizers`, and save both in HF format (safetensors) under `models/base`. The loss curve,
  the held-out perplexity against the uniform baseline and the weight spectra (trained vs the random
  init) are recorded, so the claim "genuinely pretrained" is checked on every build.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from milora.core.errors import InvalidInput, MissingInput
from milora.core.io import atomic_dir, atomic_write_text, dump_jsonl, sha256_file, write_json
from milora.data import lab
from milora.model import gguf
from milora.model.base import BOS, EOS, PAD, content_hash, external_identity, load_base, weight_files
from milora.model.nll import heldout_nll
from milora.model.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
from milora.pipeline.config import EMBEDDED, Config
from milora.pipeline.paths import Paths
from milora.pipeline.results import write_metrics

log = logging.getLogger(__name__)

# The numbers of metrics/base.json (DVC metrics, compared across runs); reports/base.json has them all.
SUMMARY = ["n_params", "heldout.perplexity"]
# Run facts: timings/base.json, not the byte-reproducible report.
TIMINGS = ["pretrain.train_seconds", "pretrain.total_seconds"]


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE tokenizer (digits split, any text encodable) with `<s>`, `</s>`, `<pad>`; BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=max_length)


def build_model(e: Any, vocab_size: int, tokenizer: Any) -> Any:
    """A randomly initialised Llama with the `model.embedded` shape (seeded by `e.seed`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
        num_hidden_layers=e.num_layers, num_attention_heads=e.num_heads, num_key_value_heads=e.num_heads,
        max_position_embeddings=e.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(e.seed)
    return LlamaForCausalLM(config)


def pack(tokenizer: Any, docs: Sequence[str], seq_len: int) -> torch.Tensor:
    """Documents as `<s> doc </s>` concatenated and cut into rows of `seq_len` tokens (the tail is dropped)."""
    ids: list[int] = []
    for enc in tokenizer(list(docs), add_special_tokens=True)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        raise InvalidInput(f"the corpus has {len(ids)} tokens, fewer than one sequence of {seq_len}: "
                         "raise data.embedded.corpus_documents or lower model.embedded.pretrain_seq_len")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def spectrum_stats(model: nn.Module) -> dict[str, float]:
    """Mean over the decoder's linear weights of: top / median singular value, share of energy (sum s^2) in
    the top 10% of singular values, and effective rank (exp of the entropy of s / sum s) over full rank.

    A random Gaussian matrix has a flat Marchenko-Pastur spectrum (small ratios, effective rank near 1);
    training concentrates energy in a few directions.
    """
    stats: dict[str, list[float]] = {"top_to_median": [], "top10pct_energy": [], "effective_rank_ratio": []}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or ".layers." not in f".{name}.":
            continue
        s = torch.linalg.svdvals(mod.weight.detach().double())
        k = max(1, math.ceil(0.1 * s.numel()))
        energy = s.square()
        p = s / s.sum()
        stats["top_to_median"].append(float(s[0] / s.median()))
        stats["top10pct_energy"].append(float(energy[:k].sum() / energy.sum()))
        stats["effective_rank_ratio"].append(float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()) / s.numel()))
    return {k: round(sum(v) / len(v), 4) for k, v in stats.items() if v}


def _lr(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain(model: nn.Module, data: torch.Tensor, e: Any) -> list[tuple[int, float]]:
    """Next-token pretraining on packed rows with AdamW; returns the loss curve [(step, loss)]."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=e.pretrain_learning_rate, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(e.seed)
    order = torch.randperm(len(data), generator=gen)
    pos = 0
    curve: list[tuple[int, float]] = []
    model.train()
    bar = tqdm(range(e.pretrain_steps), desc="pretraining the embedded base", unit="step", disable=None)
    # Without a terminal (under DVC, Prefect, CI) tqdm is off: log a progress line every ~10% instead.
    every = 0 if not bar.disable else max(1, e.pretrain_steps // 10)
    t0 = time.perf_counter()
    for step in bar:
        if pos + e.pretrain_batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        batch = data[order[pos: pos + e.pretrain_batch_size]]
        pos += e.pretrain_batch_size
        for group in opt.param_groups:
            group["lr"] = _lr(step, e.pretrain_steps, e.pretrain_learning_rate)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append((step + 1, loss.item()))
        if (step + 1) % 50 == 0 or step + 1 == e.pretrain_steps:
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            log.debug("pretrain step %d/%d loss %.4f", step + 1, e.pretrain_steps, curve[-1][1])
        if every and ((step + 1) % every == 0 or step + 1 == e.pretrain_steps):
            elapsed = time.perf_counter() - t0
            log.info("base: pretraining step %d/%d, loss %.3f, %.0f s elapsed, ~%.0f s left", step + 1,
                     e.pretrain_steps, curve[-1][1], elapsed, elapsed * (e.pretrain_steps - step - 1) / (step + 1))
    model.eval()
    return curve


def _save_hf(model: nn.Module, tokenizer: Any, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # The generic class name loads with every transformers version (4.x calls the class by this name).
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def bootstrap_embedded(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Generate the corpus, train the tokenizer, pretrain the tiny Llama, save it; returns its metrics."""
    e = cfg.model.embedded
    threads = torch.get_num_threads()
    torch.set_num_threads(e.threads)
    try:
        t0 = time.perf_counter()
        sizes = cfg.data.embedded
        train_docs, heldout_docs = lab.pretraining_corpus(sizes.profile, sizes.corpus_documents,
                                                          sizes.heldout_documents, e.seed)
        # The prompt template is part of the vocabulary's training text (not of the pretraining data), so the
        # fine-tuning prompts tokenize compactly.
        tokenizer = train_tokenizer([*train_docs, *[PROMPT_NO_INPUT, PROMPT_WITH_INPUT] * 50], e.vocab_size,
                                    e.max_position_embeddings)
        data = pack(tokenizer, train_docs, e.pretrain_seq_len)
        model = build_model(e, len(tokenizer), tokenizer)
        init_loss, n_heldout_tokens = heldout_nll(model, tokenizer, heldout_docs, e.max_position_embeddings, 32)
        init_spectrum = spectrum_stats(model)
        log.info("base: pretraining a %.2fM-parameter Llama on %d tokens (%d docs), %d steps of %dx%d, %d threads",
                 sum(p.numel() for p in model.parameters()) / 1e6, data.numel(), len(train_docs),
                 e.pretrain_steps, e.pretrain_batch_size, e.pretrain_seq_len, e.threads)
        t1 = time.perf_counter()
        curve = pretrain(model, data, e)
        train_seconds = time.perf_counter() - t1
        loss, _ = heldout_nll(model, tokenizer, heldout_docs, e.max_position_embeddings, 32)
        spectrum = spectrum_stats(model)
    finally:
        torch.set_num_threads(threads)
    with atomic_dir(paths.base_dir) as d:
        _save_hf(model, tokenizer, d)
    atomic_write_text(paths.heldout_text, "".join(doc + "\n" for doc in heldout_docs))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "loss"])
    writer.writerows((s, f"{v:.5f}") for s, v in curve)
    atomic_write_text(paths.plot("base_loss.csv"), buf.getvalue())
    vocab = len(tokenizer)
    tail = [v for _, v in curve[-max(1, len(curve) // 20):]]
    return {
        "embedded": True,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab,
        "corpus": {"train_documents": len(train_docs), "heldout_documents": len(heldout_docs),
                   "train_tokens": int(data.numel()), "heldout_tokens": n_heldout_tokens,
                   "epochs": round(e.pretrain_steps * e.pretrain_batch_size / len(data), 2)},
        "pretrain": {"steps": e.pretrain_steps, "batch_size": e.pretrain_batch_size, "seq_len": e.pretrain_seq_len,
                     "learning_rate": e.pretrain_learning_rate, "threads": e.threads,
                     "final_train_loss": round(sum(tail) / len(tail), 4), "train_seconds": round(train_seconds, 1),
                     "total_seconds": round(time.perf_counter() - t0, 1)},
        "heldout": {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
                    "init_loss": round(init_loss, 4), "init_perplexity": round(math.exp(init_loss), 3),
                    "uniform_perplexity": vocab, "ratio_to_uniform": round(math.exp(loss) / vocab, 5)},
        "spectrum": {"trained": spectrum, "init": init_spectrum},
    }


def convert_gguf_base(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Convert the GGUF base to `models/base` (safetensors + tokenizer); return its `models/base.json` record."""
    src = gguf.resolve_gguf(cfg.model.name_or_path, paths.root)
    dtype = "float32" if cfg.model.dtype == "auto" else cfg.model.dtype
    t0 = time.perf_counter()
    with atomic_dir(paths.base_dir) as d:
        info = gguf.convert_gguf(src, d, dtype)
    config = json.loads((paths.base_dir / "config.json").read_text(encoding="utf-8"))
    weights = weight_files(paths.base_dir)
    from transformers import AutoConfig

    from milora.model.base import count_parameters

    identity = {
        "name_or_path": cfg.model.name_or_path,
        "load_path": paths.base_dir.relative_to(paths.root).as_posix(),
        "revision": None,
        "content_hash": content_hash(weights),
        "weight_files": [f.name for f in weights],
        "dtype": dtype,
        "n_params": count_parameters(AutoConfig.from_pretrained(paths.base_dir)),
        "embedded": False,
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "gguf_file": src.name,
        "gguf_sha256": sha256_file(src),
        "gguf_architecture": info.architecture,
        "gguf_quantization": "+".join(info.quant_types),
        "converter": gguf.converter(),
    }
    log.info("base: converted %s (%s, sha256 %s..., %s) -> %s in %.0f s (%.1fM parameters, %s)", src.name,
             info.architecture, identity["gguf_sha256"][:12], identity["gguf_quantization"], paths.base_dir,
             time.perf_counter() - t0, identity["n_params"] / 1e6, dtype)
    return identity


def _external_heldout(cfg: Config, paths: Paths) -> None:
    """`models/heldout.txt` of an external base: `data.heldout_text`'s contents, or empty."""
    heldout = ""
    if cfg.data.heldout_text:
        src = Path(cfg.data.heldout_text)
        src = src if src.is_absolute() or not (paths.root / src).exists() else paths.root / src
        if not src.is_file():
            raise MissingInput(f"data.heldout_text {cfg.data.heldout_text!r}: no such file")
        heldout = src.read_text(encoding="utf-8")
    atomic_write_text(paths.heldout_text, heldout)


def write_base_replies(cfg: Config, paths: Paths) -> dict[str, int]:
    """What the base itself says, generated once: `models/self_text.jsonl` (sampled replies, `data.self_text`,
    the forgetting text) and `models/rehearsal.jsonl` (greedy replies to the profile's rehearsal prompts,
    `data.rehearsal`, as chat rows; replies that do not end within the budget are dropped). Empty when off."""
    from milora.model.self_text import REHEARSAL_PROMPTS, base_replies, sample_self_text

    st, rh = cfg.data.self_text, cfg.data.rehearsal
    sampled: list[dict[str, Any]] = []
    rehearsal: list[dict[str, Any]] = []
    if st.documents or rh.rows:
        t0 = time.perf_counter()
        model, tokenizer = load_base(cfg, paths)
        if st.documents:
            sampled = sample_self_text(model, tokenizer, st.documents, st.max_new_tokens, st.temperature, st.seed)
        prompts = REHEARSAL_PROMPTS[: rh.rows]
        if prompts:
            replies = base_replies(model, tokenizer, prompts, rh.max_new_tokens, None)
            rehearsal = [{"messages": [{"role": "user", "content": r["instruction"]},
                                       {"role": "assistant", "content": r["response"]}], "group": "rehearsal"}
                         for r in replies if r["ended"] and r["response"].strip()]
        log.info("base: %d sampled replies of the base (<= %d tokens, temperature %g, seed %d), %d of %d greedy "
                 "rehearsal replies ended within %d tokens; %.0f s", len(sampled), st.max_new_tokens, st.temperature,
                 st.seed, len(rehearsal), len(prompts), rh.max_new_tokens,
                 time.perf_counter() - t0)
    atomic_write_text(paths.self_text, dump_jsonl(sampled))
    atomic_write_text(paths.rehearsal, dump_jsonl(rehearsal))
    return {"self_text_documents": len(sampled), "rehearsal_rows": len(rehearsal)}


def run(cfg: Config, paths: Paths) -> None:
    """Bootstrap the embedded base, convert a GGUF one, or record an external one's identity; write
    models/base.json (and the self-sampled text)."""
    if cfg.model.name_or_path == EMBEDDED:
        metrics = bootstrap_embedded(cfg, paths)
        weights = weight_files(paths.base_dir)
        identity = {
            "name_or_path": EMBEDDED,
            "load_path": paths.base_dir.relative_to(paths.root).as_posix(),
            "revision": None,
            "content_hash": content_hash(weights),
            "weight_files": [f.name for f in weights],
            "dtype": "float32",
            "n_params": metrics["n_params"],
            "embedded": True,
            "architecture": "LlamaForCausalLM",
            "model_type": "llama",
        }
        h = metrics["heldout"]
        log.info("base: held-out perplexity %.2f (untrained %.1f, uniform %d); spectrum top10%% energy %.3f "
                 "(init %.3f); %.0fs", h["perplexity"], h["init_perplexity"], h["uniform_perplexity"],
                 metrics["spectrum"]["trained"]["top10pct_energy"], metrics["spectrum"]["init"]["top10pct_energy"],
                 metrics["pretrain"]["total_seconds"])
    else:
        if gguf.is_gguf(cfg.model.name_or_path):
            identity = convert_gguf_base(cfg, paths)
        else:
            identity, load_path = external_identity(cfg.model, paths.root)
            # The DAG declares the embedded base's outputs; an external base has only a pointer here.
            note = (f"External base model {cfg.model.name_or_path!r}: its weights load from where models/base.json "
                    "says (no copy here).\n")
            with atomic_dir(paths.base_dir) as d:
                (d / "README.txt").write_text(note, encoding="utf-8")
            log.info("base: %s -> %s (%s, %.1fM parameters)", cfg.model.name_or_path, load_path,
                     identity["content_hash"][:19], identity["n_params"] / 1e6)
        metrics = {k: identity[k] for k in ("embedded", "n_params", "architecture", "content_hash")}
        _external_heldout(cfg, paths)
        atomic_write_text(paths.plot("base_loss.csv"), "step,loss\n")
    write_json(paths.base_json, identity)  # before sampling: load_base reads it
    metrics.update(write_base_replies(cfg, paths))
    write_metrics(paths, "base", metrics, SUMMARY, TIMINGS)
