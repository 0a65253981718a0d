"""MLflow tracking: store resolution, credentials kept out, lineage tags, one run per pipeline run, logging."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from milora.pipeline.config import Config, RegisterConfig, validate
from milora.pipeline.dvcstate import data_hashes
from milora.pipeline.paths import Paths
from milora.pipeline.results import read_result
from milora.tracking import identity, runlog, scrub, store
from milora.tracking.lineage import lineage_tags
from tests.mlflow_fixtures import seed_embedded_store
from tests.pipeline_outputs import RAW_MD5, build_pipeline_outputs, clone_outputs, tree_digest
from tests.servers import S3_TEST_ENV, free_port

SECRET = S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No tracking server, joined run or Prefect run from the caller's environment."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT__FLOW_RUN_ID", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Paths:
    """Pipeline outputs built once for the module (tiny base, trained MiLoRA adapter, metrics, plots, DVC files)."""
    return build_pipeline_outputs(tmp_path_factory.mktemp("built")).paths


@pytest.fixture
def project(built, tmp_path) -> Paths:
    """A private copy of the built outputs, with an empty embedded MLflow store."""
    paths = clone_outputs(built.root, tmp_path / "project")
    seed_embedded_store(paths.root)
    return paths


# ----------------------------------------------------------------------------- store and credentials


def test_default_store_is_the_embedded_sqlite_file_under_the_root(tmp_path):
    uri = store.tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    assert store.artifacts_dir(tmp_path) == tmp_path.resolve() / "mlflow" / "artifacts"
    assert store.is_embedded(uri)


def test_tracking_uri_env_selects_a_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert store.tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    assert not store.is_embedded(store.tracking_uri(tmp_path))


def test_password_in_the_tracking_uri_moves_to_mlflow_credentials_and_never_prints(monkeypatch):
    uri = "http://alice:pw-in-uri-1234@127.0.0.1:5999"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert scrub.redact_uri(uri) == "http://***@127.0.0.1:5999"
    c = store.client(".")
    assert c.tracking_uri == "http://127.0.0.1:5999"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pw-in-uri-1234"
    assert "pw-in-uri-1234" not in scrub.scrub(f"failed to reach {uri}")


def test_scrub_removes_secret_environment_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE00000")  # an identifier, not a secret
    text = f"s3 error with key {SECRET} for AKIDEXAMPLE00000 at https://u:p4ssw0rd@host/x"
    clean = scrub.scrub(text)
    assert SECRET not in clean and "p4ssw0rd" not in clean
    assert "AKIDEXAMPLE00000" in clean and "https://***@host/x" in clean


@pytest.mark.parametrize("name", ["HF_TOKEN", "GITHUB_TOKEN", "hub_api_token", "DB_PASSWORD", "PGPASSWORD",
                                  "OPENAI_API_KEY", "my_api_key", "MLFLOW_TRACKING_PASSWORD"])
def test_scrub_removes_token_password_and_api_key_values(monkeypatch, name):
    value = f"value-of-{name.lower()}-do-not-log"
    monkeypatch.setenv(name, value)
    assert scrub.scrub(f"param data.source = https://host/x?key={value}&y=1") == \
        "param data.source = https://host/x?key=***&y=1"
    cfg = validate({"data": {"source": f"s3://bucket/{value}/rows"}})
    assert value not in json.dumps(runlog.run_params(cfg, {}))


def test_text_files_holding_a_credential_are_logged_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "lineage.json").write_text(json.dumps({"source": "https://u:pw-1234567@host/x", "key": SECRET}))
    (src / "weights.safetensors").write_bytes(b"\x00\x01binary")
    (src / "clean.json").write_text("{}")
    out = scrub.scrubbed_copy(src, tmp_path / "work")
    assert out != src and out.name == "adapter"
    logged = (out / "lineage.json").read_text()
    assert SECRET not in logged and "pw-1234567" not in logged and "https://***@host/x" in logged
    assert (out / "weights.safetensors").read_bytes() == b"\x00\x01binary"
    assert SECRET in (src / "lineage.json").read_text()  # the pipeline output itself is left alone
    assert scrub.scrubbed_copy(src / "clean.json", tmp_path / "work") == src / "clean.json"


def test_unreachable_server_fails_after_bounded_retries_naming_the_uri(tmp_path, monkeypatch, caplog):
    """MLflow's own HTTP client retries (urllib3, configured from the register config), no loop of ours."""
    uri = f"http://bob:pw-in-uri-5678@127.0.0.1:{free_port()}"
    rc = RegisterConfig(connect_retries=2, retry_backoff_s=0.01)
    with store.bounded_http(rc), pytest.raises(store.TrackingUnavailableError) as exc:
        store.check_reachable(uri, rc.connect_retries)
    msg = str(exc.value)
    assert scrub.redact_uri(uri) in msg and "3 attempt(s)" in msg and "unreachable" in msg
    assert "pw-in-uri-5678" not in msg + caplog.text
    assert len([r for r in caplog.records if r.getMessage().startswith("Retrying")]) == 2  # urllib3's retries


