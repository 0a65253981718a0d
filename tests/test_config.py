"""Typed config: every validation error is one clear ConfigError naming key, value and what is allowed."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from milora.pipeline.config import Config, ConfigError, apply_overrides, check_cron, load_config, validate

ROOT = Path(__file__).resolve().parent.parent


def test_committed_params_are_valid_and_documented():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.model.name_or_path == "embedded" and cfg.data.source == "embedded"
    assert cfg.register.model_name == "milora"
    # every leaf key of the committed file is documented: a comment on its line, in the comment block
    # right above it, or on the (nested) section it belongs to
    sections: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing nested sections
    prev = ""
    for line in (ROOT / "params.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            prev = stripped
            continue
        indent = len(line) - len(line.lstrip())
        while sections and sections[-1][0] >= indent:
            sections.pop()
        doc = "#" in line or prev.startswith("#")
        is_section = stripped.split("#")[0].strip().endswith(":")
        if is_section:
            sections.append((indent, doc))
        elif indent > 0:
            assert doc or any(d for _, d in sections), f"undocumented key: {line!r}"
        prev = stripped


def test_contract_keys_exist():
    flat = Config().flat()
    for key in ["model.name_or_path", "data.source", "data.format", "data.on_bad_rows", "adapter.method",
                "adapter.rank", "adapter.alpha", "adapter.target_modules", "adapter.svd_solver",
                "adapter.quantization", "svd.cache", "train.learning_rate", "train.max_steps", "train.seed", "register.model_name"]:
        assert key in flat, key


@pytest.mark.parametrize(
    "params,pattern",
    [
        ({"adapter": {"rank": 0}}, r"adapter\.rank = 0: .*greater than 0"),
        ({"adapter": {"quantization": "nf3"}}, r"adapter\.quantization = 'nf3'"),
        ({"adapter": {"rank": -4}}, r"adapter\.rank = -4"),
        ({"train": {"learning_rate": 0}}, r"train\.learning_rate = 0: .*greater than 0"),
        ({"train": {"learning_rate": -1e-4}}, r"train\.learning_rate"),
        ({"adapter": {"dropout": 1.0}}, r"adapter\.dropout = 1\.0: .*less than 1"),
        ({"adapter": {"dropout": -0.1}}, r"adapter\.dropout = -0\.1"),
        ({"data": {"eval_fraction": 0}}, r"data\.eval_fraction = 0: .*greater than 0"),
        ({"data": {"eval_fraction": 1}}, r"data\.eval_fraction = 1: .*less than 1"),
        ({"adapter": {"method": "dora"}}, r"adapter\.method = 'dora' is not allowed; expected one of 'milora', 'pissa' or 'lora'"),
        ({"data": {"format": "sharegpt"}}, r"data\.format = 'sharegpt' is not allowed; expected one of"),
        ({"data": {"on_bad_rows": "ignore"}}, r"data\.on_bad_rows = 'ignore' is not allowed"),
        ({"adapter": {"svd_solver": "magic"}}, r"adapter\.svd_solver = 'magic' is not allowed"),
        ({"adapter": {"rank": "eight"}}, r"adapter\.rank = 'eight'"),
        ({"adapter": {"target_modules": []}}, r"adapter\.target_modules = \[\]: must name at least one module"),
        ({"schedule": {"timezone": "Mars/Base"}}, r"schedule\.timezone = 'Mars/Base': not an IANA timezone"),
        ({"data": {"embedded": {"profile": "real"}}}, r"data\.embedded\.profile = 'real' is not allowed; expected "
                                                       r"one of 'default', 'lab' or 'smol'"),
        ({"eval": {"score_base": True, "retention_suite": "probe", "suites": [{"name": "learning", "source": "embedded"},
                                                                             {"name": "general", "source": "g.jsonl"}]}},
         r"^params\.yaml: eval\.retention_suite = 'probe' is not a suite of eval\.suites; expected one of: learning, "
         r"general, or null$"),
        ({"eval": {"score_base": True, "retention_suite": "probe"}}, r"expected one of: \(no suites defined\), or null"),
        ({"eval": {"retention_suite": "g", "suites": [{"name": "g", "source": "g.jsonl"}]}},
         r"eval\.retention_suite = 'g' needs eval\.score_base: true"),
        ({"eval": {"score_base": "yes"}}, r"eval\.score_base = 'yes'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(params)


@pytest.mark.parametrize(
    "params,pattern",
    [
        ({"adaptr": {}}, r"unknown key 'adaptr'; did you mean 'adapter'\?"),
        ({"adapter": {"rnak": 4}}, r"unknown key 'adapter\.rnak'; did you mean 'adapter\.rank'\?"),
        ({"train": {"learning_rte": 1e-3}}, r"did you mean 'train\.learning_rate'\?"),
        ({"model": {"embedded": {"hiden_size": 64}}}, r"did you mean 'model\.embedded\.hidden_size'\?"),
        ({"zzz": 1}, r"unknown key 'zzz'\. Known keys here: model, data, adapter"),
    ],
)
def test_unknown_keys_suggest(params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(params)


def test_score_base_and_retention_suite():
    assert Config().eval.score_base is False and Config().eval.retention_suite is None
    cfg = validate({"eval": {"score_base": True, "retention_suite": "g", "suites": [{"name": "g", "source": "g.jsonl",
                                                                                    "format": "qa"}]},
                    "data": {"embedded": {"profile": "smol"}}})
    assert cfg.eval.retention_suite == "g" and cfg.data.embedded.profile == "smol" and cfg.eval.suites[0].format == "qa"


def test_several_errors_are_all_reported():
    with pytest.raises(ConfigError) as err:
        validate({"adapter": {"rank": 0, "dropout": 2}})
    assert "adapter.rank" in str(err.value) and "adapter.dropout" in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_overrides_are_validated(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"adapter": {"rank": 4}}))
    assert load_config(p, {"adapter.rank": 16, "adapter.method": "pissa"}).adapter.rank == 16
    with pytest.raises(ConfigError, match=r"adapter\.rank = 0"):
        load_config(p, {"adapter.rank": 0})
    with pytest.raises(ConfigError, match="did you mean 'adapter.rank'"):
        load_config(p, {"adapter.rnk": 3})
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"adapter": {"rank": 4}}, {"adapter.rank.x": 1})


def test_the_adapter_section_is_the_core_adapter_config():
    from milora.core.schema import AdapterConfig

    cfg = validate({"adapter": {"method": "lora", "rank": 4}})
    ac = cfg.adapter
    assert isinstance(ac, AdapterConfig)  # one schema: the params section is the library's config
    assert (ac.method, ac.rank, ac.alpha, ac.scale) == ("lora", 4, 8.0, 2.0)
    with pytest.raises(ConfigError, match=r"adapter\.method = 'dora' is not allowed"):
        validate({"adapter": {"method": "dora"}})


# --- property: random bad values never pass and never crash with anything but ConfigError

_numeric_keys = {
    ("adapter", "rank"): lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    ("adapter", "dropout"): lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1,
    ("train", "learning_rate"): lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1,
    ("train", "max_steps"): lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    ("data", "eval_fraction"): lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1,
}
_choice_keys = {
    ("adapter", "method"): {"milora", "pissa", "lora"},
    ("data", "format"): {"auto", "alpaca", "llm_adapters", "metamath", "gsm8k", "chat"},
    ("data", "on_bad_rows"): {"fail", "skip"},
}

values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(_numeric_keys) + sorted(_choice_keys)), value=values)
def test_property_bad_values_never_pass(key, value):
    section, name = key
    if key in _numeric_keys:
        good = _numeric_keys[key](value) and value == value  # NaN is never good
    else:
        good = isinstance(value, str) and value in _choice_keys[key]
    try:
        cfg = validate({section: {name: value}})
    except ConfigError as exc:
        assert f"{section}.{name}" in str(exc)
        return
    # it passed: it must be a genuinely allowed value (pydantic may coerce 4.0 -> 4, "4" is rejected in strict keys)
    got = getattr(getattr(cfg, section), name)
    assert good or (isinstance(value, float) and value.is_integer() and _numeric_keys.get(key, lambda v: False)(int(value))), (key, value, got)


@settings(max_examples=200, deadline=None)
@given(tree=st.recursive(values, lambda c: st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6))
def test_property_random_trees_only_raise_config_error(tree):
    with contextlib.suppress(ConfigError):
        validate(tree if isinstance(tree, dict) else {"model": tree})


@pytest.mark.parametrize("cron", ["0 3 * * *", "*/15 1-5 * jan-mar mon-fri", "@daily", "0 0 L * 5#2", "0,30 9-17/2 1 * 0"])
def test_valid_crons_pass(cron):
    assert check_cron(cron) == cron


@pytest.mark.parametrize("cron", ["0 3 * *", "0 25 * * *", "*/0 * * * *", "0 3 * smarch *", "0 3 * * 1-9", "61 * * * *",
                                  "H 3 * * *"])
def test_bad_crons_are_refused_as_prefect_refuses_them(cron):
    """check_cron asks Prefect's `Cron` itself (what `milora deploy` and the worker's source step schedule with):
    it refuses exactly what Prefect refuses, in one line that says how to write one."""
    from prefect.schedules import Cron

    with pytest.raises(ValueError):
        Cron(cron, timezone="UTC")
    with pytest.raises(ValueError, match=r"^Prefect's Cron schedule refuses it .*five fields") as err:
        check_cron(cron)
    assert "\n" not in str(err.value)


def test_loading_params_does_not_import_prefect():
    """schedule.cron is checked where a schedule is made: every `milora stage` process loads the params, and
    importing Prefect would cost each about a second."""
    code = ("import sys; from milora.pipeline.config import load_config; load_config('params.yaml'); "
            "print('prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("params_file", ["params.yaml", "params.lab.yaml", "params.smol.yaml"])
def test_every_param_a_dvc_stage_names_is_in_the_params_file(params_file):
    """DVC refuses to run a stage whose `params:` key is missing from params.yaml (a pydantic default is not
    enough): every key dvc.yaml lists must be written out in each params file the pipeline runs with."""
    params = yaml.safe_load((ROOT / params_file).read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        for key in stage.get("params", []):
            for k in ([key] if isinstance(key, str) else list(key.values())[0] if isinstance(key, dict) else []):
                node = params
                for part in k.split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing.append(f"{name}: {k}")
                        break
                    node = node[part]
    assert not missing, missing
