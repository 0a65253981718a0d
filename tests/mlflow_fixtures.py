"""A real `mlflow server` for integration tests: started with the project's `mlflow/serve.sh` on 127.0.0.1,
SQLite backend, artifacts proxied to S3 on the moto server process; one per test module."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.servers import S3_TEST_ENV, ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "mlflow" / "serve.sh"


class MlflowServer:
    """The project's tracking server as a subprocess; `stop()` and `start()` again keep port, backend and bucket."""

    def __init__(self, workdir: Path, s3_endpoint: str, bucket: str):
        self.workdir, self.bucket = workdir, bucket
        self.port = free_port()
        self.backend_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.artifacts_destination = f"s3://{bucket}/mlartifacts"
        self.log_path = workdir / "mlflow-server.log"
        env = {
            **S3_TEST_ENV,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "MLFLOW_PORT": str(self.port),
            "MLFLOW_BACKEND_STORE_URI": self.backend_uri,
            "MLFLOW_ARTIFACTS_DESTINATION": self.artifacts_destination,
            "MLFLOW_WORKERS": "1",
        }
        self.process = ServerProcess(["bash", str(SERVE)], self.port, "/health", env=env,
                                     log_path=self.log_path, timeout=240)

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return self.process.url

    def start(self) -> MlflowServer:
        """Start (or restart) the server and wait for `/health`."""
        self.process.start()
        return self

    def stop(self) -> None:
        """Stop the server process group."""
        self.process.stop()


@pytest.fixture(scope="module")
def mlflow_server(moto_server, tmp_path_factory):
    """A running `mlflow server` (SQLite backend, artifacts in a fresh moto S3 bucket) for one test module."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=moto_server, region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=bucket)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), moto_server, bucket).start()
    yield server
    server.stop()


_TEMPLATE: list[Path] = []


def seed_embedded_store(root: Path) -> None:
    """Give `root` an embedded MLflow store (`mlflow/mlflow.db`) copied from a template migrated once per session.

    Creating the SQLite schema takes seconds; copying the file of an empty, migrated store takes
    milliseconds. The template itself is made through `milora.tracking.store.client`, the production path.
    """
    import atexit
    import shutil
    import tempfile

    from milora.tracking import store

    if not _TEMPLATE:
        tmp = Path(tempfile.mkdtemp(prefix="milora-mlflow-template-"))
        atexit.register(shutil.rmtree, tmp, True)
        store.client(tmp).search_experiments()
        _TEMPLATE.append(tmp / "mlflow" / "mlflow.db")
    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE[0], root / "mlflow" / "mlflow.db")


FRESH_LOAD = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict([{"prompt": p} for p in json.loads(sys.argv[2])], params={"max_new_tokens": int(sys.argv[3])})
print("GENERATIONS=" + json.dumps(list(out)))
"""


def predict_in_fresh_process(model_uri: str, prompts: list[str], max_new_tokens: int, tracking_uri: str,
                             workdir: Path, hf_home: Path | None = None) -> list[str]:
    """Load `model_uri` with plain MLflow in a new Python process, offline and with an empty HF cache (or the
    one under `hf_home`); predict."""
    import json
    import os
    import subprocess
    import sys

    hf_home = hf_home or workdir / "empty-hf-home"
    hf_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PREFECT"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(hf_home), PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, model_uri, json.dumps(prompts), str(max_new_tokens)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("GENERATIONS="))
    return json.loads(line.removeprefix("GENERATIONS="))


def reference_generations(paths, prompts: list[str], max_new_tokens: int, precision: str = "fp32") -> list[str]:
    """What the trained adapter generates in this process (milora.load_adapter + the evaluate stage's generate,
    under the autocast of `precision`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import milora
    from milora.model.generate import generate
    from milora.model.precision import autocast

    tok = AutoTokenizer.from_pretrained(paths.base_dir)
    model = milora.load_adapter(AutoModelForCausalLM.from_pretrained(paths.base_dir), paths.adapter_dir).eval()
    with autocast(precision, "cpu"):
        return generate(model, tok, prompts, max_new_tokens)
