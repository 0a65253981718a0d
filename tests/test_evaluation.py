"""Evaluation end to end on a tiny pipeline run: benchmark suites (generated, LLM-Adapters, MATH, alpaca)
through the evaluate stage, an lm-eval task from a local YAML over a local JSON file (equal to the `lm_eval`
CLI on the merged model), the gate on `suites_average` with an lm-eval guard, `milora eval` on the
registered model, and the pyfunc behind a real `mlflow models serve` answering as the evaluate stage did."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import milora
from milora.core.io import file_digest, read_json, read_jsonl
from milora.data import synthetic
from milora.data.suites import load_suite
from milora.model.precision import resolve_precision
from milora.pipeline.config import load_config
from milora.pipeline.paths import Paths
from milora.stages import run_stage
from tests.project import env, write_params
from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
DATA = Path(__file__).parent / "data"
SUITES = ["gsm", "cs", "boolq", "math"]  # the ones with gold answers; `alpaca` is loss only


def write_lm_eval_task(folder: Path) -> Path:
    """A multiple-choice lm-eval task, `world_facts`, defined by a local YAML over a local JSON file."""
    rng = random.Random(0)
    rows = []
    for fact in synthetic.facts()[:40]:
        choices = [fact.answer, *rng.sample(fact.pool, 2)]
        rng.shuffle(choices)
        rows.append({"question": fact.question, "choices": choices, "label": choices.index(fact.answer)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "world_facts.json").write_text(json.dumps(rows, indent=1))
    (folder / "world_facts.yaml").write_text(
        "task: world_facts\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'world_facts.json'}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Paths:
    """A test-sized pipeline run (ingest .. evaluate) with five suites in four formats and an lm-eval task."""
    root = tmp_path_factory.mktemp("evaluation")
    tasks = write_lm_eval_task(root / "lm_tasks")
    write_params(root, {
        "model.embedded.pretrain_steps": 200,  # enough for the tiny base to write varied text
        "train.max_steps": 30,
        "eval.max_new_tokens": 16,
        "eval.suites": [
            {"name": "gsm", "source": "embedded", "format": "gsm8k", "max_examples": 12},
            {"name": "cs", "source": "embedded", "format": "llm_adapters", "max_examples": 12},
            {"name": "boolq", "source": str(DATA / "llm_adapters" / "boolq"), "format": "llm_adapters"},
            {"name": "math", "source": str(DATA / "MATH"), "format": "math", "max_new_tokens": 24},
            {"name": "alpaca", "source": str(DATA / "alpaca.json")},
        ],
        "eval.lm_eval": {"tasks": ["world_facts"], "include_path": str(tasks), "batch_size": 4},
        "register.metric": "suites_average",
        "register.guards": [{"metric": "lm_eval_delta.world_facts.acc", "max_value": 1.0}],
        "register.log_lora_export": False,
    })
    for stage in ("ingest", "base", "prepare", "svd", "train", "evaluate"):
        run_stage(stage, root / "params.yaml", root)
    return Paths(root)


def test_suites_end_to_end_through_the_evaluate_stage(project):
    report = read_json(project.report("eval"))
    suites = report["suites"]
    assert set(suites) == {*SUITES, "alpaca"}
    assert [suites[s]["n"] for s in SUITES] == [12, 12, 2, 3]
    assert report["suites_average"] == pytest.approx(sum(suites[s]["accuracy"] for s in SUITES) / len(SUITES))
    assert suites["alpaca"]["n"] == 3 and suites["alpaca"]["perplexity"] > 1 and "accuracy" not in suites["alpaca"]
    dvc_metrics = read_json(project.metrics("eval"))
    assert dvc_metrics["suites_average"] == report["suites_average"]
    assert dvc_metrics["suites"]["gsm"] == {"accuracy": suites["gsm"]["accuracy"]}
    cfg = load_config(project.root / "params.yaml")
    for suite in cfg.eval.suites:
        where = project.suites_dir / suite.name
        assert suites[suite.name]["sha256"] == file_digest(where)  # lineage: what was scored
        preds = read_jsonl(project.suite_predictions_dir / f"{suite.name}.jsonl")
        if suite.name == "alpaca":
            assert {tuple(sorted(p)) for p in preds} == {("id", "loss", "prompt", "tokens")}
            continue
        records = load_suite(suite, where)
        assert [p["id"] for p in preds] == [r["id"] for r in records]
        assert {tuple(sorted(p)) for p in preds} == {("answer", "correct", "extracted", "id", "prediction", "prompt")}
        for p, r in zip(preds, records, strict=True):  # the predictions file is the one scoring rule's verdicts
            assert p["prompt"] == r["prompt"] and p["correct"] == milora.judge(r, p["prediction"])
        assert suites[suite.name]["accuracy"] == sum(p["correct"] for p in preds) / len(preds)
    gsm = read_jsonl(project.suite_predictions_dir / "gsm.jsonl")
    assert len({p["prediction"] for p in gsm}) > 1  # the model really writes text (the serving test compares it)
    generated = [json.loads(x)["question"] for x in (project.suites_dir / "gsm" / "test.jsonl").read_text().splitlines()]
    training = {r["question"] for r in read_jsonl(next((project.raw_dir).glob("math*.jsonl")))}
    assert not set(generated) & training  # a generated suite asks no training question

    lm, base, delta = report["lm_eval"]["world_facts"], report["lm_eval_base"]["world_facts"], report["lm_eval_delta"]["world_facts"]
    assert lm["sample_len"] == 40 and 0 <= lm["acc"] <= 1
    assert delta["acc"] == pytest.approx(lm["acc"] - base["acc"]) and "acc_stderr" not in delta
    assert dvc_metrics["lm_eval_delta"]["world_facts"]["acc"] == delta["acc"]


def test_lm_eval_task_equals_the_lm_eval_cli_on_the_merged_model(project, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(project.base_dir)
    milora.merge(milora.load_adapter(base, project.adapter_dir)).save_pretrained(merged)
    AutoTokenizer.from_pretrained(project.base_dir).save_pretrained(merged)
    cfg = load_config(project.root / "params.yaml").eval.lm_eval
    out = tmp_path / "lm_eval_out"
    cmd = [str(BIN / "lm_eval"), "run", "--model", "hf", "--model_args", f"pretrained={merged},dtype=float32",
           "--tasks", "world_facts", "--include_path", cfg.include_path, "--device", "cpu",
           "--batch_size", str(cfg.batch_size), "--output_path", str(out)]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["world_facts"]
    ours = read_json(project.report("eval"))["lm_eval"]["world_facts"]
    assert (ours["acc"], ours["acc_norm"]) == (results["acc,none"], results["acc_norm,none"])


def _post(url: str, body: dict) -> list[str]:
    req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["predictions"]


def test_registered_model_gate_milora_eval_and_served_answers(project, tmp_path):
    root = project.root
    clean = {k: "" for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT__FLOW_RUN_ID")}
    reg = subprocess.run([str(BIN / "milora"), "register", "--root", str(root), "--params", str(root / "params.yaml")],
                         env=env(clean), capture_output=True, text=True, timeout=600, cwd=root)
    assert reg.returncode == 0, reg.stderr[-4000:]
    decision = json.loads(reg.stdout.strip().splitlines()[-1])["decision"]
    report = read_json(project.report("eval"))
    assert decision["metric"] == "suites_average" and decision["promote"]  # the gate on a suite metric, guard passed
    assert decision["challenger_value"] == pytest.approx(report["suites_average"])

    out = tmp_path / "eval-out"
    cmd = [str(BIN / "milora"), "eval", "--model", "models:/milora@champion", "--root", str(root), "--out", str(out),
           "--suite", "gsm=data/suites/gsm:gsm8k", "--suite", f"boolq={DATA / 'llm_adapters' / 'boolq'}"]
    p = subprocess.run(cmd, env=env(clean), capture_output=True, text=True, timeout=600, cwd=root)
    assert p.returncode == 0, p.stderr[-4000:]
    metrics = read_json(out / "metrics.json")
    # train.precision auto trains under bf16 autocast on a CPU with native bf16; the evaluate stage, `milora eval`
    # and the served model all compute at eval.precision (fp32 by default)
    assert read_json(project.adapter_dir / "lineage.json")["precision"] == resolve_precision("auto")
    assert report["precision"] == metrics["settings"]["precision"] == "fp32"
    for name in ("gsm", "boolq"):  # the registered model, its own generation settings: the same predictions
        assert metrics["suites"][name]["accuracy"] == report["suites"][name]["accuracy"]
        assert (out / f"{name}.jsonl").read_bytes() == (project.suite_predictions_dir / f"{name}.jsonl").read_bytes()

    port = free_port()
    server = ServerProcess([str(BIN / "mlflow"), "models", "serve", "-m", "models:/milora@champion", "--env-manager",
                            "local", "-h", "127.0.0.1", "-p", str(port)], port, "/ping",
                           env={**env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"},
                           log_path=tmp_path / "serve.log", timeout=300).start()
    try:
        gsm = read_jsonl(project.suite_predictions_dir / "gsm.jsonl")
        questions = [json.loads(x)["question"] for x in (project.suites_dir / "gsm" / "test.jsonl").read_text().splitlines()]
        answers = _post(server.url, {"dataframe_records": [{"instruction": q} for q in questions]})
        assert answers == [p["prediction"] for p in gsm]  # the training template, the evaluate stage's generation
        boolq = read_jsonl(project.suite_predictions_dir / "boolq.jsonl")
        rows = json.loads((DATA / "llm_adapters" / "boolq" / "test.json").read_text())
        answers = _post(server.url, {"dataframe_records": [{"instruction": r["instruction"], "input": r["input"]}
                                                           for r in rows]})
        assert answers == [p["prediction"] for p in boolq]
        raw = _post(server.url, {"dataframe_records": [{"prompt": gsm[0]["prompt"]}], "params": {"max_new_tokens": 16}})
        assert raw == [gsm[0]["prediction"]]
        chat = _post(server.url, {"dataframe_records": [{"messages": [{"role": "user", "content": questions[0]}]}]})
        assert len(chat) == 1 and isinstance(chat[0], str)
    finally:
        server.stop()
