"""Reliability promises that need no server (fast): internal errors are never user errors, YAML 1.2 numbers
are read the way DVC reads them everywhere, bad values fail in one line without running anything, outputs get
umask-default modes, run facts stay out of byte-reproducible outputs, and the champion gate's lock."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import milora.stages
from milora.cli import main
from milora.core.io import atomic_dir, atomic_write_text, write_json
from milora.pipeline.config import ConfigError, load_config, parse_override_value, parse_sets, validate
from milora.pipeline.paths import Paths
from milora.pipeline.results import read_result, split_keys, write_metrics
from milora.stages import STAGES

# ----------------------------------------------------------------------------- internal vs user errors


def _broken(name):
    def run(cfg, paths):
        # what a library raises from inside a stage (e.g. matplotlib on a bad plot): a bug, not the user's
        raise ValueError(f"x and y must have same first dimension (a library's error inside stage {name})")
    return run


@pytest.mark.parametrize("stage", STAGES)
def test_a_non_user_exception_in_any_stage_is_an_internal_error_not_exit_2(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(milora.stages, "stage_function", _broken)  # the fault, injected by this test
    params = tmp_path / "params.yaml"
    params.write_text("")
    assert main(["stage", stage, "--root", str(tmp_path), "--params", str(params)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: x and y must have same first dimension" in err
    assert err.strip().splitlines()[-1].startswith("milora stage: internal error (this is a bug, not a problem "
                                                   "with your params or data")
    result = read_result(tmp_path, stage)
    assert (result.status, result.error_kind, result.exit_code) == ("failed", "internal", 3)
    assert result.message.startswith("ValueError: x and y must have same first dimension")


def test_a_non_user_exception_in_register_is_an_internal_error(tmp_path, monkeypatch, capsys):
    import milora.tracking.registration as registration

    def broken(cfg, paths):
        raise KeyError("run_id")  # a bug in the registry code

    monkeypatch.setattr(registration, "register_run", broken)
    (tmp_path / "params.yaml").write_text("")
    assert main(["register", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")]) == 3
    assert "internal error (this is a bug" in capsys.readouterr().err
    result = read_result(tmp_path, "register")
    assert (result.error_kind, result.exit_code) == ("internal", 3)


def test_a_user_error_in_a_stage_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from milora.core.errors import InvalidInput

    def run(cfg, paths):
        raise InvalidInput("data.source 'x.jsonl', line 7, field 'output': missing")

    monkeypatch.setattr(milora.stages, "stage_function", lambda name: run)
    (tmp_path / "params.yaml").write_text("")
    assert main(["stage", "prepare", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[0] == "milora stage: error: data.source 'x.jsonl', line 7, field 'output': missing"


# ----------------------------------------------------------------------------- YAML 1.2 numbers, one parser


def dvc_reads(text: str):
    """What DVC reads for `k: <text>` in params.yaml (its own parser: dvc.lock and `dvc exp` agree with it)."""
    from dvc.utils.serialize import parse_yaml

    return parse_yaml(f"k: {text}\n", "params.yaml")["k"]


@pytest.mark.parametrize(("text", "value"), [
    ("3e-4", 3e-4), ("3E-4", 3e-4), ("1e-3", 1e-3), (".5", 0.5), ("+.5", 0.5), ("3.0e-4", 3e-4), ("1e0", 1.0),
    ("1_000", 1000), ("0.003", 0.003), ("012", 12), ("0x10", 16),
])
def test_yaml_1_2_numbers_everywhere(text, value, tmp_path):
    assert dvc_reads(text) == value and type(dvc_reads(text)) is type(value)
    assert parse_override_value(text) == value and type(parse_override_value(text)) is type(value)
    if isinstance(value, float) and 0 < value <= 1:
        (tmp_path / "params.yaml").write_text(f"train:\n  learning_rate: {text}   # the paper's spelling\n")
        assert load_config(tmp_path / "params.yaml").train.learning_rate == value  # params.yaml
        assert load_config(tmp_path / "params.yaml", parse_sets([f"train.learning_rate={text}"])).train.learning_rate == value
        from flows.params import parse_overrides  # the flow's `overrides` parameter, a string from a form

        assert parse_overrides({"train.learning_rate": text}) == {"train.learning_rate": value}


def test_yaml_1_2_words_are_strings_as_dvc_reads_them():
    for text in ("yes", "no", "on", "off", "1:30"):
        assert parse_override_value(text) == dvc_reads(text) == text
    assert parse_override_value("[q_proj, v_proj]") == ["q_proj", "v_proj"]
    assert parse_override_value("'012'") == "012" and parse_override_value("null") is None
    assert parse_override_value("[1,") == "[1,"  # not YAML: kept as typed (the typed config then rejects it)


def _spellings(x: float) -> list[str]:
    out = [repr(x), f"{x:e}", f"{x:E}", f"{x:.17g}", f"{x:.17e}".replace("e-0", "e-")]
    if x < 1:
        out.append(repr(x).replace("0.", ".", 1) if repr(x).startswith("0.") else repr(x))
    return out


@settings(max_examples=200, deadline=None)
@given(x=st.floats(min_value=1e-9, max_value=1.0, allow_nan=False, allow_infinity=False))
def test_property_every_spelling_of_a_learning_rate_reads_as_dvc_reads_it(x):
    for text in _spellings(x):
        want = float(text)
        assert dvc_reads(text) == want, text
        assert parse_override_value(text) == want, text
        assert validate({"train": {"learning_rate": parse_override_value(text)}}).train.learning_rate == want


@settings(max_examples=100, deadline=None)
@given(n=st.integers(min_value=1, max_value=10**9), sep=st.booleans())
def test_property_integers_with_digit_separators(n, sep):
    text = f"{n:_}" if sep else str(n)
    assert dvc_reads(text) == parse_override_value(text) == n
    assert validate({"train": {"max_steps": parse_override_value(text)}}).train.max_steps == n


def _valid_learning_rate(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v and 0 < v <= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=20), st.sampled_from(["3e-4x", "0", "-1e-3", "2", ".inf", ".nan", "yes",
                                                               "[1, 2]", "{a: 1}", "1e", "e-4", "3e--4", "", "~"])))
def test_property_bad_values_fail_in_one_line_with_exit_2_and_nothing_run(text, monkeypatch):
    if _valid_learning_rate(parse_override_value(text)):
        return
    monkeypatch.setattr(milora.stages, "stage_function", lambda name: pytest.fail(f"stage {name} ran"))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text("")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["stage", "train", "--root", tmp, "--params", f"{tmp}/params.yaml",
                         "-S", f"train.learning_rate={text}"])
        assert code == 2
        lines = err.getvalue().splitlines()
        assert lines[0].startswith("milora stage: error: ") and "train.learning_rate = " in lines[0]
        assert lines[1:] == ["(run with --debug for the full traceback)"]
        assert sorted(p.name for p in Path(tmp).iterdir()) == [".milora", "params.yaml"]  # nothing else ran
        assert read_result(tmp, "train").error_kind == "user"


def test_overrides_from_the_flow_parameter_are_read_like_dash_s(tmp_path):
    from flows.params import parse_overrides, run_params

    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 0.003\n")
    parsed = parse_overrides({"train.learning_rate": "3e-4", "train.max_steps": 5, "adapter.target_modules": "[q_proj]"})
    assert parsed == {"train.learning_rate": 3e-4, "train.max_steps": 5, "adapter.target_modules": ["q_proj"]}
    with run_params(tmp_path, None, parsed) as cfg:
        assert cfg.train.learning_rate == 3e-4
        assert dvc_reads((tmp_path / "params.yaml").read_text().split("learning_rate:")[1].split("\n")[0]) == 3e-4
    with pytest.raises(ConfigError, match="must be a dotted params key"):
        parse_overrides({"train..x": "1"})


def test_svd_cache_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"svd\.cache = 's3://': names no bucket"):
        validate({"svd": {"cache": "s3://"}})
    with pytest.raises(ConfigError, match=r"svd\.cache = 's3:///prefix': names no bucket"):
        validate({"svd": {"cache": "s3:///prefix"}})
    with pytest.raises(ConfigError, match=r"svd\.cache = 'gs://b/p': unsupported scheme"):
        validate({"svd": {"cache": "gs://b/p"}})
    assert validate({"svd": {"cache": "s3://bucket"}}).svd.cache == "s3://bucket"
    assert validate({"svd": {"cache": None}}).svd.cache is None


def test_flow_retry_policy_is_a_validated_params_section():
    cfg = validate({"flow": {"retries": 4, "retry_delays": [1, 2.5]}})
    assert cfg.flow.delays() == [1.0, 2.5, 2.5, 2.5]
    assert validate({}).flow.delays() == [10.0, 30.0, 90.0]
    assert validate({"flow": {"retries": 0}}).flow.delays() == []
    with pytest.raises(ConfigError, match=r"flow\.retry_delays"):
        validate({"flow": {"retry_delays": [-1]}})
    with pytest.raises(ConfigError, match=r"flow\.retries"):
        validate({"flow": {"retries": -1}})


# ----------------------------------------------------------------------------- file modes, run facts


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_modes_of_a_plain_open(tmp_path, mask):
    old = os.umask(mask)
    try:
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
        write_json(tmp_path / "metrics" / "train.json", {"a": 1})
        atomic_write_text(tmp_path / "reports" / "eval.json", "{}")
        with atomic_dir(tmp_path / "models" / "adapter") as d:
            (d / "sub").mkdir()
            (d / "sub" / "w.safetensors").write_bytes(b"x")
            os.chmod(d / "sub" / "w.safetensors", 0o600)  # what safetensors leaves
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    assert _mode(plain) == want_file
    assert _mode(tmp_path / "metrics" / "train.json") == _mode(tmp_path / "reports" / "eval.json") == want_file
    assert _mode(tmp_path / "models" / "adapter") == _mode(tmp_path / "models" / "adapter" / "sub") == want_dir
    assert _mode(tmp_path / "models" / "adapter" / "sub" / "w.safetensors") == want_file


def test_run_facts_go_to_timings_not_to_the_reproducible_report(tmp_path):
    paths = Paths(tmp_path)
    details = {"init_seconds": 1.5, "cache_hits": 3, "rank": 4, "spectrum": {"minor_energy": 0.1},
               "per_matrix": {"a.q_proj": {"seconds": 0.2, "hit": True, "solver": "gram"}}}
    write_metrics(paths, "svd", details, ["spectrum.minor_energy", "init_seconds"],
                  ["init_seconds", "cache_hits", "per_matrix.*.seconds", "per_matrix.*.hit"])
    report = json.loads(paths.report("svd").read_text())
    assert report == {"rank": 4, "spectrum": {"minor_energy": 0.1}, "per_matrix": {"a.q_proj": {"solver": "gram"}}}
    assert json.loads(paths.metrics("svd").read_text()) == {"spectrum": {"minor_energy": 0.1}}  # no timing there
    assert json.loads(paths.timings("svd").read_text()) == {
        "init_seconds": 1.5, "cache_hits": 3, "per_matrix": {"a.q_proj": {"seconds": 0.2, "hit": True}}}
    assert split_keys({"math_generation_seconds": 1, "eval_seconds": 2, "x": 3}, ["*_seconds"]) == (
        {"x": 3}, {"math_generation_seconds": 1, "eval_seconds": 2})


def test_every_timings_file_a_stage_writes_is_a_top_level_dvc_metric():
    import yaml

    from tests.imports import ROOT

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert sorted(dvc["metrics"]) == ["timings/base.json", "timings/eval.json", "timings/svd.json",
                                      "timings/train.json"]
    outs = json.dumps(dvc["stages"])
    assert "timings/" not in outs  # never a stage output: a rerun must leave `dvc status` clean


# ----------------------------------------------------------------------------- the champion gate's lock


@pytest.fixture
def store(tmp_path, monkeypatch):
    from milora.tracking.store import client
    from tests.mlflow_fixtures import seed_embedded_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seed_embedded_store(tmp_path)
    return client(tmp_path)


def test_gate_lock_serialises_and_a_dead_holders_lease_is_taken_over(store):
    from milora.tracking.gate_lock import GateBusy, gate_lock

    order: list[str] = []
    with gate_lock(store, "m"):
        holder = store.get_registered_model("m--champion-gate-lock").tags["milora.lock.holder"]
        with pytest.raises(GateBusy, match=f"held by {holder}"), gate_lock(store, "m", wait_s=0.5):
            pass

        def second():
            with gate_lock(store, "m", wait_s=30):
                order.append("second")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.0)
        order.append("first")
    t.join(30)
    assert order == ["first", "second"]
    assert "m--champion-gate-lock" not in {m.name for m in store.search_registered_models()}  # released
    # a holder killed while deciding leaves the lock; once its lease ran out the next one takes over
    store.create_registered_model("m--champion-gate-lock", tags={"milora.lock.holder": "dead:1:x",
                                                                 "milora.lock.expires_at": f"{time.time() - 1:.3f}"})
    with gate_lock(store, "m", wait_s=5):
        assert store.get_registered_model("m--champion-gate-lock").tags["milora.lock.holder"] != "dead:1:x"
