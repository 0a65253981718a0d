"""The real model end to end: SmolLM2-135M-Instruct from the packaged GGUF through the real profile
(params.smol.yaml) with a few training steps, run by real DVC: the conversion's identity and byte-identical
rerun, the served champion (`mlflow models serve`, chat `messages`, 8 concurrent clients) answering as the
evaluate stage predicted, the reconversion on a machine without the pipeline's copy of the base, and
`milora eval` against the `lm_eval` CLI on the merged model."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from milora.core.io import read_json, read_jsonl, sha256_file
from milora.model import gguf
from milora.model.scoring import gold_option
from milora.pipeline.paths import Paths
from tests.project import env, make_project, run
from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "milora-smollm2"
CLEAN = {k: "" for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT__FLOW_RUN_ID")}

# The real profile's paths at a few steps and examples (its numbers come from `make run-real`).
SMALL = {
    "data.self_text.documents": 4,
    "data.self_text.max_new_tokens": 16,
    "data.rehearsal.rows": 8,
    "data.rehearsal.max_new_tokens": 96,
    "data.max_length": 96,
    "adapter.rank": 4,
    "adapter.target_modules": ["q_proj", "v_proj", "down_proj"],
    "train.max_steps": 4,
    "train.batch_size": 4,
    "train.save_steps": 4,
    "train.logging_steps": 2,
    "train.warmup_steps": 1,
    "eval.max_new_tokens": 12,
    "eval.max_examples": 4,
    "eval.batch_size": 4,
    "eval.suites": [
        {"name": "learning", "source": "embedded", "format": "qa", "max_examples": 4},
        {"name": "general_knowledge", "source": "data/probes/general_knowledge.jsonl", "format": "qa",
         "max_examples": 4},
    ],
    "register.log_merged": True,
}

def _bytes(root: Path) -> dict[str, bytes]:
    return {f.relative_to(root).as_posix(): f.read_bytes()
            for f in sorted([*(root / "models" / "base").iterdir(), root / "models" / "base.json",
                             root / "models" / "self_text.jsonl", root / "models" / "rehearsal.jsonl"])}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Paths:
    root = make_project(tmp_path_factory.mktemp("real"), SMALL, profile="params.smol.yaml")
    run(["dvc", "repro", "evaluate"], root, timeout=1800)
    return Paths(root)


def test_gguf_base_identity_and_byte_identical_rerun(project):
    root = project.root
    info = read_json(project.base_json)
    src = gguf.resolve_gguf("smollm2-135m-instruct")
    assert (info["gguf_file"], info["gguf_sha256"]) == (src.name, sha256_file(src))
    assert info["converter"] == gguf.converter() and info["load_path"] == "models/base"
    assert info["n_params"] == 134_515_008 and info["architecture"] == "LlamaForCausalLM"
    assert "quantization_config" not in read_json(project.base_dir / "config.json")
    assert (project.base_dir / "chat_template.jinja").is_file()
    sampled = read_jsonl(project.self_text)
    assert len(sampled) == 4 and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in sampled)
    rehearsal = read_jsonl(project.rehearsal)  # the base's own greedy replies that ended: training rows only
    assert rehearsal and all(r["messages"][1]["content"] for r in rehearsal)
    data = read_json(project.report("data"))
    assert data["rows"]["rehearsal"] == len(rehearsal)
    train = read_jsonl(project.prepared_dir / "train.jsonl")
    replies = {r["messages"][1]["content"] for r in rehearsal}
    assert sum(r["response"] in replies for r in train) == len(rehearsal)
    distilled = [r for r in train if r["task"] == "rehearsal"]  # what train.rehearsal_kl distils the base on
    assert len(distilled) == len(rehearsal) and all(r["response"] in replies for r in distilled)
    assert not [r for r in read_jsonl(project.prepared_dir / "eval.jsonl") if r["response"] in replies]
    before = _bytes(root)
    run(["dvc", "repro", "-f", "base"], root, timeout=900)
    assert _bytes(root) == before  # same file, same converter: the same bytes, downstream stays up to date
    status = run(["dvc", "status"], root).stdout
    assert "up to date" in status, status


def test_evaluate_reports_learning_retention_and_forgetting(project):
    report = read_json(project.report("eval"))
    learning, probe = report["suites"]["learning"], report["suites"]["general_knowledge"]
    assert learning["n"] == 4 and probe["n"] == 4
    for s in (learning, probe):
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["base_accuracy"] <= 1
    assert report["retention"] == probe["retained"]
    assert report["forgetting_source"] == "self_text"
    assert report["forgetting"] == pytest.approx(report["self_text_nll_tuned"] - report["self_text_nll_base"])


def _post(url: str, records: list[dict]) -> list[str]:
    req = urllib.request.Request(url + "/invocations", data=json.dumps({"dataframe_records": records}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["predictions"]


@pytest.fixture(scope="module")
def registered(project) -> dict:
    """`milora register` on the module's run: the champion the serving and loading tests use."""
    root = project.root
    reg = run([str(BIN / "milora"), "register", "--root", str(root), "--params", str(root / "params.yaml")], root,
              extra_env=CLEAN, timeout=900)
    return json.loads(reg.stdout.strip().splitlines()[-1])


