"""Real pipeline outputs for tests of the steps downstream of training (tracking, registry, flows).

`build_pipeline_outputs(root)` writes what a finished pipeline run leaves under the project root
(see `milora.pipeline.paths.Paths`), for real and offline: a tiny Llama base with a byte-level BPE tokenizer
trained on the spot (HF format, safetensors), a MiLoRA adapter trained for a few optimizer steps and
saved with `milora.save_adapter` plus its `lineage.json`, the metrics JSON files, the loss CSV, the
spectrum PNG, eval predictions, a `dvc.yaml` + `dvc.lock` (the prepare stage) and `data/raw.dvc`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import milora
from milora.core.io import atomic_write_text, write_json
from milora.pipeline.config import Config
from milora.pipeline.paths import Paths

CORPUS = [
    "question: what is two plus three? answer: five",
    "question: what is one plus one? answer: two",
    "question: which is larger, seven or four? answer: seven",
    "the quick brown fox jumps over the lazy dog",
    "a tiny model learns to add small numbers",
    "instruction: name a colour. response: blue",
]
DATA_MD5 = "3f2b8c1d9e0a7b6c5d4e3f2a1b0c9d8e.dir"
RAW_MD5 = "0a1b2c3d4e5f60718293a4b5c6d7e8f9.dir"
DEFAULT_EVAL = {"average_accuracy": 0.5, "accuracy.math": 0.4, "accuracy.choice": 0.6,
                "perplexity": 12.5, "forgetting": 0.02}


class DictTripletCache:
    """A content-addressed in-memory SVD cache (the `milora.core.svd.TripletCache` protocol) for test inputs."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}

    def get_or_compute(self, weight: Tensor, rank: int, side: str, solver: str,
                       compute: Callable[[], Any]) -> tuple[Any, str, bool]:
        """Return (triplets, key, hit); the key hashes the weight bytes, shape, dtype and the request."""
        w = weight.detach().float().cpu().contiguous()
        h = hashlib.sha256(w.numpy().tobytes())
        h.update(f"{tuple(w.shape)}|{weight.dtype}|{rank}|{side}|{solver}".encode())
        key = h.hexdigest()
        if key in self.entries:
            return self.entries[key], key, True
        self.entries[key] = compute()
        return self.entries[key], key, False


@dataclass
class PipelineOutputs:
    """What `build_pipeline_outputs` wrote."""

    paths: Paths
    base_identity: dict[str, Any]
    lineage: dict[str, Any]
    eval_metrics: dict[str, Any]
    losses: list[float] = field(default_factory=list)


