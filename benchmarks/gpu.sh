#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py): full-depth Llama-2-7B-shaped bf16 model, MiLoRA init vs PEFT's
# full-SVD inits, training tokens/s and memory vs PEFT LoRA, merged generation -> docs/benchmarks.md.
# Skips cleanly (exit 0) where there is no CUDA device. Extra arguments go to gpu.py (e.g. --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ " $* " != *" --dry-run "* ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "benchmarks/gpu.sh: no CUDA device here: skipping (bash benchmarks/gpu.sh --dry-run checks it on the CPU)"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" benchmarks/gpu.py "$@"
