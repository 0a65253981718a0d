"""Write a Hugging Face model directory with Llama-2-7B layer shapes and trained-looking weights, offline.

    python benchmarks/llama_shaped.py OUT_DIR                       # 2 decoder layers, 667 M params, 1.3 GB
    python benchmarks/llama_shaped.py OUT_DIR --layers 32           # full depth (6.7 B params, 13.5 GB)
    python benchmarks/llama_shaped.py OUT_DIR --hidden 256 --intermediate 688 --heads 4 --vocab 4000  # tests

What a user's checkpoint looks like to the pipeline: `LlamaForCausalLM` (hidden 4096, intermediate 11008,
32 heads, vocab 32000, untied head), bf16 safetensors in shards (one per decoder layer, plus the
embeddings and the head) with `model.safetensors.index.json`, and a tokenizer whose vocabulary matches
the config's `vocab_size`.

**Weights.** Each projection is `W = U diag(s) V^T` with a prescribed spectrum `s` (what the SVD init sees):

* a Marchenko-Pastur bulk (the singular values a random init of this aspect ratio starts with: the
  quantiles of the MP law, deterministic),
* a heavy-tailed top (the bulk times `1 + A (i+1)^-0.6`: what training concentrates; A = 8 for the
  attention q/k projections, 3 for the others),
* a near-degenerate small end: the smallest `k/16` (q, k) or `k/32` (others) values clustered within
  2 % of a floor at 0.1 x the bulk's median, as real attention projections show,

scaled to an entry RMS of 0.02 (Llama's init). `U` and `V` are random orthogonal transforms (3 rounds of
random signs, an orthonormal DCT and a random permutation): O(m n log) to apply, instead of the QR of
a dense Gaussian matrix (a 4096x4096 QR costs ~2 min on 2 cores), and they mix every coordinate.
The bf16 rounding (relative 2^-9 per entry) adds a noise floor ~1e-3 below the bulk, well under the
floor of the small end, so the stored weights keep the prescribed shape.
Embeddings and head: N(0, 0.02^2); norms: ones. Everything is seeded per tensor: the same arguments
write byte-identical files.

**Tokenizer.** A byte-level BPE trained on the project's synthetic corpus (`milora.stages.base.train_tokenizer`,
up to `--bpe-vocab` tokens: a corpus of this size supports a few thousand merges), then reserved special
tokens `<reserved_N>` up to exactly `--vocab` (as Llama-3's `<|reserved_special_token_N|>`): every id the
model can emit decodes, and `len(tokenizer) == config.vocab_size`. Training a 32000-token BPE would need
a corpus of real text that this offline build does not have.

Memory: one decoder layer at a time (its largest matrix in fp64 while it is built: 360 MB at 11008x4096),
so any depth builds in a few GB. `--device cuda` builds on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
RMS = 0.02  # entry RMS of every projection (Llama's init std)
FLOOR = 0.1  # the small end's floor, relative to the bulk's median singular value


def mp_quantiles(k: int, ratio: float) -> np.ndarray:
    """The `k` singular values (descending, unit mean square) at the mid-quantiles of the Marchenko-Pastur
    law for an aspect ratio `ratio = min/max <= 1` (eigenvalue density on `[(1-sqrt c)^2, (1+sqrt c)^2]`)."""
    c = ratio
    a, b = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    x = np.linspace(a, b, 200_001)
    dens = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * math.pi * c * np.maximum(x, 1e-300))
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
    cdf /= cdf[-1]
    q = (np.arange(k) + 0.5) / k
    ev = np.interp(q, cdf, x)
    s = np.sqrt(ev)[::-1]
    return s / math.sqrt(np.mean(s**2))


def spectrum(kind: str, m: int, n: int) -> np.ndarray:
    """The prescribed singular values (descending) of a `kind` projection of shape `m x n`."""
    k = min(m, n)
    bulk = mp_quantiles(k, k / max(m, n))
    heavy = 8.0 if kind in ("q_proj", "k_proj") else 3.0
    s = bulk * (1 + heavy * np.arange(1, k + 1, dtype=np.float64) ** -0.6)
    n_small = max(2, k // (16 if kind in ("q_proj", "k_proj") else 32))
    floor = FLOOR * float(np.median(bulk))
    cluster = floor * (1 + 0.02 * np.linspace(1, 0, n_small))
    s = np.concatenate([np.maximum(s[: k - n_small], 1.05 * floor), cluster])
    s = np.sort(s)[::-1]
    return s * (RMS * math.sqrt(m * n) / math.sqrt(np.sum(s**2)))  # ||W||_F^2 = m n RMS^2


def _orthogonal(X: torch.Tensor, gen: torch.Generator, rounds: int = 3) -> torch.Tensor:
    """`X Q^T` for a random orthogonal `Q` (of X's column count): rounds of random signs, an orthonormal
    DCT-II along the rows (the contiguous axis) and a random permutation of the columns."""
    import scipy.fft

    d = X.shape[1]
    for _ in range(rounds):
        signs = torch.randint(0, 2, (d,), generator=gen, device=gen.device).to(X.dtype) * 2 - 1
        perm = torch.randperm(d, generator=gen, device=gen.device)
        X = X * signs
        if X.device.type == "cpu":
            X = torch.from_numpy(scipy.fft.dct(X.numpy(), type=2, norm="ortho", axis=-1, workers=-1))
        else:
            X = _dct_torch(X)
        X = X[:, perm]
    return X


def _dct_torch(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dim through an FFT (for GPU builds; scipy's on the CPU)."""
    N = X.shape[-1]
    v = torch.cat([X[:, ::2], X[:, 1::2].flip(-1)], dim=-1)
    Vf = torch.fft.fft(v, dim=-1)
    k = torch.arange(N, device=X.device, dtype=X.dtype)
    out = (Vf * torch.exp(-1j * math.pi * k / (2 * N))).real * math.sqrt(2.0 / N)
    out[:, 0] /= math.sqrt(2.0)
    return out.to(X.dtype)


def projection(kind: str, m: int, n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """`U diag(s) V^T` (`m x n`, fp64) with `spectrum(kind, m, n)` and random orthogonal `U`, `V`.

    Built transposed, so every transform runs along contiguous rows: `V^T` = the first `k` rows of
    `Q_n^T` (the transform of `I[:k]`), then `W^T = [V diag(s), 0] Q_m^T`.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n)
    s = torch.from_numpy(spectrum(kind, m, n).copy()).to(device)
    Vt = _orthogonal(torch.eye(k, n, dtype=torch.float64, device=device), gen)  # k x n, orthonormal rows
    Pt = torch.zeros(n, m, dtype=torch.float64, device=device)
    Pt[:, :k] = (s[:, None] * Vt).T
    del Vt
    return _orthogonal(Pt, gen).T  # (V diag(s) U^T)^T


def _seed(seed: int, name: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def layer_tensors(i: int, hidden: int, inter: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """The bf16 tensors of decoder layer `i` (its projections built one at a time)."""
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    out = {}
    for kind, (m, n) in shapes.items():
        group = "self_attn" if kind in ATTN else "mlp"
        name = f"model.layers.{i}.{group}.{kind}.weight"
        out[name] = projection(kind, m, n, _seed(seed, name), device).to(torch.bfloat16).cpu().contiguous()
    out[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    out[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    return out


def gaussian(name: str, shape: tuple[int, int], seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(_seed(seed, name))
    return (torch.randn(shape, generator=gen, device=device) * RMS).to(torch.bfloat16).cpu().contiguous()


def tokenizer(vocab: int, bpe_vocab: int, max_length: int):  # noqa: ANN201 - a PreTrainedTokenizerFast
    """A byte-level BPE on the synthetic corpus, padded with reserved special tokens to exactly `vocab`."""
    from milora.data import synthetic
    from milora.model.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
    from milora.stages.base import train_tokenizer

    docs, _ = synthetic.pretraining_corpus(2000, 0, seed=0)
    tok = train_tokenizer([*docs, *[PROMPT_NO_INPUT, PROMPT_WITH_INPUT] * 50], min(bpe_vocab, vocab), max_length)
    missing = vocab - len(tok)
    if missing > 0:
        tok.add_tokens([f"<reserved_{j}>" for j in range(missing)], special_tokens=True)
    assert len(tok) == vocab, (len(tok), vocab)
    return tok


def build(out: Path, layers: int = 2, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
          vocab: int = 32000, seed: int = 0, device: str = "cpu", bpe_vocab: int = 4000,
          max_position: int = 4096, progress: bool = True) -> dict:
    """Write the model directory; returns a summary (parameters, bytes, files, seconds)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(vocab, bpe_vocab, max_position)
    tok.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_position,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    n_files = layers + 2
    files = [f"model-{j + 1:05d}-of-{n_files:05d}.safetensors" for j in range(n_files)]
    weight_map: dict[str, str] = {}
    total = 0

    def write(j: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(out / files[j]), metadata={"format": "pt"})
        weight_map.update({k: files[j] for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        if progress:
            print(f"  {files[j]}: {len(tensors)} tensors, {time.perf_counter() - t0:.0f}s", flush=True)

    write(0, {"model.embed_tokens.weight": gaussian("model.embed_tokens.weight", (vocab, hidden), seed, device)})
    for i in range(layers):
        write(i + 1, layer_tensors(i, hidden, intermediate, seed, device))
    write(n_files - 1, {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                        "lm_head.weight": gaussian("lm_head.weight", (vocab, hidden), seed, device)})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"n_params": total // 2, "bytes": total, "files": len(files), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bpe-vocab", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    info = build(a.out, a.layers, a.hidden, a.intermediate, a.heads, a.vocab, a.seed, a.device, a.bpe_vocab)
    print(f"{a.out}: {info['n_params'] / 1e6:.1f} M parameters, {info['bytes'] / 2**30:.2f} GiB bf16 in "
          f"{info['files']} shards, {info['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
