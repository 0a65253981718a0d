"""The `base` stage and `load_base`: external models (local directory, cached Hub snapshot, errors) and the
embedded tiny Llama, genuinely pretrained (beats an untrained twin on held-out text by a wide margin)."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from milora.core.io import read_json, write_json
from milora.data import synthetic
from milora.model.base import content_hash, load_base, load_tokenizer, resolved_base_path
from milora.pipeline.config import validate
from milora.pipeline.paths import Paths
from milora.stages.base import build_model, heldout_nll, pretrain, spectrum_stats, train_tokenizer
from milora.stages.base import run as base_stage
from tests.models import tiny_llama

# A base small enough to pretrain in seconds, still large enough to learn the corpus.
TINY = {
    "model": {"embedded": {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 160, "num_layers": 2,
                           "num_heads": 2, "max_position_embeddings": 128, "pretrain_steps": 120,
                           "pretrain_batch_size": 16, "pretrain_seq_len": 64, "pretrain_learning_rate": 0.005,
                           "threads": 1}},
    "data": {"embedded": {"corpus_documents": 600, "heldout_documents": 80, "math_rows": 40, "choice_rows": 40}},
}


@pytest.fixture(scope="module")
def corpus_tokenizer():
    docs, _ = synthetic.pretraining_corpus(200, 1, seed=0)
    return train_tokenizer(docs, vocab_size=300, max_length=64)


def external_model_dir(path: Path, tokenizer, pad: bool = True) -> Path:
    """A local HF model directory: the tiny Llama from tests/models.py plus a tokenizer."""
    model = tiny_llama()
    model.save_pretrained(path, safe_serialization=True)
    if pad:
        tokenizer.save_pretrained(path)
    else:  # a tokenizer without a pad token, like many base models'
        PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                                eos_token="</s>").save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- pieces


def test_tokenizer_encodes_any_text_adds_bos_and_splits_digits(corpus_tokenizer):
    tok = corpus_tokenizer
    text = "Ünïcödé ✓ 日本語 🙂\n\ttabs & <tags>"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    digits = tok("2024", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<pad>", "<s>", "</s>"}


def test_content_hash_follows_bytes_and_names(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    h = content_hash([a, b])
    assert h == content_hash([b, a]) and h.startswith("sha256:")
    b.write_bytes(b"two!")
    assert content_hash([a, b]) != h


def test_content_hash_distinguishes_renamed_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "m.safetensors").write_bytes(b"w")
    (tmp_path / "y" / "n.safetensors").write_bytes(b"w")
    assert content_hash([tmp_path / "x" / "m.safetensors"]) != content_hash([tmp_path / "y" / "n.safetensors"])


def test_spectrum_stats_separate_low_rank_structure_from_noise():
    model = tiny_llama()
    noise = spectrum_stats(model)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}.":
                u, v = torch.randn(mod.weight.shape[0], 2), torch.randn(2, mod.weight.shape[1])
                mod.weight.add_(u @ v)
    structured = spectrum_stats(model)
    assert structured["top10pct_energy"] > noise["top10pct_energy"] + 0.3
    assert structured["top_to_median"] > 2 * noise["top_to_median"]
    assert structured["effective_rank_ratio"] < noise["effective_rank_ratio"]


# ----------------------------------------------------------------------------- external models


def test_external_local_model_records_identity_and_loads(tmp_path, corpus_tokenizer):
    model_dir = external_model_dir(tmp_path / "my-model", corpus_tokenizer, pad=False)
    paths = Paths(tmp_path / "project")
    cfg = validate({"model": {"name_or_path": str(model_dir)}})
    base_stage(cfg, paths)
    info = read_json(paths.base_json)
    assert "load_path" not in info and info["embedded"] is False  # no resolved machine path in a stage's deps
    assert resolved_base_path(info, paths.root) == model_dir.resolve()
    assert info["architecture"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert info["n_params"] == sum(p.numel() for p in tiny_llama().parameters())
    assert info["content_hash"] == content_hash(sorted(model_dir.glob("*.safetensors")))
    assert info["dtype"] == "float32" and info["revision"] is None and info["weight_files"] == ["model.safetensors"]
    assert read_json(paths.report("base"))["n_params"] == info["n_params"]
    assert not any(paths.base_dir.glob("*.safetensors"))  # nothing copied
    assert paths.heldout_text.read_text() == ""

    model, tok = load_base(cfg, paths)
    reference = tiny_llama().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert not model.training and tok.pad_token == tok.eos_token == "</s>"
    tok.padding_side = "left"
    batch = tok(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["input_ids"][0, 0] == tok.pad_token_id
    half, _ = load_base(cfg, paths, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_switching_to_an_external_base_clears_the_embedded_weights(tmp_path, corpus_tokenizer):
    paths = Paths(tmp_path / "project")
    external_model_dir(paths.base_dir, corpus_tokenizer)  # what an earlier embedded build left there
    model_dir = external_model_dir(tmp_path / "m", corpus_tokenizer)
    base_stage(validate({"model": {"name_or_path": str(model_dir)}}), paths)
    assert sorted(p.name for p in paths.base_dir.iterdir()) == ["README.txt"]
    assert str(model_dir.resolve()) in (paths.base_dir / "README.txt").read_text()


def test_relative_model_path_and_heldout_text_resolve_against_the_project_root(tmp_path, corpus_tokenizer):
    paths = Paths(tmp_path)
    external_model_dir(tmp_path / "weights" / "m", corpus_tokenizer)
    (tmp_path / "heldout.txt").write_text("doc one\ndoc two\n")
    cfg = validate({"model": {"name_or_path": "weights/m"}, "data": {"heldout_text": "heldout.txt"}})
    base_stage(cfg, paths)
    info = read_json(paths.base_json)
    assert info["name_or_path"] == "weights/m" and str(tmp_path) not in paths.base_json.read_text()
    assert resolved_base_path(info, paths.root) == (tmp_path / "weights" / "m").resolve()
    assert paths.heldout_text.read_text() == "doc one\ndoc two\n"
    assert load_tokenizer(cfg, paths).pad_token == "<pad>"


def test_cached_hub_snapshot_resolves_offline_with_its_commit(tmp_path, corpus_tokenizer, monkeypatch):
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    external_model_dir(repo / "snapshots" / sha, corpus_tokenizer)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    paths = Paths(tmp_path / "project")
    cfg = validate({"model": {"name_or_path": "someorg/tiny-llama"}})
    base_stage(cfg, paths)
    info = read_json(paths.base_json)
    assert info["revision"] == sha and "load_path" not in info and str(tmp_path) not in paths.base_json.read_text()
    assert resolved_base_path(info, paths.root) == (repo / "snapshots" / sha).resolve()
    model, _ = load_base(cfg, paths)
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize(("setup", "name", "error", "message"), [
    ("none", "./missing/model", FileNotFoundError, "no such directory"),
    ("none", "someorg/never-downloaded", ValueError, "Hub is offline.*local model directory"),
    ("config_only", "local", ValueError, r"no \*\.safetensors weight files.*safe_serialization"),
    ("empty_dir", "local", ValueError, "no config.json"),
    ("file", "local", ValueError, "is a file"),
])
def test_external_model_errors(tmp_path, setup, name, error, message):
    target = tmp_path / "local"
    if setup == "config_only":
        tiny_llama().config.save_pretrained(target)
    elif setup == "empty_dir":
        target.mkdir()
    elif setup == "file":
        target.write_text("not a model")
    cfg = validate({"model": {"name_or_path": str(target) if name == "local" else name}})
    with pytest.raises(error, match=message):
        base_stage(cfg, Paths(tmp_path / "project"))


def test_load_base_refuses_a_base_json_for_another_model(tmp_path):
    paths = Paths(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `milora stage base` first"):
        load_base(validate({}), paths)
    write_json(paths.base_json, {"name_or_path": "someorg/other", "load_path": str(tmp_path)})
    with pytest.raises(ValueError, match="describes 'someorg/other' but model.name_or_path is 'embedded'"):
        load_base(validate({}), paths)


def test_pretraining_logs_progress_lines_without_a_terminal(caplog, corpus_tokenizer):
    """Under DVC / Prefect / CI there is no TTY and tqdm is off: progress still shows, as ~10 log lines."""
    import logging

    from milora.stages.base import pack

    e = validate({"model": {"embedded": {**TINY["model"]["embedded"], "pretrain_steps": 20}}}).model.embedded
    docs, _ = synthetic.pretraining_corpus(40, 1, seed=0)
    data = pack(corpus_tokenizer, docs, 32)
    with caplog.at_level(logging.INFO, logger="milora.stages.base"):
        curve = pretrain(build_model(e, len(corpus_tokenizer), corpus_tokenizer), data, e)
    lines = [r.getMessage() for r in caplog.records if "pretraining step" in r.getMessage()]
    assert len(curve) == 20 and len(lines) == 10, lines
    assert lines[0].startswith("base: pretraining step 2/20, loss ") and lines[-1].startswith("base: pretraining step 20/20")


# ----------------------------------------------------------------------------- the embedded base


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded base bootstrapped once at test size through the CLI with a params.yaml."""
    from milora.cli import main

    root = tmp_path_factory.mktemp("embedded")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["stage", "base", "--params", str(root / "params.yaml"), "--root", str(root)]) == 0
    return Paths(root)