def test_the_register_config_sets_mlflows_http_retries(monkeypatch):
    for name in store.http_settings(RegisterConfig(connect_retries=20, retry_backoff_s=300)):
        monkeypatch.delenv(name, raising=False)
    assert store.http_settings(RegisterConfig()) == {  # defaults: 3 retries waiting 0, 2, 4 s (+ MLflow's jitter)
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    rc = RegisterConfig(connect_retries=20, retry_backoff_s=300)  # above MLflow's own limits: raised to fit
    with store.bounded_http(rc):
        from mlflow.environment_variables import (
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        )
        from mlflow.utils.rest_utils import _validate_backoff_factor, _validate_max_retries

        assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()) == (20, 150)
        _validate_max_retries(20)
        _validate_backoff_factor(150)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # put back


# ----------------------------------------------------------------------------- lineage


def test_lineage_tags_from_the_pipeline_outputs(built, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "5b0c4a52-0000-4000-8000-000000000001")
    lineage = json.loads((built.adapter_dir / "lineage.json").read_text())
    tags = lineage_tags(Config(), built)
    assert tags["milora.git_commit"] == lineage["git_commit"] == tags["mlflow.source.git.commit"]
    assert tags["milora.data_hash"] == lineage["data_hash"]
    assert tags["milora.raw_data_hash"] == RAW_MD5
    assert tags["milora.base.content_hash"] == lineage["base"]["content_hash"]
    assert tags["milora.base.architecture"] == "LlamaForCausalLM"
    keys = lineage["svd_cache_keys"]
    assert len(keys) == 4 and tags["milora.svd_cache_keys.count"] == "4"
    assert json.loads(tags["milora.svd_cache_keys"]) == keys
    assert tags["milora.method"] == "milora" and tags["milora.rank"] == "4"
    assert tags["milora.prefect_flow_run_id"] == "5b0c4a52-0000-4000-8000-000000000001"


def test_data_hash_falls_back_to_dvc_lock(project):
    lineage_file = project.adapter_dir / "lineage.json"
    lineage = json.loads(lineage_file.read_text())
    del lineage["data_hash"], lineage["git_commit"]
    lineage_file.write_text(json.dumps(lineage))
    (project.root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: milora stage prepare\n    outs:\n"
        "    - path: data/prepared\n      hash: md5\n      md5: feedbeef00000000000000000000cafe.dir\n"
    )
    tags = lineage_tags(Config(), project)
    assert tags["milora.data_hash"] == "feedbeef00000000000000000000cafe.dir"
    assert "milora.git_commit" not in tags  # the copy is not a git repository


def test_data_hash_is_dvcs_version_and_stale_training_data_is_flagged(project, caplog):
    """`milora.data_hash` is DVC's md5 of data/prepared; the train stage's content hash is kept as
    `milora.data_sha256` and checked against what data/prepared holds now."""
    from milora.core.io import file_digest

    prepared = project.prepared_dir
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    lineage_file = project.adapter_dir / "lineage.json"
    lineage = json.loads(lineage_file.read_text())
    lineage["data_hash"] = file_digest(prepared)
    lineage_file.write_text(json.dumps(lineage))
    tags = lineage_tags(Config(), project)
    assert tags["milora.data_hash"] == data_hashes(project.root)["data_hash"]
    assert tags["milora.data_sha256"] == lineage["data_hash"] and "milora.data_stale" not in tags
    (prepared / "train.jsonl").write_text('{"prompt": "a", "response": "c"}\n')  # re-prepared, not retrained
    with caplog.at_level("WARNING"):
        tags = lineage_tags(Config(), project)
    assert tags["milora.data_stale"] == "true" and "trained on other data" in caplog.text


