"""The benchmark scripts run (quick mode) so they cannot rot; their numbers are the benchmarks' job."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(tmp_path: Path, script: str, *args: str) -> str:
    """Run `benchmarks/<script>` with `args`, writing its section into a fresh markdown file; return the file."""
    out = tmp_path / "bench.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    return out.read_text()


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    text = _bench(tmp_path, "train_throughput.py", "--quick")
    assert "## Training throughput and inference cost" in text
    assert "| training tokens/s |" in text and "| peak memory (MiB) |" in text


@pytest.mark.slow
def test_gpu_script_dry_run_on_the_cpu(tmp_path):
    """The GPU benchmark end to end at toy size on the CPU; without CUDA, gpu.sh skips cleanly."""
    import torch

    text = _bench(tmp_path, "gpu.py", "--dry-run")
    assert "## GPU: full-depth Llama-2-7B shape" in text and "dry run on the CPU" in text
    assert '| PEFT `init_lora_weights="pissa"`' in text and '`init_lora_weights="mica"`' in text
    assert "| tokens/s |" in text and "merged MiLoRA" in text
    assert (tmp_path / "gpu_results.json").is_file()
    if not torch.cuda.is_available():
        p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHON": sys.executable})
        assert p.returncode == 0 and "no CUDA device here: skipping" in p.stdout


@pytest.mark.slow
def test_svd_init_spectra_quick(tmp_path):
    """The "every spectrum" table at small shapes (the Llama-2-7B-shaped run is the benchmark's job)."""
    text = _bench(tmp_path, "svd_init.py", "--spectra", "--quick", "--kinds", "power1,clustered", "--no-wide")
    assert "## SVD initialisation on every spectrum" in text
    assert "| power law sigma_i = i^-1 + noise | 1376x512 | 8 |" in text and "| clustered small end" in text


@pytest.mark.slow
def test_precision_quick_on_the_embedded_base(tmp_path):
    """fp32 vs bf16 autocast through the pipeline's stages at toy size (SmolLM2 is the benchmark's job)."""
    from milora.model.precision import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("bf16 is refused on a CPU without native bf16")
    text = _bench(tmp_path, "precision.py", "--quick", "--parts", "embedded")
    assert "## bf16 autocast on the CPU" in text and "### The embedded base" in text
    assert "| training tokens/s |" in text and "| forgetting (held-out pretraining loss increase) |" in text


@pytest.mark.slow
def test_quantization_quick(tmp_path):
    """The step-0 error tables at toy size (SmolLM2 and the Llama-2-7B-shaped layer are the benchmark's job)."""
    text = _bench(tmp_path, "quantization.py", "--quick")
    assert "## Quantized bases: QLoRA, QPiSSA and QMiLoRA at step 0" in text
    for row in ("| QLoRA |", "| QPiSSA |", "| QMiLoRA |", "| QMiLoRA + minor refit |", "| LoftQ |",
                "| down_proj | QMiLoRA |"):
        assert row in text
    assert "QPiSSA below QLoRA on" in text and "Mean per-token KL(full || quantized)" in text
    assert "| control: QLoRA of W + Gaussian noise (0.3% of ‖W‖) |" in text


@pytest.mark.slow
def test_suite_profile_sums_the_cpu_of_every_process_by_kind_and_by_test(tmp_path):
    """benchmarks/suite_profile.py on one test that starts a `python -c` subprocess: both the pytest process and
    that subprocess log, and the subprocess counts for its test."""
    out = tmp_path / "profile.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite_profile.py"), "--workers", "1", "--out", str(out),
                    "--", "tests/test_config.py::test_loading_params_does_not_import_prefect"],
                   check=True, capture_output=True, text=True, timeout=600)
    text = out.read_text()
    assert "## Test suite CPU by process" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "pytest (controller, xdist workers)" in rows and "python -c" in rows
    assert "tests/test_config.py::test_loading_params_does_not_import_prefect" in rows
