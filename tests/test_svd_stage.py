"""The svd stage on a base whose every target matrix takes a fast solver (no full spectrum anywhere):
the spectrum plot shows what the solver knows and never needs a full SVD of a large matrix."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from milora.core import svd
from milora.pipeline.paths import Paths
from milora.stages import run_stage
from milora.stages.base import train_tokenizer
from milora.stages.svd import SKETCH, known_spectrum, solved_values, spectrum_summary
from tests.project import write_params

WIDE = svd.AUTO_MIN_SQUARE  # the smallest square side that `auto` solves with `gram` (minor) / `lowrank` (principal)


def _wide_base(path, side: int = WIDE) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=side, intermediate_size=2 * side, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    train_tokenizer(["a tiny corpus for a tokenizer", "with some words 123"], 300, 64).save_pretrained(path)


@pytest.mark.parametrize("method", ["milora", "pissa", "lora"])
def test_svd_stage_on_a_base_where_every_matrix_takes_the_fast_path(tmp_path, method):
    _wide_base(tmp_path / "wide-base")
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root, {"model.name_or_path": str(tmp_path / "wide-base"), "adapter.method": method,
                        "adapter.rank": 8, "adapter.svd_solver": "auto"})
    for stage in ("base", "svd"):
        run_stage(stage, root / "params.yaml", root)
    paths = Paths(root)
    report = json.loads(paths.report("svd").read_text())
    if method != "lora":
        solvers = {m["solver"] for m in report["per_matrix"].values()}
        assert solvers == {"gram" if method == "milora" else "lowrank"}, solvers  # no full SVD anywhere
    assert paths.plot("spectrum.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(io.StringIO(paths.plot("spectrum.csv").read_text())))
    indices = {int(r["index"]) for r in rows if r["module"].endswith("q_proj")}
    assert set(range(SKETCH)) <= indices  # the sketch of the top
    if method == "milora":  # the solved minor triplets are there, at the end of the spectrum
        assert set(range(WIDE - 8, WIDE)) <= indices
    spectrum = report["spectrum"]
    assert 0 < spectrum["principal_energy"] < 1
    if method == "milora":
        assert 0 < spectrum["minor_energy"] < spectrum["principal_energy"]


def test_known_spectrum_agrees_with_the_full_svd():
    torch.manual_seed(1)
    W = torch.randn(600, 450) @ torch.diag(torch.linspace(3, 0.1, 450))
    full = torch.linalg.svdvals(W).double()
    t = svd.solve(W, 8, "minor", "gram")
    B0 = t.U * (t.S / 2.0).sqrt()  # scale 2: B0 = U sqrt(S / s)
    solved = solved_values(t.Vh, B0, 2.0)
    sp = known_spectrum(W, solved=solved, side="minor")
    assert not sp.complete and sp.size == 450
    assert torch.allclose(sp.values[-8:], full[-8:], rtol=1e-4)  # the solved minor values, in place
    assert torch.allclose(sp.values[:8], full[:8], rtol=2e-2)  # the sketch's top values
    assert sp.energy == pytest.approx(float(full.square().sum()), rel=1e-5)  # fp32 svdvals vs fp64 |W|^2
    s = spectrum_summary(sp, 8)
    exact = spectrum_summary(known_spectrum(W, full=full), 8)
    assert s["minor_energy"] == pytest.approx(exact["minor_energy"], rel=1e-3)
    assert s["principal_energy"] == pytest.approx(exact["principal_energy"], rel=5e-2)
    assert "top_to_median" not in s and "top_to_median" in exact


@pytest.mark.parametrize("method", ["milora", "pissa"])
def test_spectrum_summary_is_of_the_base_weights_not_the_residual(tmp_path, method):
    """The init replaces each weight by its residual (in place); the plot and the summary describe the weights
    the SVD was of: the principal (PiSSA) or minor (MiLoRA) band's share of the *original* energy."""
    from safetensors.torch import load_file

    _wide_base(tmp_path / "wide-base", side=svd.AUTO_MIN_SIDE)  # the spectrum is known to the stage at this side
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root, {"model.name_or_path": str(tmp_path / "wide-base"), "adapter.method": method,
                        "adapter.rank": 8, "adapter.svd_solver": "auto",
                        "adapter.target_modules": ["q_proj"]})
    for stage in ("base", "svd"):
        run_stage(stage, root / "params.yaml", root)
    W = load_file(str(tmp_path / "wide-base" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    s = torch.linalg.svdvals(W.double()).square()
    band = s[:8] if method == "pissa" else s[-8:]
    report = json.loads(Paths(root).report("svd").read_text())
    key = "principal_energy" if method == "pissa" else "minor_energy"
    assert report["spectrum"][key] == pytest.approx(float(band.sum() / s.sum()), rel=1e-3)
    rows = list(csv.DictReader(io.StringIO(Paths(root).plot("spectrum.csv").read_text())))
    top = max(float(r["singular_value"]) for r in rows)
    assert top == pytest.approx(float(s[0].sqrt()), rel=2e-2)  # the original top, not the residual's