def test_params_are_flat_and_scrubbed(built, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    cfg = validate({"data": {"source": f"https://reader:{SECRET}@data.example/rows.jsonl"}, "adapter": {"rank": 4}})
    params = runlog.run_params(cfg, {"params": {"train.max_steps": 3}})
    assert params["train.max_steps"] == "3" and params["adapter.rank"] == "4"
    assert params["adapter.target_modules"] == json.dumps(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    assert params["data.source"] == "https://***@data.example/rows.jsonl"
    assert not any(SECRET in v for v in params.values())


# ----------------------------------------------------------------------------- logging a run (embedded store)


def _store(project: Paths):
    c = store.client(project.root)
    return c, store.ensure_experiment(c, "milora-test", project.root)


def test_log_pipeline_run_to_the_embedded_store(project, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    c, exp = _store(project)
    assert (project.root / "mlflow" / "mlflow.db").is_file()
    key = identity.run_key(project)
    run_id = identity.ensure_run(c, exp, key)
    assert runlog.log_pipeline_run(c, run_id, Config(), project, key)
    run = c.get_run(run_id)
    assert run.info.artifact_uri.startswith((project.root.resolve() / "mlflow" / "artifacts").as_uri())
    assert run.data.params["adapter.rank"] == "4" and run.data.params["register.model_name"] == "milora"
    m = run.data.metrics
    assert m["average_accuracy"] == 0.5 and m["forgetting"] == 0.02 and m["perplexity"] == 12.5
    assert m["svd.cache_misses"] == 4 and "svd.init_seconds" in m and m["train.steps"] == 3
    history = c.get_metric_history(run_id, "train_loss")
    assert [h.step for h in history] == [1, 2, 3]
    assert run.data.tags["milora.run_key"] == key and run.data.tags["milora.method"] == "milora"
    listed = {a.path for a in c.list_artifacts(run_id)}
    assert {"adapter", "lineage", "metrics", "plots", "eval"} <= listed
    assert {a.path for a in c.list_artifacts(run_id, "adapter")} >= {
        "adapter/milora.json", "adapter/milora_init.safetensors", "adapter/adapter_model.safetensors",
        "adapter/lineage.json"}
    assert {a.path for a in c.list_artifacts(run_id, "plots")} == {"plots/spectrum.png", "plots/train_loss.csv"}
    assert {a.path for a in c.list_artifacts(run_id, "lineage")} >= {"lineage/dvc.lock", "lineage/raw.dvc",
                                                                       "lineage/lineage.json"}
    logged = json.loads((Path(run.info.artifact_uri.removeprefix("file://")) / "lineage" / "lineage.json").read_text())
    assert logged["svd_cache_keys"] == json.loads((project.adapter_dir / "lineage.json").read_text())["svd_cache_keys"]
    everything = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in everything

    # logging the same outputs again is a no-op; the same key finds the same run
    assert not runlog.log_pipeline_run(c, run_id, Config(), project, key)
    assert len(c.get_metric_history(run_id, "train_loss")) == 3
    assert identity.ensure_run(c, exp, key) == run_id


def test_missing_optional_outputs_are_skipped_with_a_log_line(tmp_path, caplog):
    paths = build_pipeline_outputs(tmp_path / "p", optional=False, steps=1).paths
    seed_embedded_store(paths.root)
    c, exp = _store(paths)
    run_id = identity.ensure_run(c, exp, identity.run_key(paths))
    with caplog.at_level(logging.INFO, logger="milora.tracking"):
        assert runlog.log_pipeline_run(c, run_id, Config(), paths)
    assert "dvc.lock" in caplog.text and "train_loss.csv" in caplog.text and "predictions.jsonl" in caplog.text
    listed = {a.path for a in c.list_artifacts(run_id)}
    assert "adapter" in listed and "plots" not in listed and "eval" not in listed
    assert "milora.data_hash" in c.get_run(run_id).data.tags  # still known from the adapter's lineage


def test_the_register_step_joins_the_run_named_by_mlflow_run_id(project, monkeypatch):
    """A caller that opened an MLflow run (its own orchestration) hands it over with MLFLOW_RUN_ID."""
    cfg = validate({"register": {"experiment": "milora-join"}})
    c, exp = _store(project)
    run_id = c.create_run(exp, run_name="nightly").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    key = identity.run_key(project)
    assert identity.ensure_run(c, "ignored-when-joined", key) == run_id
    assert runlog.log_pipeline_run(c, run_id, cfg, project, key)
    assert c.get_run(run_id).info.run_name == "nightly"
    # other outputs cannot be logged into that run
    from tests.pipeline_outputs import set_eval_metrics

    set_eval_metrics(project, average_accuracy=0.9)
    with pytest.raises(ValueError, match="already holds other pipeline outputs"):
        runlog.log_pipeline_run(c, run_id, cfg, project)


def test_unknown_mlflow_run_id_is_a_clear_error(project, monkeypatch):
    c, exp = _store(project)
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(ValueError, match="MLFLOW_RUN_ID=0123456789abcdef0123456789abcdef names no run"):
        identity.ensure_run(c, exp)


def test_prefect_flow_run_finds_its_run_again(project, monkeypatch):
    c, exp = _store(project)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-run-42")
    first = identity.ensure_run(c, exp, "key-a")
    assert identity.ensure_run(c, exp, "key-b") == first  # same flow run, same MLflow run
    assert c.get_run(first).data.tags["milora.prefect_flow_run_id"] == "flow-run-42"


def test_register_with_the_server_down_fails_clearly_and_leaves_outputs_alone(project, monkeypatch, capsys):
    from milora.cli import main

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = tree_digest(project.root)
    params = project.root / "params.yaml"
    params.write_text("register:\n  connect_retries: 1\n  retry_backoff_s: 0.01\n")
    assert main(["register", "--root", str(project.root), "--params", str(params)]) == 1  # a connection error: exit 1, worth a retry (user errors exit 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("milora register: error: MLflow tracking server") and "Traceback" not in "".join(err)
    assert uri in err[0] and "2 attempt(s)" in err[0]
    after = tree_digest(project.root)
    after.pop("params.yaml")
    after.pop(".milora/results/register.json")  # run state, not an output: the failure, structured
    result = read_result(project.root, "register")
    assert (result.status, result.error_kind, result.exit_code) == ("failed", "transient", 1)
    assert after == before
    assert not project.metrics("register").exists()