@pytest.mark.slow
def test_embedded_base_is_saved_in_hf_format_with_identity(embedded):
    paths = embedded
    info = read_json(paths.base_json)
    assert info["name_or_path"] == "embedded" and info["embedded"] is True and info["load_path"] == "models/base"
    assert info["content_hash"] == content_hash(sorted(paths.base_dir.glob("*.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(paths.base_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(paths.base_dir, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 64
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert len(tok) == model.config.vocab_size <= 384 and tok.pad_token == "<pad>"
    assert (paths.base_dir / "model.safetensors").exists() and not list(paths.base_dir.glob("*.bin"))
    heldout = paths.heldout_text.read_text(encoding="utf-8").splitlines()
    assert len(heldout) == 80 and all(heldout)
    with open(paths.plot("base_loss.csv")) as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 120 and list(curve[0]) == ["step", "loss"]
    assert float(curve[-1]["loss"]) < float(curve[0]["loss"]) - 2


@pytest.mark.slow
def test_embedded_base_beats_an_untrained_twin_on_heldout_text_by_a_wide_margin(embedded):
    paths = embedded
    cfg = validate(TINY)
    model, tok = load_base(cfg, paths)
    docs = paths.heldout_text.read_text(encoding="utf-8").splitlines()
    length = cfg.model.embedded.max_position_embeddings  # as the base stage scores it
    trained, n_tokens = heldout_nll(model, tok, docs, length, 32)
    untrained, _ = heldout_nll(build_model(cfg.model.embedded, len(tok), tok), tok, docs, length, 32)
    assert n_tokens > 1000
    assert untrained > math.log(len(tok)) - 0.5  # a random model is about uniform
    assert trained < untrained - 2.5  # more than 12x lower perplexity
    assert math.exp(trained) < len(tok) / 20
    m = read_json(paths.report("base"))
    assert m["heldout"]["loss"] == pytest.approx(trained, abs=1e-3)
    assert m["heldout"]["init_loss"] == pytest.approx(untrained, abs=1e-3)
    assert m["heldout"]["uniform_perplexity"] == len(tok)
    trained_s, init_s = m["spectrum"]["trained"], m["spectrum"]["init"]
    assert trained_s["top10pct_energy"] > init_s["top10pct_energy"]
    assert trained_s["top_to_median"] > init_s["top_to_median"]


@pytest.mark.slow
def test_embedded_base_build_is_deterministic(embedded, tmp_path):
    again = Paths(tmp_path)
    base_stage(validate(TINY), again)
    assert read_json(again.base_json)["content_hash"] == read_json(embedded.base_json)["content_hash"]
    assert again.heldout_text.read_bytes() == embedded.heldout_text.read_bytes()
    assert (again.base_dir / "tokenizer.json").read_bytes() == (embedded.base_dir / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_cli_prepare_after_base_uses_its_tokenizer(embedded, tmp_path):
    from milora.cli import main

    root = tmp_path / "p"
    shutil.copytree(embedded.root / "models", root / "models")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    for stage in ("ingest", "prepare"):
        assert main(["stage", stage, "--params", str(root / "params.yaml"), "--root", str(root)]) == 0
    m = read_json(Paths(root).report("data"))
    assert m["rows"]["train"] + m["rows"]["eval"] == 80 and m["truncated"]["train"] == 0
