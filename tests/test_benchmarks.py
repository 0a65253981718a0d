"""The benchmark scripts run (quick mode) so they cannot rot; their numbers are the benchmarks' job."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    out = tmp_path / "bench.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    text = out.read_text()
    assert "## Training throughput and inference cost" in text
    assert "| training tokens/s |" in text and "| peak memory (MiB) |" in text
