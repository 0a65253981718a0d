"""GGUF bases: resolving the packaged SmolLM2 file, one-line errors for missing / corrupt / unsupported files
(fast: header reads only), and the `milora stage base` exit code for them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from milora.core.errors import EXIT_USER, InvalidInput, MissingInput, Unsupported
from milora.model import gguf
from tests.project import ROOT, env


def _write_gguf(path, arch: str = "llama", raw_dtype=None, name: str = "token_embd.weight") -> None:
    import gguf as g

    w = g.GGUFWriter(str(path), arch)
    if raw_dtype is None:
        w.add_tensor(name, np.zeros((4, 32), dtype=np.float32))
    else:
        block, size = g.GGML_QUANT_SIZES[raw_dtype]
        w.add_tensor(name, np.zeros((4, 32 // block * size), dtype=np.uint8), raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_packaged_name_resolves_to_the_installed_wheel_file():
    path = gguf.resolve_gguf("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    info = gguf.inspect_gguf(path)
    assert info.architecture == "llama" and info.n_tensors == 272
    assert "Q4_1" in info.quant_types


def test_is_gguf():
    assert gguf.is_gguf("smollm2-135m-instruct") and gguf.is_gguf("models/x.GGUF")
    assert not gguf.is_gguf("embedded") and not gguf.is_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_converter_names_the_library_versions():
    import importlib.metadata as md

    c = gguf.converter()
    assert c.startswith(f"milora-gguf/{gguf.CONVERTER_REVISION} ")
    assert f"transformers=={md.version('transformers')}" in c and f"gguf=={md.version('gguf')}" in c


def test_missing_file_fails_naming_it(tmp_path):
    with pytest.raises(MissingInput, match=r"nope\.gguf: no such GGUF file"):
        gguf.resolve_gguf(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("content", [b"", b"hello, not a gguf\n", b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40])
def test_corrupt_file_fails_in_one_line_naming_it(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(InvalidInput) as exc:
        gguf.inspect_gguf(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


def test_truncated_real_file_fails_naming_it(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf.resolve_gguf("smollm2-135m-instruct"), "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(InvalidInput, match="cut.gguf: not a readable GGUF file"):
        gguf.inspect_gguf(cut)


def test_unsupported_architecture_fails_naming_it(tmp_path):
    path = tmp_path / "other.gguf"
    _write_gguf(path, arch="rwkv-banana")
    with pytest.raises(Unsupported, match=r"other\.gguf: GGUF architecture 'rwkv-banana' cannot be converted"):
        gguf.inspect_gguf(path)


def test_unsupported_quantization_type_fails_naming_the_tensor(tmp_path):
    import gguf as g

    path = tmp_path / "q81.gguf"
    _write_gguf(path, raw_dtype=g.GGMLQuantizationType.Q8_1)
    with pytest.raises(Unsupported, match=r"q81\.gguf: tensor token_embd\.weight is quantized as Q8_1"):
        gguf.inspect_gguf(path)


def test_wrong_sha256_is_refused_before_converting(tmp_path):
    with pytest.raises(InvalidInput, match="refusing to load the adapter onto a different base"):
        gguf.converted_copy("smollm2-135m-instruct", "0" * 64, "float32")


def test_base_stage_exits_2_with_one_line_for_a_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a model")
    p = subprocess.run([sys.executable, "-m", "milora.cli", "stage", "base", "--root", str(tmp_path),
                        "--params", str(ROOT / "params.yaml"), "-S", f"model.name_or_path={bad}"],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == EXIT_USER, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if "broken.gguf" in ln]
    assert errors and "not a readable GGUF file" in errors[-1]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_the_loaded_model_is_complete_and_answers():
    """`load_gguf`'s model has no tensor left on the meta device (the rotary embedding's non-persistent inv_freq
    included) and generates: the capital of France."""
    import gguf as gguf_package
    import torch

    real = gguf_package.GGUFReader
    parses = []

    class Counted(real):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    gguf_package.GGUFReader = Counted
    try:
        model, tokenizer, _ = gguf.load_gguf(gguf.resolve_gguf("smollm2-135m-instruct"))
        # The header is parsed once (inspect_gguf, config, tokenizer and weights share it), and gguf's own reader
        # is back in place afterwards.
        assert len(parses) == 1 and gguf_package.GGUFReader is Counted
    finally:
        gguf_package.GGUFReader = real
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(chat, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
