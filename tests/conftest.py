"""Shared fixtures: offline environment and tiny models built from configs (no hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs 2 xdist processes, each starting stage, server and worker subprocesses, on 2 cores, with models
# of a few thousand parameters: one compute thread per process (what the worker and DDP tests set already) instead
# of a thread per core in every one of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.mlflow_fixtures import mlflow_server  # noqa: E402, F401
from tests.models import tiny_gpt2, tiny_llama  # noqa: E402
from tests.prefect_fixtures import prefect_api, prefect_env, prefect_server  # noqa: E402, F401

# The test files that take longest run first: `make test` hands whole files to its xdist processes in collection
# order (`--dist loadfile` with `--no-loadscope-reorder`: without it xdist orders the files by their number of
# tests), so the short files fill in at the end and both processes finish together. The order of the seconds each
# file took in a `make test` on 2 cores (per-test timeline, 2026-12-08): flow 458, real_model 273, workers 232,
# dvc 192, stages 140, benchmarks 126, quantization 106, mlflow_server 73, evaluation 64, lab 62,
# distributed_init 35, registry 35, cache 30, cache_s3 22; the other files ~80 together.
LONGEST_FIRST = ("test_flow.py", "test_real_model.py", "test_workers.py", "test_dvc.py", "test_stages.py",
                 "test_benchmarks.py", "test_quantization.py", "test_mlflow_server.py", "test_evaluation.py",
                 "test_lab.py", "test_distributed_init.py", "test_registry.py", "test_cache.py", "test_cache_s3.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(autouse=True)
def _no_process_wide_mlflow_uri():
    """A test (or the code it runs in-process) that sets mlflow's process-wide tracking or registry URI
    sends every later test in the process to that store (CI saw "Registered Model ... not found" two
    files later): pass the store per call instead (MlflowClient(uri), download_artifacts(tracking_uri=))."""
    yield
    import sys

    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        leaked = {"tracking": tracking_utils._tracking_uri, "registry": registry_utils._registry_uri}
        leaked = {k: v for k, v in leaked.items() if v}
        tracking_utils._tracking_uri = registry_utils._registry_uri = None
        assert not leaked, f"the test left mlflow's process-wide URI set: {leaked}"


@pytest.fixture
def llama():
    """A tiny randomly initialised Llama-architecture causal LM (fp32, eval mode)."""
    return tiny_llama()


@pytest.fixture
def gpt2():
    """A tiny randomly initialised GPT-2-architecture causal LM (fp32, eval mode)."""
    return tiny_gpt2()


@pytest.fixture
def input_ids():
    """A fixed batch of token ids valid for the tiny models."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (2, 12), generator=g)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A real moto S3 server process on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from tests.servers import start_moto

    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server.url
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket on the moto server, with the AWS env vars pointing boto3 at it; yields its name."""
    import uuid

    import boto3

    from tests.servers import S3_TEST_ENV

    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return name