def test_served_champion_answers_chat_messages_as_evaluate_predicted(project, registered, tmp_path):
    root = project.root
    assert registered["model_name"] == MODEL and registered["decision"]["promote"]
    preds = read_jsonl(project.suite_predictions_dir / "learning.jsonl")
    questions = [json.loads(x)["question"] for x in (project.suites_dir / "learning" / "test.jsonl").read_text()
                 .splitlines()][: len(preds)]
    requests = [{"messages": [{"role": "user", "content": q}]} for q in questions]

    port = free_port()
    server = ServerProcess([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], port, "/ping",
                           env={**env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"},
                           log_path=tmp_path / "serve.log", timeout=300).start()
    try:
        assert _post(server.url, requests) == [p["prediction"] for p in preds]  # the chat template, same batch
        one = _post(server.url, requests[:1])
        with ThreadPoolExecutor(8) as pool:  # 8 concurrent clients: no error, each gets its own answer
            answers = list(pool.map(lambda r: _post(server.url, [r]), requests[:1] * 4 + requests[1:2] * 4))
        assert answers[:4] == [one] * 4 and answers[4:] == [_post(server.url, requests[1:2])] * 4
    finally:
        server.stop()


def test_registered_model_reconverts_the_gguf_where_the_converted_base_is_missing(project, registered, tmp_path):
    """On a machine without the pipeline's models/base (moved away here), the pyfunc converts the same GGUF file
    again, checked by its sha256, and answers the same."""
    root = project.root
    preds = read_jsonl(project.suite_predictions_dir / "general_knowledge.jsonl")[:4]  # evaluate's first batch
    questions = [json.loads(x)["question"] for x in (root / "data" / "probes" / "general_knowledge.jsonl")
                 .read_text().splitlines()[:4]]
    records = [{"messages": [{"role": "user", "content": q}]} for q in questions]
    code = ("import json, sys, mlflow\n"
            f"m = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
            f"print(json.dumps(m.predict({records!r})))\n")
    moved = tmp_path / "moved-base"
    project.base_dir.rename(moved)
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env=env({**CLEAN, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"}))
    finally:
        moved.rename(project.base_dir)
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [r["prediction"] for r in preds]


def _lm_eval_task(folder: Path, suite_file: Path) -> Path:
    """A local multiple-choice lm-eval task over the learning suite's questions and options."""
    rows = [json.loads(x) for x in suite_file.read_text().splitlines()][:8]
    data = [{"question": r["question"], "choices": r["options"], "label": gold_option(r["options"], r["answer"])}
            for r in rows]  # options are whole replies: the gold one contains the answer
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smol_learning.json").write_text(json.dumps(data))
    (folder / "smol_learning.yaml").write_text(
        "task: smol_learning\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'smol_learning.json'}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return folder


def test_milora_eval_and_the_lm_eval_cli_on_the_merged_model_agree(project, registered, tmp_path):
    import mlflow

    root = project.root
    tasks = _lm_eval_task(tmp_path / "tasks", project.suites_dir / "learning" / "test.jsonl")
    out = tmp_path / "eval-out"
    run([str(BIN / "milora"), "eval", "--model", f"models:/{MODEL}@champion", "--root", str(root), "--out", str(out),
         "--lm-eval-tasks", "smol_learning", "--lm-eval-include", str(tasks)], root, extra_env=CLEAN, timeout=900)
    ours = read_json(out / "metrics.json")["lm_eval"]["smol_learning"]

    store = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"  # per call: a process-wide URI would leak into later tests
    version = mlflow.MlflowClient(store, store).get_model_version_by_alias(MODEL, "champion")
    merged = Path(mlflow.artifacts.download_artifacts(f"runs:/{version.run_id}/merged", dst_path=str(tmp_path),
                                                      tracking_uri=store))
    lm_out = tmp_path / "lm_eval_out"
    run([str(BIN / "lm_eval"), "run", "--model", "hf", "--model_args", f"pretrained={merged},dtype=float32",
         "--tasks", "smol_learning", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(lm_out)], tmp_path, timeout=900)
    theirs = json.loads(next(lm_out.rglob("results_*.json")).read_text())["results"]["smol_learning"]
    assert ours["acc"] == theirs["acc,none"]
