"""Benchmark suites without a model: every format's loader on rows in its published layout (tests/data:
LLM-Adapters' per-set test files, GSM8K, Hendrycks MATH, MetaMath, alpaca, chat), the one scoring rule
`milora.judge` on hand-written predictions (both verdicts, every answer vocabulary), MATH normalisation,
serving requests, the suite config, the generated suites, lm-eval result parsing and the gate on suite and
lm-eval metrics."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import milora
from milora.core.errors import InvalidInput, UserError
from milora.data import synthetic
from milora.data.formats import detect_format, format_prompt, read_records, request_prompt
from milora.data.suites import load_suite, parse_suite
from milora.evaluation import harness
from milora.evaluation.suites import SuiteResult, with_base
from milora.model import latex
from milora.model.prompts import render_chat
from milora.model.scoring import answer_kind, extract, gold_option, normalize_answer
from milora.pipeline.config import RegisterConfig, SuiteConfig, validate
from milora.tracking.gate import gate
from tests.pipeline_outputs import build_tokenizer

DATA = Path(__file__).parent / "data"
LLM_ADAPTERS = DATA / "llm_adapters"


def records(source, **kw) -> list[dict]:
    return milora.load_records(source, require_response=False, **kw).to_list()


# ----------------------------------------------------------------------------- loaders, published layouts

# set -> (gold answers, options per row, answer kind): LLM-Adapters' dataset/<set>/test.json
COMMONSENSE = {
    "boolq": (["true", "false"], 2, "bool"),
    "piqa": (["solution1", "solution2"], 2, "label"),
    "social_i_qa": (["answer3", "answer1"], 3, "label"),
    "hellaswag": (["ending4", "ending4"], 4, "label"),
    "winogrande": (["option1", "option2"], 2, "label"),
    "ARC-Easy": (["answer1", "answer2"], 4, "label"),
    "ARC-Challenge": (["answer1", "answer2"], 4, "label"),
    "openbookqa": (["answer4", "answer4"], 4, "label"),
}
MATH_SETS = {"AddSub": ["12", "0.1"], "MultiArith": ["39", "8"], "SingleEq": ["6", "32"], "gsm8k": ["18", "3"],
             "SVAMP": ["51", "1"]}


@pytest.mark.parametrize("name", sorted(COMMONSENSE))
def test_llm_adapters_commonsense_test_sets(name):
    answers, n, kind = COMMONSENSE[name]
    rows = records(LLM_ADAPTERS / name)
    assert [r["answer"] for r in rows] == answers
    assert all(r["task"] == "choice" and r["n_options"] == n and len(r["options"]) == n for r in rows)
    assert {answer_kind(r) for r in rows} == {kind}
    assert rows[0]["prompt"] == format_prompt(json.loads((LLM_ADAPTERS / name / "test.json").read_text())[0]["instruction"])


@pytest.mark.parametrize("name", sorted(MATH_SETS))
def test_llm_adapters_math_test_sets_with_list_answers(name):
    raw = json.loads((LLM_ADAPTERS / name / "test.json").read_text())
    assert isinstance(raw[0]["answer"], list)  # the published layout: "answer": ["12"]
    rows = records(LLM_ADAPTERS / name)
    assert [r["answer"] for r in rows] == MATH_SETS[name]
    assert {r["task"] for r in rows} == {"math"} and {answer_kind(r) for r in rows} == {"number"}


def test_aqua_letters_with_inline_answer_choices():
    rows = records(LLM_ADAPTERS / "AQuA")
    assert [r["answer"] for r in rows] == ["C", "E"] and {answer_kind(r) for r in rows} == {"letter"}
    assert rows[0]["options"] == ["450 gms", "100 gms", "252 gms", "240 gms", "None of these"]


def test_llm_adapters_rows_without_output_load_as_test_rows_only(tmp_path):
    f = tmp_path / "test.json"
    f.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "output": "", "answer": ["4"]}]))
    assert records(f)[0]["answer"] == "4"
    with pytest.raises(InvalidInput, match="field 'output': empty"):
        milora.load_records(f)  # training data needs a target


def test_gsm8k_published_layout():
    rows = records(DATA / "gsm8k.jsonl")
    assert [r["answer"] for r in rows] == ["72", "1234"] and rows[0]["response"].endswith("#### 72")


def test_math_published_layout_one_pretty_printed_object_per_file():
    assert (DATA / "MATH" / "test" / "algebra" / "1.json").read_text().startswith("{\n")
    loaded = read_records(DATA / "MATH")
    assert set(loaded.formats.values()) == {"math"}
    rows = loaded.rows
    assert [r["answer"] for r in rows] == ["\\frac{1}{2}", "5", "60^\\circ"]
    assert [answer_kind(r) for r in rows] == ["latex", "number", "latex"]
    assert rows[0]["prompt"] == format_prompt("If $x + 2 = 5$, what is $\\frac{x}{6}$?")


def test_math_answer_column_wins_and_a_solution_without_box_is_a_bad_row(tmp_path):
    f = tmp_path / "math500.jsonl"
    f.write_text(json.dumps({"problem": "p", "solution": "s \\boxed{2}", "answer": "\\frac{4}{2}"}) + "\n")
    assert records(f)[0]["answer"] == "\\frac{4}{2}"
    f.write_text(json.dumps({"problem": "p", "solution": "no box here"}) + "\n")
    with pytest.raises(InvalidInput, match="field 'solution': no final answer"):
        records(f)


def test_metamath_answers_number_or_latex():
    rows = records(DATA / "metamath.json")
    assert [r["answer"] for r in rows] == ["4", "20", "\\frac{1}{2}"]
    assert [answer_kind(r) for r in rows] == ["number", "number", "latex"]


def test_alpaca_and_chat_rows_have_no_gold_answer():
    for source in (DATA / "alpaca.json", DATA / "chat.jsonl"):
        rows = records(source)
        assert {answer_kind(r) for r in rows} == {"none"}
        with pytest.raises(InvalidInput, match="loss / perplexity only"):
            milora.judge(rows[0], "anything")


def test_load_suite_caps_in_file_order_and_parse_suite():
    suite = parse_suite(f"piqa={LLM_ADAPTERS / 'piqa'}:llm_adapters", max_examples=1)
    assert (suite.name, suite.format, suite.max_examples) == ("piqa", "llm_adapters", 1)
    assert [r["answer"] for r in load_suite(suite)] == ["solution1"]
    assert parse_suite("x=s3://bucket/prefix").source == "s3://bucket/prefix"
    assert parse_suite("x=openai/gsm8k:main").source == "openai/gsm8k:main"  # a Hub config, not a format
    assert parse_suite("x=openai/gsm8k:main:gsm8k").format == "gsm8k"
    for bad in ("no-equals", "=src", "bad name=src"):
        with pytest.raises(InvalidInput):
            parse_suite(bad)
    with pytest.raises(UserError, match="generated by the pipeline"):
        load_suite(SuiteConfig(name="e", source="embedded", format="gsm8k"))


# ----------------------------------------------------------------------------- judge

CHOICE = [
    # (gold answer, options, prediction, verdict)
    ("true", 2, "the correct answer is true", True),
    ("true", 2, "False, it is not.", False),
    ("true", 2, "True", True),
    ("solution2", 2, "the correct answer is solution2", True),
    ("solution2", 2, "solution1 is better", False),
    ("answer3", 5, "the correct answer is answer3", True),
    ("answer3", 5, "Answer5", False),
    ("ending4", 4, "the correct answer is ending4", True),
    ("ending4", 4, "ending1", False),
    ("option2", 2, "the correct answer is option2", True),
    ("option2", 2, "I am not sure", False),
    # the LLM-Adapters rule: the first mention of a label of the set's vocabulary decides
    ("option2", 2, "option1 seems plausible, but option2", False),
    ("option2", 2, "answer1 solution1 ... option2", True),  # other sets' words
    ("option1", 2, "option10", False),  # a label out of range is a pick
    ("C", 5, "60% of 30% of 1400 = 252 gms.The answer is (C).", True),
    ("C", 5, "A car travels. The answer is (C).", True),  # article "A"
    ("C", 5, "The answer is (D).", False),
    ("C", 5, "C", True),
]


@pytest.mark.parametrize(("answer", "n_options", "prediction", "verdict"), CHOICE)
def test_judge_multiple_choice_vocabularies(answer, n_options, prediction, verdict):
    assert milora.judge({"task": "choice", "answer": answer, "n_options": n_options}, prediction) is verdict


NUMBERS = [
    ("18", "16 - 3 - 4 = 9 eggs. 9 * 2 = 18 dollars. The answer is 18.", True),
    ("18", "The answer is 18 dollars, not 20.", True),
    ("18", "#### 18", True),
    ("18", "She makes $18.00 every day.", True),
    ("18", "The answer is 19.", False),
    ("1234", "The answer is 1,234.", True),
    ("1234", "The answer is 1234.5", False),
    ("0.75", "She ate 3/4 of the pie.", True),
    ("0.1", "0.7 - 0.6 = 0.1 mile. The answer is 0.1 mile.", True),
    ("0", "The answer is -0", True),
    ("-7", "The temperature fell to -7 degrees.", True),
    ("-7", "The temperature fell to 7 degrees.", False),
    ("5", "so the answer is \\boxed{5}. Check: 5 + 2 = 7", True),  # a boxed answer wins over the last number
    ("0.5", "\\boxed{\\frac12}", True),
    ("12", "I don't know.", False),
]


@pytest.mark.parametrize(("gold", "prediction", "verdict"), NUMBERS)
def test_judge_numbers(gold, prediction, verdict):
    assert milora.judge({"task": "math", "answer": gold}, prediction) is verdict


MATH_CASES = [
    ("\\frac{1}{2}", "so $x = \\boxed{\\frac12}$", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("\\frac{1}{2}", "\\boxed{\\tfrac{1}{2}}", True),
    ("\\frac{1}{2}", "\\boxed{1/2}", True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\frac{1}{2}", "The answer is: \\frac{1}{2}", True),  # MetaMath style
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False),
    ("(3,-1)", "\\boxed{\\left( 3, -1 \\right)}", True),
    ("(3,-1)", "\\boxed{(3, 1)}", False),
    ("60^\\circ", "\\boxed{60}", True),
    ("60", "each angle is $\\boxed{60^\\circ}$", True),
    ("10", "\\boxed{10\\text{ inches}}", True),
    ("10", "\\boxed{12\\text{ inches}}", False),
    ("5", "\\boxed{5.0}", True),
    ("7.50", "\\boxed{\\$7.5}", True),
    ("2\\sqrt{3}", "\\boxed{2\\sqrt3}", True),
    ("2\\sqrt{3}", "\\boxed{3\\sqrt2}", False),
    ("x^2+1", "\\boxed{x^2 + 1}", True),
    ("\\text{Monday}", "\\boxed{\\text{Monday}}", True),
    ("\\text{Monday}", "\\boxed{\\text{Tuesday}}", False),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\dfrac{\\sqrt{3}}{2}}", True),
    ("\\frac{1}{2}", "no final answer here", False),
]


@pytest.mark.parametrize(("gold", "prediction", "verdict"), MATH_CASES)
def test_judge_math_normalisation(gold, prediction, verdict):
    assert milora.judge({"task": "math", "answer": gold}, prediction) is verdict


def test_judge_on_rows_of_every_published_format():
    def first(source):
        return records(source)[0]

    cases = [
        (first(LLM_ADAPTERS / "boolq"), "the correct answer is true", "the correct answer is false"),
        (first(LLM_ADAPTERS / "hellaswag"), "the correct answer is ending4", "ending2"),
        (first(LLM_ADAPTERS / "AQuA"), "The answer is (C).", "The answer is (A)."),
        (first(LLM_ADAPTERS / "SVAMP"), "76 - 25 = 51. The answer is 51.", "The answer is 50."),
        (first(DATA / "gsm8k.jsonl"), "48 + 24 = 72 clips.\n#### 72", "#### 71"),
        (first(DATA / "MATH"), "$\\boxed{\\dfrac12}$", "$\\boxed{\\dfrac13}$"),
        (first(DATA / "metamath.json"), "So x = 4.\nThe answer is: 4", "The answer is: 5"),
    ]
    for record, right, wrong in cases:
        assert milora.judge(record, right) and not milora.judge(record, wrong), record["source"]


def test_extract_gives_what_the_predictions_file_records():
    assert extract({"task": "choice", "answer": "option2", "n_options": 2}, "Option2!") == "option2"
    assert extract({"task": "math", "answer": "72"}, "#### 72") == 72.0
    assert extract({"task": "math", "answer": "\\frac{1}{2}"}, "\\boxed{\\dfrac12}") == "\\frac{1}{2}"
    assert extract({"task": "math", "answer": "72"}, "no number") is None


@pytest.mark.parametrize(("raw", "norm"), [
    ("\\dfrac12", "\\frac{1}{2}"), ("\\left( 1, 2 \\right)", "(1,2)"), ("1,000", "1000"), ("3.50", "3.5"),
    ("5.0", "5"), ("x = 5", "5"), ("90^\\circ", "90"), ("\\$5", "5"), ("50\\%", "50"), ("\\sqrt2", "\\sqrt{2}"),
    ("4\\text{ cm}", "4"), ("\\frac1{72}", "\\frac{1}{72}"), (".5", "0.5"), ("-0", "0"),
])
def test_latex_normalize(raw, norm):
    assert latex.normalize(raw) == norm


def test_last_boxed_handles_nested_braces():
    assert latex.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"
    assert latex.last_boxed("\\boxed 5$") == "5" and latex.last_boxed("none") is None


def test_import_milora_exports_judge_and_load_records_without_torch():
    code = ("import sys, milora; assert 'torch' not in sys.modules; "
            "assert milora.judge({'task': 'math', 'answer': '2'}, '#### 2'); assert 'torch' not in sys.modules; "
            "assert callable(milora.load_records); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- serving requests


def test_requests_get_the_training_prompt():
    tok = None  # no chat template: the `### Role:` tags chat training uses
    assert request_prompt({"instruction": "  Add 2 and 3. ", "input": ""}, tok) == format_prompt("Add 2 and 3.")
    assert request_prompt({"instruction": "Translate.", "input": "Le chat."}, tok) == format_prompt("Translate.", "Le chat.")
    assert request_prompt({"question": "Q?"}, tok) == format_prompt("Q?")  # GSM8K rows answer as trained
    assert request_prompt({"prompt": "raw text"}, tok) == "raw text"
    msgs = [{"role": "user", "content": "hi"}]
    assert request_prompt({"messages": msgs}, tok) == render_chat(msgs, tok)
    with pytest.raises(InvalidInput, match="instruction"):
        request_prompt({"foo": 1}, tok)
    with pytest.raises(InvalidInput, match="no user message"):
        request_prompt({"messages": [{"role": "system", "content": "be brief"}]}, tok)


def _pyfunc_module():
    spec = importlib.util.spec_from_file_location("milora_pyfunc_under_test",
                                                  Path(__file__).parents[1] / "mlflow" / "milora_pyfunc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pyfunc_reads_records_dataframes_and_bare_prompts():
    requests_of = _pyfunc_module().requests_of
    df = pd.DataFrame([{"instruction": "a", "prompt": None}, {"instruction": np.nan, "prompt": "b"}])
    assert requests_of(df) == [{"instruction": "a"}, {"prompt": "b"}]
    msgs = pd.DataFrame({"messages": [np.array([{"role": "user", "content": "hi"}], dtype=object)]})
    assert requests_of(msgs) == [{"messages": [{"role": "user", "content": "hi"}]}]
    assert requests_of(["x", "y"]) == [{"prompt": "x"}, {"prompt": "y"}]
    assert requests_of({"prompt": ["x", "y"]}) == [{"prompt": "x"}, {"prompt": "y"}]
    with pytest.raises(ValueError, match="no requests"):
        requests_of(pd.DataFrame())  # what MLflow's schema leaves of unnamed strings


# ----------------------------------------------------------------------------- config and generated suites


def test_suite_config_is_validated():
    cfg = validate({"eval": {"suites": [{"name": "gsm", "source": "x", "format": "gsm8k"}],
                             "lm_eval": {"tasks": ["t"], "limit": 0.5}}})
    assert cfg.eval.suites[0].split == "test" and cfg.eval.lm_eval.limit == 0.5
    for bad, why in [([{"name": "a", "source": "x"}, {"name": "a", "source": "y"}], "repeated: a"),
                     ([{"name": "a.b", "source": "x"}], "eval.suites.0.name"),
                     ([{"name": "a", "source": "x", "format": "csv"}], "eval.suites.0.format")]:
        with pytest.raises(UserError, match=why):
            validate({"eval": {"suites": bad}})


def test_generated_suites_are_deterministic_in_published_layouts_and_ask_no_training_question(tmp_path):
    exclude = synthetic.training_texts(200, 200, seed=0)
    gsm = synthetic.suite_rows("gsm8k", 30, 0, exclude)
    assert gsm == synthetic.suite_rows("gsm8k", 30, 0, exclude) and len(gsm) == 30
    assert not {r["question"] for r in gsm} & exclude and set(gsm[0]) == {"question", "answer"}
    choice = synthetic.suite_rows("llm_adapters", 30, 0, exclude)
    assert set(choice[0]) == {"instruction", "input", "output", "answer"}
    assert not {r["instruction"] for r in choice} & exclude
    synthetic.write_jsonl(tmp_path / "c.jsonl", choice)
    assert {r["task"] for r in records(tmp_path / "c.jsonl")} == {"choice"}
    with pytest.raises(InvalidInput, match="gsm8k, llm_adapters"):
        synthetic.suite_rows("math", 3)



# ----------------------------------------------------------------------------- qa: NQ-open / TriviaQA-open

QA = [
    (["8", "eight"], "It is 8.", True),
    (["8", "eight"], "Eight!", True),
    (["8"], "18", False),
    (["8"], "80 of them", False),
    (["8"], "8.5", False),
    (["8.5"], "about 8.5 meters", True),
    (["1000"], "There are 1,000 meters in a kilometer.", True),
    (["0"], "Water freezes at 0°C.", True),
    (["Paris"], "The Eiffel Tower is in Paris, France.", True),
    (["Paris"], "Parisian cafés", False),
    (["New York City", "New York"], "It stands in new-york.", True),  # punctuation separates words
    (["New York City", "New York"], "It is in York.", False),
    (["90"], "A right angle is a 90-degree angle.", True),
    (["100"], "Water boils at about 100.0 degrees Celsius.", True),
    (["Newton", "Isaac Newton"], "Newton's laws of motion", True),
    (["USA", "U.S."], "the U.S.A.", True),
    (["J.K. Rowling"], "JK Rowling wrote them.", True),
    (["The Beatles"], "beatles", True),  # articles and case are ignored
    (["Bogotá"], "The capital is BOGOTA.", True),  # accents folded
    (["Brasilia"], "Brasília", True),
    (["H2O"], "Its formula is H₂O.", True),  # NFKC-compatible subscripts are digits
    (["Kyiv", "Kiev"], "Kiev", True),
    (["Paris"], "", False),
]


@pytest.mark.parametrize(("aliases", "prediction", "verdict"), QA)
def test_judge_open_questions_by_alias_span(aliases, prediction, verdict):
    record = {"task": "qa", "answer": aliases[0], "aliases": aliases}
    assert milora.judge(record, prediction) is verdict
    if len(aliases) == 1:  # a record without `aliases` (a prepared row) is judged by its answer
        assert milora.judge({"task": "qa", "answer": aliases[0]}, prediction) is verdict


def test_normalize_answer_is_squad_normalisation():
    assert normalize_answer("  The  Quick, brown FOX! ") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("U.S.A.") == "usa" and normalize_answer("3.14.") == "3.14"
    assert normalize_answer("Paris.The end") == "paris end" and normalize_answer("1,000.50") == "1000.5"
    assert normalize_answer("the") == "" and normalize_answer("") == ""


def _qa_file(tmp_path, rows) -> Path:
    path = tmp_path / "nq.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_qa_rows_in_the_published_layout(tmp_path):
    src = _qa_file(tmp_path, [{"question": "where is the eiffel tower", "answer": ["Paris", "Paris, France"]},
                              {"question": "2 + 2?", "answer": "4"},
                              {"question": "Capital of Peru?", "answer": ["Lima"], "options": ["Quito", "Lima", "Cusco"]}])
    rows = records(src)  # auto-detected by the list answer
    assert [r["task"] for r in rows] == ["qa"] * 3 and [answer_kind(r) for r in rows] == ["qa"] * 3
    assert rows[0]["aliases"] == ["Paris", "Paris, France"] and rows[0]["answer"] == rows[0]["response"] == "Paris"
    assert rows[1]["aliases"] == ["4"] and rows[2]["options"] == ["Quito", "Lima", "Cusco"] and rows[2]["n_options"] == 3
    assert gold_option(rows[2]["options"], rows[2]["aliases"]) == 1
    # options may be whole replies: the gold one is the one reply that contains an alias
    assert gold_option(["It is Quito.", "It is Lima.", "It is Lima, Peru."], ["Lima"]) is None
    assert gold_option(["It is 18.", "It is 8.", "It is 80."], ["8", "eight"]) == 1
    assert milora.judge(rows[0], "It is in Paris.") and not milora.judge(rows[1], "14")
    # the prompt is the question as one user message: what the served model builds for that request
    assert rows[0]["prompt"] == request_prompt({"messages": [{"role": "user", "content": "where is the eiffel tower"}]})
    (tmp_path / "tok").mkdir()
    tok = build_tokenizer(tmp_path / "tok")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = records(src, tokenizer=tok)[0]["prompt"]
    assert prompt == request_prompt({"messages": [{"role": "user", "content": "where is the eiffel tower"}]}, tok)
    assert prompt == "<|user|>where is the eiffel tower</s><|assistant|>"


def test_qa_detection_keeps_gsm8k_and_single_string_files_need_the_format(tmp_path):
    assert detect_format(["question", "answer"], "x", [["Paris"]]) == "qa"
    assert detect_format(["question", "answer"], "x", ["2 + 2 = 4\n#### 4"]) == "gsm8k"
    assert detect_format(["question", "answer"]) == "gsm8k"
    assert {r["task"] for r in records(DATA / "gsm8k.jsonl")} == {"math"}
    src = _qa_file(tmp_path, [{"question": "Capital of Peru?", "answer": "Lima"}])
    with pytest.raises(InvalidInput, match="set the format to qa"):
        records(src)
    assert records(src, format="qa")[0]["aliases"] == ["Lima"]
    assert parse_suite(f"nq={src}:qa").format == "qa"


@pytest.mark.parametrize(("row", "field", "problem"), [
    ({"question": "q", "answer": []}, "answer", "empty"),
    ({"question": "q"}, "answer", "missing"),
    ({"question": "q", "answer": [3]}, "answer[0]", "wrong type"),
    ({"question": "q", "answer": ["ok", None]}, "answer[1]", "wrong type"),
    ({"question": "q", "answer": ["The"]}, "answer[0]", "empty"),
    ({"question": "q", "answer": {"a": 1}}, "answer", "wrong type"),
    ({"question": "", "answer": ["x"]}, "question", "empty"),
    ({"question": "q", "answer": ["x"], "options": ["y", "z"]}, "options", "wrong value"),
    ({"question": "q", "answer": ["Lima"], "options": ["Lima", "Lima, Peru", "Quito"]}, "options", "wrong value"),
    ({"question": "q", "answer": ["x"], "options": ["x"]}, "options", "wrong type"),
])
def test_bad_qa_rows_name_file_row_and_field(tmp_path, row, field, problem):
    src = _qa_file(tmp_path, [{"question": "fine", "answer": ["yes"]}, row])
    with pytest.raises(InvalidInput) as err:
        records(src, format="qa")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{src}, line 2, field '{field}': {problem}"), msg


def test_qa_unicode_rows_round_trip(tmp_path):
    src = _qa_file(tmp_path, [{"question": "Capitale de la Colombie ?", "answer": ["Bogotá", "Santafé de Bogotá"]}])
    row = records(src, format="qa")[0]
    assert row["aliases"] == ["Bogotá", "Santafé de Bogotá"]
    assert milora.judge(row, "C'est Bogota.") and not milora.judge(row, "C'est Medellín.")



def _result(name, correct, **metrics):
    preds = [{"id": f"q{i}", "prediction": f"p{i}", "correct": c} for i, c in enumerate(correct)]
    return SuiteResult(name, {"accuracy": sum(correct) / len(correct), "n": len(correct), "seconds": 1.0, **metrics},
                       preds)


def test_with_base_reports_what_the_tuned_model_kept():
    tuned = with_base(_result("g", [True, False, True, True], loglik_accuracy=0.5),
                      _result("g", [True, True, False, False], loglik_accuracy=0.25))
    m = tuned.metrics
    assert (m["base_accuracy"], m["n_base_correct"], m["retained"]) == (0.5, 2, 0.5)
    assert m["base_loglik_accuracy"] == 0.25 and m["accuracy"] == 0.75 and m["base_seconds"] == 1.0
    assert [(p["base_prediction"], p["base_correct"]) for p in tuned.predictions][:2] == [("p0", True), ("p1", True)]
    none_known = with_base(_result("g", [True, False]), _result("g", [False, False]))
    assert none_known.metrics["retained"] == 1.0 and none_known.metrics["n_base_correct"] == 0  # nothing to lose
    loss = SuiteResult("c", {"loss": 1.0, "perplexity": 2.7, "n": 1, "seconds": 0.1}, [{"id": "a", "loss": 1.0}])
    base = SuiteResult("c", {"loss": 2.0, "perplexity": 7.4, "n": 1, "seconds": 0.1}, [{"id": "a", "loss": 2.0}])
    assert with_base(loss, base).metrics["base_loss"] == 2.0 and loss.predictions[0]["base_loss"] == 2.0
    with pytest.raises(ValueError, match="different examples"):
        with_base(_result("g", [True]), _result("g", [True, False]))


# ----------------------------------------------------------------------------- lm-eval results, the gate


def test_lm_eval_results_and_deltas():
    results = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                            "sample_len": 20},
               "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5, "x": "N/A"}}
    m = harness.results_metrics(results)
    assert m == {"arc_easy": {"acc": 0.5, "acc_norm": 0.6, "acc_stderr": 0.1, "sample_len": 20.0},
                 "gsm8k": {"exact_match_flexible-extract": 0.5, "exact_match_strict-match": 0.25}}
    base = {"arc_easy": {"acc": 0.25, "acc_norm": 0.5, "acc_stderr": 0.1, "sample_len": 20.0}}
    assert harness.deltas(m, base) == {"arc_easy": {"acc": 0.25, "acc_norm": pytest.approx(0.1)}}


def test_lm_eval_task_manager_reads_only_local_yamls_when_they_define_the_tasks(tmp_path):
    (tmp_path / "t.yaml").write_text("task: my_local_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     "    test: x.json\noutput_type: multiple_choice\ntest_split: test\n"
                                     "doc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    manager = harness.task_manager(["my_local_task"], tmp_path)
    assert manager.all_tasks == ["my_local_task"]
    with pytest.raises(UserError, match="not a directory"):
        harness.task_manager(["t"], tmp_path / "missing")


def test_gate_and_guards_on_suite_and_lm_eval_metrics():
    rc = RegisterConfig(metric="suites_average", guards=[{"metric": "lm_eval_delta.arc_easy.acc", "max_value": 0.5},
                                                         {"metric": "suites.gsm8k.accuracy", "max_increase": 0.3}])
    champ = {"suites_average": 0.4, "suites.gsm8k.accuracy": 0.3}
    win = gate({"suites_average": 0.5, "lm_eval_delta.arc_easy.acc": 0.1, "suites.gsm8k.accuracy": 0.5}, champ, rc, "1")
    assert win.promote and win.metric == "suites_average" and win.challenger_value == 0.5
    guarded = gate({"suites_average": 0.9, "lm_eval_delta.arc_easy.acc": 0.7, "suites.gsm8k.accuracy": 0.9}, champ, rc)
    assert not guarded.promote and "guard lm_eval_delta.arc_easy.acc" in guarded.reason
    assert "guard suites.gsm8k.accuracy: rose by 0.6" in guarded.reason
    lm = gate({"lm_eval.arc_easy.acc": 0.7}, {"lm_eval.arc_easy.acc": 0.6}, RegisterConfig(metric="lm_eval.arc_easy.acc"))
    assert lm.promote
    floor = RegisterConfig(metric="suites_average", guards=[
        {"metric": "lm_eval_delta.arc_easy.acc", "min_value": -0.02},
        {"metric": "lm_eval.arc_easy.acc", "max_decrease": 0.05}])
    dropped = gate({"suites_average": 0.9, "lm_eval_delta.arc_easy.acc": -0.1, "lm_eval.arc_easy.acc": 0.5},
                   {"suites_average": 0.5, "lm_eval.arc_easy.acc": 0.6}, floor)
    assert not dropped.promote and "-0.1 < min_value -0.02" in dropped.reason
    assert "guard lm_eval.arc_easy.acc: fell by 0.1 (0.6 -> 0.5) > max_decrease 0.05" in dropped.reason
    kept = gate({"suites_average": 0.9, "lm_eval_delta.arc_easy.acc": 0.0, "lm_eval.arc_easy.acc": 0.58},
                {"suites_average": 0.5, "lm_eval.arc_easy.acc": 0.6}, floor)
    assert kept.promote
    typo = gate({"suites_average": 0.5}, None, RegisterConfig(metric="suite_average"))
    assert not typo.promote and "did you mean suites_average" in typo.reason


@pytest.mark.slow
def test_a_suite_loads_from_s3(s3_bucket, tmp_path):
    import boto3

    boto3.client("s3").upload_file(str(LLM_ADAPTERS / "boolq" / "test.json"), s3_bucket, "suites/boolq/test.json")
    rows = records(f"s3://{s3_bucket}/suites/boolq")
    local = records(LLM_ADAPTERS / "boolq")
    assert [(r["id"], r["answer"]) for r in rows] == [(r["id"], r["answer"]) for r in local]
    assert rows[0]["source"] == f"s3://{s3_bucket}/suites/boolq/test.json"
