"""Against a real `mlflow server` (mlflow/serve.sh on 127.0.0.1, SQLite backend, artifacts in S3 on moto):
logging, registration, the champion gate, idempotency, fresh-process loading, outages and credentials."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest

from milora.pipeline.config import validate
from milora.pipeline.paths import Paths
from milora.tracking import registration, store
from tests.mlflow_fixtures import predict_in_fresh_process, reference_generations
from tests.pipeline_outputs import build_pipeline_outputs, clone_outputs, retrained, tree_digest
from tests.servers import S3_TEST_ENV

pytestmark = pytest.mark.slow

SECRET = S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"]
URI_PASSWORD = "uri-password-do-not-log"
PROMPTS = ["question: what is one plus one? answer:", "a tiny model"]
TOKENS = {"HF_TOKEN": "hf_token-do-not-log-1", "GITHUB_TOKEN": "ghp_token-do-not-log-2",
          "DB_PASSWORD": "db-password-do-not-log-3", "OPENAI_API_KEY": "sk-api-key-do-not-log-4"}


@pytest.fixture(autouse=True)
def client_env(mlflow_server, monkeypatch):
    """This process talks to the server, and holds the S3 credentials in its environment like a real user."""
    for name in ("MLFLOW_RUN_ID", "PREFECT__FLOW_RUN_ID", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    for k, v in S3_TEST_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Paths:
    return build_pipeline_outputs(tmp_path_factory.mktemp("built")).paths


@pytest.fixture
def project(built, tmp_path) -> Paths:
    return clone_outputs(built.root, tmp_path / "project")


def cfg(name: str, **register):
    return validate({"register": {"model_name": name, "experiment": "server-tests", "log_lora_export": False,
                                  "connect_retries": 1, "retry_backoff_s": 0.2, **register}})


def s3_keys(mlflow_server) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=mlflow_server.process.env["MLFLOW_S3_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=mlflow_server.bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_run_is_logged_with_artifacts_in_s3(project, mlflow_server):
    reg = registration.register_run(cfg("srv-log", log_lora_export=True), project)
    c = store.client(project.root)
    run = c.get_run(reg.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert run.data.params["adapter.method"] == "milora" and run.data.params["adapter.rank"] == "4"
    assert run.data.metrics["average_accuracy"] == 0.5 and run.data.metrics["svd.cache_misses"] == 4
    assert len(c.get_metric_history(reg.run_id, "train_loss")) == 3
    tags = run.data.tags
    for tag in ("milora.git_commit", "milora.data_hash", "milora.raw_data_hash", "milora.base.content_hash",
                "milora.svd_cache_keys", "milora.method", "milora.run_key", "milora.decision"):
        assert tags[tag], tag
    keys = [k for k in s3_keys(mlflow_server) if reg.run_id in k]
    for suffix in ("adapter/milora.json", "adapter/adapter_model.safetensors", "model/MLmodel",
                   "model/artifacts/base/model.safetensors", "model/code/milora/core/adapter.py",
                   "lora_export/adapter_model.safetensors", "plots/spectrum.png", "plots/train_loss.csv",
                   "lineage/dvc.lock", "eval/predictions.jsonl", "metrics/eval.json"):
        assert any(k.endswith(suffix) for k in keys), suffix
    assert not (project.root / "mlflow").exists()  # nothing went to the embedded store
    # serve.sh leaves MLflow's job runner off (the pipeline starts no MLflow jobs): no huey consumer processes.
    group = subprocess.run(["ps", "-o", "args=", "-s", str(mlflow_server.process.proc.pid)], capture_output=True,
                           text=True).stdout
    assert "mlflow server" in group and "huey" not in group and "_job_runner" not in group, group


def test_champion_loads_in_a_fresh_process_and_generates(project, mlflow_server, tmp_path):
    registration.register_run(cfg("srv-load"), project)
    got = predict_in_fresh_process("models:/srv-load@champion", PROMPTS, 5, mlflow_server.url, tmp_path)
    assert got == reference_generations(project, PROMPTS, 5)
    assert len(got) == 2 and all(isinstance(g, str) and g for g in got)


def test_gate_promotes_better_keeps_worse_and_ties(project):
    c = store.client(project.root)
    config = cfg("srv-gate", min_delta=0.05)
    first = registration.register_run(config, project)
    assert first.decision.promote
    results = {}
    for label, acc in [("better", 0.6), ("worse", 0.5), ("below_delta", 0.64), ("tie", 0.6)]:
        retrained(project, average_accuracy=acc, perplexity=10 + len(results))  # a new model each time
        results[label] = registration.register_run(config, project)
    assert results["better"].decision.promote
    assert not results["worse"].decision.promote and "worse by 0.1" in results["worse"].decision.reason
    assert not results["below_delta"].decision.promote and "not more than min_delta" in results["below_delta"].decision.reason
    assert not results["tie"].decision.promote and "tie" in results["tie"].decision.reason
    assert str(c.get_model_version_by_alias("srv-gate", "champion").version) == results["better"].version == "2"
    assert str(c.get_model_version_by_alias("srv-gate", "challenger").version) == results["tie"].version == "5"
    tags = c.get_model_version("srv-gate", "4").tags
    assert (float(tags["milora.gate.challenger_value"]), float(tags["milora.gate.champion_value"])) == (0.64, 0.6)
    assert tags["milora.decision"] == "not_promoted" and tags["milora.decision.reason"]


def test_two_registrations_at_once_leave_the_champion_on_the_best(built, tmp_path, mlflow_server):
    """Two `milora register` processes (parallel workers) register and gate at the same moment against one
    server (a test fault lines them up right before the gate and makes deciding take 2 s): the gate lock
    makes them decide one after the other, so the champion ends on the better one and both decisions are
    recorded, the second against the champion the first left."""
    import subprocess

    from tests.faults import fault_env
    from tests.project import env

    champion = clone_outputs(built.root, tmp_path / "champion")
    assert registration.register_run(cfg("srv-race"), champion).decision.promote  # v1: average_accuracy 0.5
    roots = {}
    for name, acc, shift in (("better", 0.9, 1e-3), ("worse", 0.7, 2e-3)):
        roots[name] = clone_outputs(built.root, tmp_path / name).root
        retrained(Paths(roots[name]), shift=shift, average_accuracy=acc)
        (roots[name] / "params.yaml").write_text(
            "register: {model_name: srv-race, experiment: server-tests, log_lora_export: false}\n")
    race = fault_env(gate_barrier=(str(tmp_path / "barrier"), 2), gate_delay=2.0)
    procs = {name: subprocess.Popen(["milora", "register", "--root", str(root), "--params", str(root / "params.yaml")],
                                    env=env(race), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, root in roots.items()}
    out = {name: p.communicate(timeout=600) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, out[name][1][-3000:]
    got = {name: json.loads(o.strip().splitlines()[-1]) for name, (o, _) in out.items()}
    c = store.client(".")
    best = got["better"]["version"]
    assert str(c.get_model_version_by_alias("srv-race", "champion").version) == best
    tags = {name: c.get_model_version("srv-race", g["version"]).tags for name, g in got.items()}
    assert all("milora.decision" in t for t in tags.values())  # both decisions recorded
    assert tags["better"]["milora.decision"] == "promoted"
    if tags["better"]["milora.gate.champion_version"] == got["worse"]["version"]:
        # the worse one decided first: promoted over v1, then beaten by the better one
        assert tags["worse"]["milora.decision"] == "promoted" and tags["worse"]["milora.gate.champion_version"] == "1"
    else:  # the better one first; the worse one was gated against it, not against v1
        assert tags["better"]["milora.gate.champion_version"] == "1"
        assert tags["worse"]["milora.decision"] == "not_promoted" and "worse by" in tags["worse"]["milora.decision.reason"]
        assert tags["worse"]["milora.gate.champion_version"] == best
    assert "srv-race--champion-gate-lock" not in {m.name for m in c.search_registered_models()}


def test_retrying_registration_creates_no_duplicate(project):
    c = store.client(project.root)
    first = registration.register_run(cfg("srv-retry"), project)
    again = registration.register_run(cfg("srv-retry"), project)
    assert (again.version, again.run_id, again.created) == (first.version, first.run_id, False)
    assert len(c.search_model_versions("name='srv-retry'")) == 1


def test_server_down_then_up_registers_the_same_run_once(project, mlflow_server, monkeypatch):
    config = cfg("srv-outage")
    c = store.client(project.root)  # a caller opened the run while the server was up
    run_id = c.create_run(store.ensure_experiment(c, config.register.experiment, project.root)).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    before = tree_digest(project.root)
    mlflow_server.stop()
    try:
        with pytest.raises(store.TrackingUnavailableError) as exc:
            registration.register_stage(config, project)
        assert mlflow_server.url in str(exc.value) and "unreachable" in str(exc.value)
        assert tree_digest(project.root) == before
        assert not project.metrics("register").exists()
    finally:
        mlflow_server.start()  # same port, same SQLite backend, same bucket
    registration.register_stage(config, project)
    written = json.loads(project.metrics("register").read_text())
    assert written["run_id"] == run_id and written["created"] and written["promoted"]
    registration.register_stage(config, project)
    assert [v.run_id for v in c.search_model_versions("name='srv-outage'")] == [run_id]


def test_credentials_never_reach_params_tags_artifacts_or_logs(project, mlflow_server, monkeypatch, tmp_path,
                                                               caplog, capfd):
    from mlflow.artifacts import download_artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url.replace("http://", f"http://milora:{URI_PASSWORD}@"))
    for name, value in TOKENS.items():  # the user's other secrets, in the environment as usual
        monkeypatch.setenv(name, value)
    # the data came from a URL with the S3 secret inlined: it is in the adapter's lineage (a pipeline output)
    lineage_file = project.adapter_dir / "lineage.json"
    lineage = json.loads(lineage_file.read_text())
    lineage["params"]["data.source"] = f"https://reader:{SECRET}@data.example/rows.jsonl"
    lineage["params"]["model.name_or_path"] = f"org/model?token={TOKENS['HF_TOKEN']}"
    lineage["params"]["data.heldout_text"] = f"/mnt/{TOKENS['DB_PASSWORD']}/heldout.txt"
    lineage_file.write_text(json.dumps(lineage))
    # ... and in text artifacts: a prediction that echoes an API key, a DVC file naming a token
    project.predictions.write_text(json.dumps({"prediction": f"use {TOKENS['OPENAI_API_KEY']}"}) + "\n")
    (project.root / "dvc.lock").write_text((project.root / "dvc.lock").read_text() + f"# {TOKENS['GITHUB_TOKEN']}\n")
    config = cfg("srv-secrets", log_lora_export=True, log_merged=True)
    with caplog.at_level(logging.DEBUG):
        reg = registration.register_run(config, project)
        registration.promote("srv-secrets", reg.version, force=True, cfg=config, root=project.root)
    c = store.client(project.root)
    run = c.get_run(reg.run_id)
    mv = c.get_model_version("srv-secrets", reg.version)
    assert run.data.params["data.source"] == "https://***@data.example/rows.jsonl"
    texts = [json.dumps([run.data.params, run.data.tags, list(run.data.metrics), mv.tags, mv.source,
                         c.get_registered_model("srv-secrets").tags])]
    local = download_artifacts(run_id=reg.run_id, dst_path=str(tmp_path / "artifacts"))
    files = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert local and len(files) > 20 and any(p.name == "lineage.json" for p in files)
    blobs = [p.read_bytes() for p in files]
    out, err = capfd.readouterr()
    texts += [caplog.text, out, err, mlflow_server.log_path.read_text(errors="replace")]
    for secret in (SECRET, URI_PASSWORD, *TOKENS.values()):
        assert not any(secret in t for t in texts), secret
        assert not any(secret.encode() in b for b in blobs), secret
