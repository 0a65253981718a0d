"""Model registry on the embedded store (no server): gate, registration, idempotency, promotion, the pyfunc model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from milora.model.base import content_hash, weight_files
from milora.pipeline.config import RegisterConfig, validate
from milora.pipeline.paths import Paths
from milora.tracking import identity, packaging, registration, store
from milora.tracking.gate import TAG_DECISION, Decision, gate
from tests.mlflow_fixtures import predict_in_fresh_process, reference_generations, seed_embedded_store
from tests.pipeline_outputs import build_pipeline_outputs, clone_outputs, retrained

PROMPTS = ["question: what is two plus three? answer:", "the quick brown"]
REQUESTS = [{"prompt": p} for p in PROMPTS]  # raw prompts, as the pyfunc's signature takes them


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The embedded store only: no tracking server, joined run or Prefect run from the caller's environment."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT__FLOW_RUN_ID", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- the gate (pure)


def rc(**kw) -> RegisterConfig:
    return RegisterConfig(**kw)


def test_no_champion_promotes():
    d = gate({"average_accuracy": 0.3}, None, rc())
    assert d.promote and "no champion" in d.reason and d.challenger_value == 0.3 and d.champion_value is None


@pytest.mark.parametrize(
    ("new", "old", "min_delta", "promote", "why"),
    [
        (0.60, 0.50, 0.0, True, "better by 0.1"),
        (0.50, 0.50, 0.0, False, "tie"),
        (0.40, 0.50, 0.0, False, "worse by 0.1"),
        (0.55, 0.50, 0.05, False, "not more than min_delta"),  # 0.55 - 0.50 == min_delta (in floating point too)
        (0.54, 0.50, 0.05, False, "better by only 0.04"),
        (0.56, 0.50, 0.05, True, "> min_delta 0.05"),
        (0.1 + 0.2, 0.3, 0.0, False, "tie"),  # 0.30000000000000004 vs 0.3 is a tie, not a win
    ],
)
def test_maximize_with_min_delta(new, old, min_delta, promote, why):
    d = gate({"average_accuracy": new}, {"average_accuracy": old}, rc(min_delta=min_delta), champion_version="7")
    assert d.promote is promote and why in d.reason
    assert (d.challenger_value, d.champion_value, d.champion_version) == (new, old, "7")


def test_minimize():
    cfg = rc(metric="perplexity", direction="minimize", min_delta=0.5)
    assert gate({"perplexity": 9.0}, {"perplexity": 10.0}, cfg).promote
    assert not gate({"perplexity": 9.6}, {"perplexity": 10.0}, cfg).promote
    assert "worse by 1" in gate({"perplexity": 11.0}, {"perplexity": 10.0}, cfg).reason


def test_guards():
    cfg = rc(guards=[{"metric": "forgetting", "max_increase": 0.05, "max_value": 0.5}])
    champ = {"average_accuracy": 0.5, "forgetting": 0.10}
    ok = gate({"average_accuracy": 0.6, "forgetting": 0.14}, champ, cfg)
    assert ok.promote
    rose = gate({"average_accuracy": 0.9, "forgetting": 0.20}, champ, cfg)
    assert not rose.promote and "guard forgetting: rose by 0.1" in rose.reason
    too_high = gate({"average_accuracy": 0.9, "forgetting": 0.6}, None, cfg)  # bound holds with no champion too
    assert not too_high.promote and "max_value 0.5" in too_high.reason
    missing = gate({"average_accuracy": 0.9}, champ, cfg)
    assert not missing.promote and "no such metric" in missing.reason
    no_prev = gate({"average_accuracy": 0.6, "forgetting": 0.3}, {"average_accuracy": 0.5}, cfg)
    assert no_prev.promote and "max_increase not checked" in no_prev.reason


def test_missing_or_nan_metric_never_promotes():
    assert not gate({}, None, rc()).promote
    assert not gate({"average_accuracy": float("nan")}, None, rc()).promote
    d = gate({"average_accuracy": 0.9}, {"perplexity": 3.0}, rc(), champion_version="2")
    assert not d.promote and "champion (version 2) has no 'average_accuracy'" in d.reason


def test_decision_round_trips_through_tags():
    d = Decision(False, "tie", "average_accuracy", 0.5, 0.5, "3", "maximize", 0.01, "manual", False)
    tags = d.tags()
    assert list(tags)[-1] == TAG_DECISION and tags[TAG_DECISION] == "not_promoted"
    assert Decision.from_tags(tags) == d


# ----------------------------------------------------------------------------- registration on the embedded store


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Paths:
    return build_pipeline_outputs(tmp_path_factory.mktemp("built")).paths


@pytest.fixture
def project(built, tmp_path) -> Paths:
    paths = clone_outputs(built.root, tmp_path / "project")
    seed_embedded_store(paths.root)
    return paths


def versions(c, name):
    return sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def alias(c, name, a):
    return str(c.get_model_version_by_alias(name, a).version)


@pytest.mark.slow
def test_champion_moves_only_to_a_better_model(project):
    cfg = validate({"register": {"model_name": "gate-e2e", "min_delta": 0.01, "log_lora_export": False,
                                 "guards": [{"metric": "forgetting", "max_increase": 0.05}]}})
    c = store.client(project.root)
    first = registration.register_run(cfg, project)
    assert (first.version, first.created, first.decision.promote) == ("1", True, True)
    assert alias(c, "gate-e2e", "champion") == alias(c, "gate-e2e", "challenger") == "1"

    def challenger(**metrics):
        retrained(project, **metrics)
        reg = registration.register_run(cfg, project)
        assert reg.created and alias(c, "gate-e2e", "challenger") == reg.version
        return reg

    better = challenger(average_accuracy=0.6)
    assert better.decision.promote and alias(c, "gate-e2e", "champion") == better.version
    below_delta = challenger(average_accuracy=0.605)
    assert not below_delta.decision.promote and "not more than min_delta" in below_delta.decision.reason
    tie = challenger(average_accuracy=0.6, perplexity=11.0)
    assert not tie.decision.promote and "tie" in tie.decision.reason
    worse = challenger(average_accuracy=0.4)
    assert not worse.decision.promote and "worse by 0.2" in worse.decision.reason
    forgets = challenger(average_accuracy=0.9, forgetting=0.3)
    assert not forgets.decision.promote and "guard forgetting" in forgets.decision.reason
    assert alias(c, "gate-e2e", "champion") == better.version == "2"
    assert len(versions(c, "gate-e2e")) == 6

    # the decision, both values and the reason are on the version and on its run
    tags = c.get_model_version("gate-e2e", worse.version).tags
    assert tags["milora.decision"] == "not_promoted" and tags["milora.gate.champion_version"] == "2"
    assert float(tags["milora.gate.challenger_value"]) == 0.4 and float(tags["milora.gate.champion_value"]) == 0.6
    assert tags["milora.decision.reason"] == worse.decision.reason
    assert tags["milora.data_hash"] and tags["milora.base.content_hash"] and tags["milora.method"] == "milora"
    run = c.get_run(worse.run_id)
    assert run.data.tags["milora.decision"] == "not_promoted" and run.data.tags["milora.model_version"] == "gate-e2e/5"
    assert run.info.status == "FINISHED"
    decisions = [a.path for a in c.list_artifacts(worse.run_id, "decisions")]
    assert len(decisions) == 1 and decisions[0].startswith("decisions/v5-auto-")


@pytest.mark.slow
def test_retrying_registration_never_duplicates(project):
    cfg = validate({"register": {"model_name": "retry-e2e", "log_lora_export": False}})
    c = store.client(project.root)
    first = registration.register_run(cfg, project)
    again = registration.register_run(cfg, project)
    assert (again.version, again.run_id, again.created) == (first.version, first.run_id, False)
    assert again.decision.promote and again.decision.reason == first.decision.reason
    assert len(versions(c, "retry-e2e")) == 1
    exp = c.get_experiment_by_name("milora")
    assert len(c.search_runs([exp.experiment_id])) == 1
    # a crash after the version was created but before the decision was recorded: the retry decides once
    c.delete_model_version_tag("retry-e2e", first.version, "milora.decision")
    third = registration.register_run(cfg, project)
    assert third.version == first.version and third.decision.reason == "version 1 is already the champion"
    assert len(versions(c, "retry-e2e")) == 1


@pytest.mark.slow
def test_a_new_flow_run_with_the_same_adapter_returns_its_version(project, monkeypatch):
    """Registration is idempotent by content: the next flow run (or a params round trip, or another workspace)
    with a byte-identical adapter returns the version that holds it: no new run, model or version. An
    adapter with other weights is a new version, as always."""
    cfg = validate({"register": {"model_name": "rerun-e2e", "log_lora_export": False}})
    c = store.client(project.root)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "11111111-1111-1111-1111-111111111111")
    first = registration.register_run(cfg, project)
    assert not first.reused
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "22222222-2222-2222-2222-222222222222")
    from tests.pipeline_outputs import set_eval_metrics

    set_eval_metrics(project, average_accuracy=0.9)  # another evaluation of the same weights: the same model
    again = registration.register_run(cfg, project)
    assert (again.version, again.run_id, again.created, again.reused) == (first.version, first.run_id, False, True)
    assert again.decision == first.decision and "already registered" in again.summary
    assert len(versions(c, "rerun-e2e")) == 1
    assert len(c.search_runs([c.get_experiment_by_name("milora").experiment_id])) == 1
    assert versions(c, "rerun-e2e")[0].tags[identity.TAG_MODEL_KEY] == identity.model_key(project)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "33333333-3333-3333-3333-333333333333")
    retrained(project, average_accuracy=0.9)  # other weights: a new version
    third = registration.register_run(cfg, project)
    assert third.created and not third.reused and third.version == "2"


@pytest.mark.slow
def test_register_cli_and_manual_promotion(project, capsys):
    from milora.cli import main

    params = project.root / "params.yaml"
    params.write_text("register:\n  model_name: manual-e2e\n  log_merged: true\n")
    assert main(["register", "--root", str(project.root), "--params", str(params)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["version"] == "1" and out["decision"]["promote"]
    written = json.loads(project.metrics("register").read_text())
    assert written["version"] == "1" and written["promoted"] and written["tracking_uri"].startswith("sqlite:///")
    c = store.client(project.root)
    exports = {a.path for a in c.list_artifacts(out["run_id"])}
    assert {"model", "lora_export", "merged"} <= exports
    assert {"merged/model.safetensors", "lora_export/adapter_model.safetensors"} <= {
        a.path for d in ("merged", "lora_export") for a in c.list_artifacts(out["run_id"], d)}

    retrained(project, average_accuracy=0.3)
    assert main(["register", "--root", str(project.root), "--params", str(params)]) == 0
    capsys.readouterr()
    assert alias(c, "manual-e2e", "champion") == "1" and alias(c, "manual-e2e", "challenger") == "2"

    # a manual decision goes through the gate unless forced, and is recorded like the automatic one
    argv = ["promote", "--model", "manual-e2e", "--root", str(project.root), "--params", str(params)]
    assert main(argv) == 1
    refused = json.loads(capsys.readouterr().out)
    assert not refused["promote"] and refused["source"] == "manual" and "worse" in refused["reason"]
    assert alias(c, "manual-e2e", "champion") == "1"
    assert main([*argv, "--version", "2", "--force"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["promote"] and forced["forced"] and "forced by hand" in forced["reason"]
    assert alias(c, "manual-e2e", "champion") == "2"
    tags = c.get_model_version("manual-e2e", "2").tags
    assert tags["milora.decision"] == "promoted" and tags["milora.decision.forced"] == "true"
    assert tags["milora.decision.source"] == "manual" and tags["milora.gate.champion_version"] == "1"
    run_id = c.get_model_version("manual-e2e", "2").run_id
    assert c.get_run(run_id).data.tags["milora.decision.forced"] == "true"
    assert len(c.list_artifacts(run_id, "decisions")) == 3  # auto, manual refused, manual forced

    assert main(["promote", "--model", "nope", "--root", str(project.root), "--params", str(params)]) == 2
    assert "no registered model 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_champion_loads_offline_in_a_fresh_process_and_generates(project, tmp_path, monkeypatch):
    import pandas as pd
    from mlflow.pyfunc import load_model

    cfg = validate({"register": {"model_name": "load-e2e", "log_lora_export": False}})
    reg = registration.register_run(cfg, project)
    uri = store.tracking_uri(project.root)
    expected = reference_generations(project, PROMPTS, 6)
    got = predict_in_fresh_process("models:/load-e2e@champion", PROMPTS, 6, uri, tmp_path)
    assert got == expected and all(isinstance(g, str) and g for g in got)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = load_model(f"models:/load-e2e/{reg.version}")
    sig = model.metadata.signature
    assert [p.name for p in sig.params] == ["max_new_tokens", "batch_size"]
    assert [c.name for c in sig.inputs.inputs] == ["instruction", "input", "messages", "prompt"]
    assert model.metadata.saved_input_example_info is not None
    assert model.predict(REQUESTS, params={"max_new_tokens": 6}) == expected
    assert model.predict(pd.DataFrame({"prompt": PROMPTS[:1]}), params={"max_new_tokens": 6}) == expected[:1]
    assert len(model.predict(REQUESTS[1:])) == 1  # default max_new_tokens from the signature


@pytest.mark.slow
def test_the_pyfunc_generates_at_the_precision_the_evaluate_stage_scored_at(project, tmp_path):
    """The served model computes as the evaluate stage did: at the precision its report records (fp32 by default);
    without a report, at `eval.precision` (`train`: the adapter's lineage). `model_config={"precision": ...}` at
    load time overrides it."""
    from mlflow.pyfunc import load_model

    def served(name, cfg):
        return load_model(str(packaging.save_pyfunc(tmp_path / name, cfg, project))).model_config["precision"]

    lineage = json.loads((project.adapter_dir / "lineage.json").read_text())
    (project.adapter_dir / "lineage.json").write_text(json.dumps({**lineage, "precision": "bf16"}))
    assert not project.report("eval").exists()
    assert served("default", validate({})) == "fp32"  # eval.precision's default, whatever training ran at
    project.report("eval").parent.mkdir(parents=True, exist_ok=True)
    project.report("eval").write_text(json.dumps({"precision": "bf16"}))
    assert served("reported", validate({})) == "bf16"  # what the evaluate stage scored at wins
    project.report("eval").unlink()
    model_dir = packaging.save_pyfunc(tmp_path / "model", validate({"eval": {"precision": "train"}}), project)
    model = load_model(str(model_dir))
    assert model.model_config["precision"] == "bf16"
    assert model.unwrap_python_model().precision == "bf16"
    assert model.predict(REQUESTS, params={"max_new_tokens": 6}) == reference_generations(project, PROMPTS, 6, "bf16")
    fp32 = load_model(str(model_dir), model_config={"precision": "fp32"})
    assert fp32.predict(REQUESTS, params={"max_new_tokens": 6}) == reference_generations(project, PROMPTS, 6)


def test_register_needs_the_trained_outputs(tmp_path):
    cfg = validate({})
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        registration.register_run(cfg, Paths(tmp_path))


@pytest.mark.slow
def test_a_hub_id_base_loads_from_the_local_hf_cache_at_its_revision_in_a_fresh_process(project, tmp_path):
    """A base named by Hub id + revision is referenced, not carried, and a fresh process resolves it offline from
    its HF cache (`HF_HOME/hub/models--org--name/snapshots/<sha>/`): no path of the registering machine."""
    import shutil

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    hf_home = tmp_path / "hf-home"
    repo = hf_home / "hub" / "models--someorg--tiny-base"
    expected = reference_generations(project, PROMPTS, 4)
    shutil.copytree(project.base_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    shutil.rmtree(project.base_dir)  # nothing to fall back on: the weights are only in the HF cache
    identity = {k: v for k, v in json.loads(project.base_json.read_text()).items() if k != "load_path"}
    identity.update(name_or_path="someorg/tiny-base", revision=sha, embedded=False,  # as the base stage records
                    content_hash=content_hash(weight_files(repo / "snapshots" / sha)))
    project.base_json.write_text(json.dumps(identity))
    cfg = validate({"model": {"name_or_path": "someorg/tiny-base", "revision": sha},
                    "register": {"model_name": "hub-e2e", "log_lora_export": False}})
    reg = registration.register_run(cfg, project)
    c = store.client(project.root)
    model_dir = Path(c.download_artifacts(reg.run_id, "model", str(tmp_path / "dl")))
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "someorg/tiny-base" in mlmodel and sha in mlmodel and "base_load_path" not in mlmodel
    assert not (model_dir / "artifacts" / "base").exists()
    got = predict_in_fresh_process(f"models:/hub-e2e/{reg.version}", PROMPTS, 4, store.tracking_uri(project.root),
                                   tmp_path, hf_home=hf_home)
    assert got == expected


@pytest.mark.slow
def test_external_base_is_referenced_not_carried(project, tmp_path):
    import shutil

    from mlflow.pyfunc import load_model

    external = tmp_path / "hub-snapshot"  # stands for an external base: a local dir or a Hub snapshot
    expected = reference_generations(project, PROMPTS, 4)
    shutil.move(project.base_dir, external)
    identity = json.loads(project.base_json.read_text())
    identity.update(name_or_path=str(external), load_path=str(external), embedded=False, revision="abc123",
                    content_hash=content_hash(weight_files(external)))  # as the base stage records it
    project.base_json.write_text(json.dumps(identity))

    model_dir = packaging.save_pyfunc(tmp_path / "model", validate({}), project)
    assert not (model_dir / "artifacts" / "base").exists() and (model_dir / "artifacts" / "adapter").is_dir()
    model = load_model(str(model_dir))
    cfg = model.model_config
    assert cfg["base_name_or_path"] == str(external) and cfg["base_revision"] == "abc123"
    assert model.predict(REQUESTS, params={"max_new_tokens": 4}) == expected