def build_tokenizer(out_dir: Path) -> Any:
    """A byte-level BPE tokenizer trained offline on `CORPUS`, saved in HF format; returns it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=320, min_frequency=1,
                            special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.save_pretrained(out_dir)
    return tok


def build_base(paths: Paths, seed: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """Write the embedded-style base (model + tokenizer) and `models/base.json`; return (model, tok, identity)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(paths.base_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(paths.base_dir, safe_serialization=True)
    content = hashlib.sha256((paths.base_dir / "model.safetensors").read_bytes()).hexdigest()
    identity = {
        "name_or_path": "embedded", "load_path": "models/base", "revision": None, "content_hash": content,
        "dtype": "float32", "n_params": sum(p.numel() for p in model.parameters()), "embedded": True,
        "architecture": "LlamaForCausalLM",
    }
    write_json(paths.base_json, identity)
    return model, tok, identity


def build_pipeline_outputs(
    root: str | Path,
    eval_metrics: Mapping[str, Any] | None = None,
    *,
    method: str = "milora",
    rank: int = 4,
    steps: int = 3,
    seed: int = 0,
    data_md5: str = DATA_MD5,
    optional: bool = True,
    config: Config | None = None,
) -> PipelineOutputs:
    """Write a finished pipeline run's outputs under `root` (optional plots/predictions/DVC files too)."""
    paths = Paths(Path(root))
    cfg = config or Config()
    base, tok, identity = build_base(paths, seed)
    acfg = milora.AdapterConfig(method=method, rank=rank, dropout=0.0, target_modules=["q_proj", "v_proj"])
    cache = DictTripletCache()
    model = milora.init_adapter(base, acfg, cache=cache, progress=False)
    enc = tok(CORPUS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    state = milora.core.adapter.state_of(model)
    milora.save_adapter(model, paths.adapter_dir)
    lineage = {
        "method": method, "rank": rank, "alpha": acfg.alpha, "base": identity, "data_hash": data_md5,
        "svd_cache_keys": dict(state.cache_keys), "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "params": {**cfg.flat(), "adapter.method": method, "adapter.rank": rank},
    }
    write_json(paths.adapter_dir / "lineage.json", lineage)

    metrics = {**DEFAULT_EVAL, **(eval_metrics or {})}
    write_json(paths.metrics("eval"), metrics)
    write_json(paths.metrics("train"), {"train_loss": losses[-1], "train_runtime_s": 0.4, "steps": steps})
    report = state.report
    write_json(paths.metrics("svd"), {"matrices": len(state.init_factors)})
    write_json(paths.timings("svd"), {  # run facts: not an output (see milora.pipeline.results.write_metrics)
        "init_seconds": report.seconds if report else 0.0,
        "cache_hits": sum(m.hit for m in report.matrices) if report else 0,
        "cache_misses": sum(not m.hit for m in report.matrices) if report else 0,
    })
    write_json(paths.metrics("base"), {"n_params": identity["n_params"]})
    if optional:
        write_json(paths.metrics("data"), {"train_rows": 6, "eval_rows": 2, "bad_rows": 0})
        atomic_write_text(paths.plot("train_loss.csv"),
                          "step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
        _spectrum_png(paths.plot("spectrum.png"), state.spectra)
        preds = [{"task": "math", "prompt": CORPUS[0].split(" answer:")[0], "prediction": "five", "correct": True}]
        atomic_write_text(paths.predictions, "".join(json.dumps(p) + "\n" for p in preds))
        atomic_write_text(paths.root / "dvc.yaml", DVC_YAML)
        atomic_write_text(paths.root / "dvc.lock", _dvc_lock(data_md5))
        atomic_write_text(paths.root / "data" / "raw.dvc", f"outs:\n- md5: {RAW_MD5}\n  path: raw\n")
    return PipelineOutputs(paths, identity, lineage, metrics, losses)


def _spectrum_png(path: Path, spectra: Mapping[str, Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
    for name, s in list(spectra.items())[:4]:
        ax.semilogy(s.numpy(), label=name.rsplit(".", 2)[-2])
    fig.savefig(path)
    plt.close(fig)


# the prepare stage of a pipeline, as DVC reads it: its dvc.yaml definition and its dvc.lock record
DVC_YAML = "stages:\n  prepare:\n    cmd: milora stage prepare\n    deps:\n    - params.yaml\n    outs:\n    - data/prepared\n"


def _dvc_lock(data_md5: str) -> str:
    return (
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: milora stage prepare\n    deps:\n"
        "    - path: params.yaml\n      md5: 1111aaaa2222bbbb3333cccc4444dddd\n    outs:\n"
        f"    - path: data/prepared\n      hash: md5\n      md5: {data_md5}\n      size: 1234\n      nfiles: 2\n"
    )


def clone_outputs(src: str | Path, dst: str | Path) -> Paths:
    """Copy a built project root (without any MLflow store in it) so a test can change it freely."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("mlflow"), dirs_exist_ok=True)
    return Paths(Path(dst))


def set_eval_metrics(paths: Paths, **metrics: float) -> dict[str, Any]:
    """Rewrite `metrics/eval.json` as `DEFAULT_EVAL` updated with `metrics` (a new evaluation result)."""
    data = {**DEFAULT_EVAL, **metrics}
    write_json(paths.metrics("eval"), data)
    return data


def retrained(paths: Paths, shift: float = 1e-3, **metrics: float) -> dict[str, Any]:
    """A new model: the adapter's weights moved a little (as another training run would) and `metrics/eval.json`
    set to its evaluation (`set_eval_metrics`). Registration is idempotent by the adapter's content, so a
    new version needs new weights, not only new metrics."""
    from safetensors.torch import load_file, save_file

    path = paths.adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] += shift
    save_file(tensors, str(path), metadata={"format": "pt"})
    return set_eval_metrics(paths, **metrics)


def tree_digest(root: str | Path) -> dict[str, str]:
    """sha256 of every file under `root` outside its MLflow store: to check that outputs are left untouched."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "mlflow" not in p.relative_to(root).parts}
