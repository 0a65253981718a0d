"""Data: every format (fixture files in tests/data/ and CSV / Parquet copies), auto-detection, templates,
response-only loss masks, truncation, bad rows in both modes, bad files, offline Hub ids, dedup, split,
the embedded synthetic sets, and the `prepare` stage (deterministic bytes, metrics, CLI)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milora.core.io import read_json, write_json
from milora.data import synthetic
from milora.data.formats import (
    ROW_KEYS,
    detect_format,
    load_records,
    normalize_number,
    parse_options,
    read_records,
)
from milora.model.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt
from milora.model.tokenize import encode, tokenize_pair
from milora.pipeline.config import validate
from milora.pipeline.paths import Paths
from milora.stages.base import train_tokenizer
from milora.stages.ingest import run as ingest_stage
from milora.stages.prepare import dedup as dedup_rows
from milora.stages.prepare import run as prepare_stage
from milora.stages.prepare import split_rows

DATA = Path(__file__).parent / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer trained on the synthetic corpus (as the embedded base's is)."""
    docs, _ = synthetic.pretraining_corpus(300, 1, seed=0)
    return train_tokenizer([*docs, PROMPT_NO_INPUT, PROMPT_WITH_INPUT], vocab_size=400, max_length=512)


def rows_of(source, **kw) -> list[dict]:
    return load_records(source, **kw).to_list()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- formats


def test_alpaca_rows_use_the_llm_adapters_template_in_source_order():
    rows = rows_of(DATA / "alpaca.json")
    assert [r["response"] for r in rows] == ["1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well.",
                                             "Le chat dort.", "Red."]
    assert rows[0]["prompt"] == PROMPT_NO_INPUT.format(instruction="Give three tips for staying healthy.")
    assert rows[1]["prompt"] == PROMPT_WITH_INPUT.format(instruction="Translate the sentence into French.",
                                                         input="The cat sleeps.")
    assert rows[1]["prompt"].endswith("### Input:\nThe cat sleeps.\n\n### Response:\n")
    assert {r["task"] for r in rows} == {"generic"} and {r["answer"] for r in rows} == {""}
    assert [r["source_row"] for r in rows] == [1, 2, 3]


def test_llm_adapters_commonsense_rows_are_multiple_choice_with_parsed_options():
    rows = rows_of(DATA / "commonsense.json")
    assert [r["task"] for r in rows] == ["choice"] * 4
    assert [r["answer"] for r in rows] == ["option1", "true", "answer1", "solution1"]
    assert rows[0]["options"] == ["Sarah", "Maria"] and rows[0]["n_options"] == 2
    assert rows[1]["options"] == ["true", "false"]
    assert rows[2]["options"] == ["scissors", "spoon", "pillow", "bucket"] and rows[2]["n_options"] == 4
    assert rows[3]["options"] == ["Store it in a sealed bag.", "Leave it in the rain."]
    assert rows[0]["response"] == "the correct answer is option1"


def test_llm_adapters_math_rows_have_normalised_numeric_answers():
    rows = rows_of(DATA / "math_10k.json")
    assert [(r["task"], r["answer"]) for r in rows] == [("math", "10"), ("math", "2400"), ("choice", "B")]
    assert rows[2]["options"] == ["5", "6", "7"]
    assert rows[0]["response"].endswith("The answer is 10.")


def test_metamath_answer_is_read_from_the_response():
    rows = rows_of(DATA / "metamath.json")
    assert [r["answer"] for r in rows] == ["4", "20", "\\frac{1}{2}"]
    assert {r["task"] for r in rows} == {"math"}
    assert rows[0]["prompt"] == format_prompt("What is the value of $x$ if $2x + 3 = 11$?")


def test_gsm8k_keeps_the_worked_solution_and_extracts_the_final_number():
    rows = rows_of(DATA / "gsm8k.jsonl")
    assert [r["answer"] for r in rows] == ["72", "1234"]
    assert rows[0]["response"].endswith("#### 72") and "<<48/2=24>>" in rows[0]["response"]
    assert rows[0]["prompt"].startswith("Below is an instruction") and "Natalia sold clips" in rows[0]["prompt"]


def test_chat_without_a_template_uses_role_tags_and_the_last_reply_as_response():
    rows = rows_of(DATA / "chat.jsonl")
    assert rows[0]["prompt"] == "### System:\nYou are terse.\n\n### User:\nWhat is 2 + 2?\n\n### Assistant:\n"
    assert rows[0]["response"] == "4"
    assert rows[1]["prompt"].endswith("### Assistant:\nHello.\n\n### User:\nName a fruit.\n\n### Assistant:\n")
    assert rows[1]["response"] == "An apple."


def test_chat_uses_the_tokenizers_chat_template(tokenizer):
    tok = train_tokenizer(["hello there"] * 5, vocab_size=300, max_length=64)
    tok.chat_template = CHAT_TEMPLATE
    rows = rows_of(DATA / "chat.jsonl", tokenizer=tok)
    assert rows[0]["prompt"] == "<|system|>You are terse.</s><|user|>What is 2 + 2?</s><|assistant|>"
    assert rows[1]["prompt"].endswith("<|assistant|>Hello.</s><|user|>Name a fruit.</s><|assistant|>")
    # a tokenizer without a template falls back to role tags
    assert rows_of(DATA / "chat.jsonl", tokenizer=tokenizer)[0]["prompt"].startswith("### System:")


@pytest.mark.parametrize(("columns", "fmt"), [
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"),
    (["instruction", "input", "output", "answer"], "llm_adapters"),
    (["query", "response", "type"], "metamath"),
    (["question", "answer"], "gsm8k"),
    (["messages"], "chat"),
    (["messages", "id"], "chat"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_undetectable_columns_say_what_is_expected_and_how_to_override():
    with pytest.raises(ValueError, match=r"x\.json: cannot tell the data format.*\['prompt', 'text'\].*data\.format"):
        detect_format(["text", "prompt"], "x.json")


def test_format_override_beats_detection():
    rows = rows_of(DATA / "commonsense.json", format="alpaca")
    assert {r["task"] for r in rows} == {"generic"} and {r["answer"] for r in rows} == {""}


def test_csv_parquet_jsonl_and_json_array_give_identical_rows(tmp_path):
    source = json.loads((DATA / "commonsense.json").read_text())
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(source[0]))
        w.writeheader()
        w.writerows(source)
    pq.write_table(pa.Table.from_pylist(source), tmp_path / "c.parquet")
    write_jsonl(tmp_path / "c.jsonl", source)
    keys = ("prompt", "response", "answer", "task", "options", "id")
    want = [{k: r[k] for k in keys} for r in rows_of(DATA / "commonsense.json")]
    for name in ("c.csv", "c.parquet", "c.jsonl"):
        assert [{k: r[k] for k in keys} for r in rows_of(tmp_path / name)] == want, name


def test_a_directory_loads_its_files_in_sorted_order_each_with_its_own_format(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "gsm8k.jsonl").write_bytes((DATA / "gsm8k.jsonl").read_bytes())
    (tmp_path / "a_alpaca.json").write_bytes((DATA / "alpaca.json").read_bytes())
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("{broken")
    loaded = read_records(tmp_path)
    assert [Path(k).name for k in loaded.formats] == ["a_alpaca.json", "gsm8k.jsonl"]
    assert list(loaded.formats.values()) == ["alpaca", "gsm8k"]
    assert [r["task"] for r in loaded.rows] == ["generic"] * 3 + ["math"] * 2


def test_load_records_returns_a_dataset_with_the_contract_columns():
    ds = load_records(DATA / "gsm8k.jsonl")
    assert type(ds).__name__ == "Dataset" and len(ds) == 2
    assert {"prompt", "response", "answer", "task", "id", "options", "n_options"} <= set(ds.column_names)


def test_group_column_is_kept(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "2\n#### 2", "group": "sums"}])
    assert rows_of(src)[0]["group"] == "sums"


@pytest.mark.parametrize(("text", "want"), [
    ("72", "72"), ("1,234", "1234"), ("$5.50", "5.5"), ("10.0", "10"), ("-3", "-3"), ("0.25.", "0.25"),
    ("abc", None), ("1/2", None), ("", None),
])
def test_normalize_number(text, want):
    assert normalize_number(text) == want


def test_parse_options_inline_and_out_of_order_labels():
    assert parse_options("Q?\noption1: a b option2: c\n\nAnswer format: option1/option2", "option") == ["a b", "c"]
    assert parse_options("Q? option2: x", "option") == []  # no option1: not a usable option list


# ----------------------------------------------------------------------------- bad rows and bad files

BAD_ROWS = [
    {"instruction": "ok", "input": "", "output": "fine"},
    {"instruction": "no output here", "input": ""},
    {"instruction": "typed", "input": "", "output": ["a", "list"]},
    {"instruction": "   ", "input": "", "output": "blank instruction"},
    {"instruction": "also ok", "output": "fine too"},
]


BAD_ROW_PROBLEMS = {1: ("output", "missing"), 2: ("output", "wrong type: expected text, got list"),
                    3: ("instruction", "empty")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.sampled_from(sorted(BAD_ROW_PROBLEMS)), before=st.integers(0, 12), after=st.integers(0, 3),
       blanks=st.lists(st.integers(0, 12), max_size=3))
def test_bad_row_fails_naming_file_line_and_field(tmp_path, bad, before, after, blanks):
    """The reported line is the bad row's line in the file, wherever it is (blank lines count as lines)."""
    lines = [json.dumps({"instruction": f"q{i}", "output": "fine"}) for i in range(before)]
    lines.append(json.dumps(BAD_ROWS[bad]))
    lines += [json.dumps({"instruction": f"z{i}", "output": "fine"}) for i in range(after)]
    for at in sorted(blanks, reverse=True):
        lines.insert(min(at, before), "")  # blank lines before the bad row shift its line number
    line = lines.index(json.dumps(BAD_ROWS[bad])) + 1
    src = tmp_path / f"train-{bad}-{before}-{after}-{len(blanks)}.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    field, problem = BAD_ROW_PROBLEMS[bad]
    with pytest.raises(ValueError) as err:
        load_records(src, format="alpaca")
    assert str(err.value) == (f"{src}, line {line}, field '{field}': {problem}. Fix the row, or set "
                              "data.on_bad_rows: skip to drop bad rows and count them.")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.sampled_from(sorted(BAD_ROW_PROBLEMS)), before=st.integers(0, 12))
def test_bad_row_in_a_json_array_csv_and_parquet_is_named_by_row(tmp_path, bad, before):
    rows = [{"instruction": f"q{i}", "input": "", "output": "fine"} for i in range(before)] + [BAD_ROWS[bad]]
    field, problem = BAD_ROW_PROBLEMS[bad]
    src = tmp_path / f"alpaca-{bad}-{before}.json"
    src.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=re.escape(f"{src}, row {before + 1}, field '{field}': {problem}")):
        load_records(src, format="alpaca")


def test_bad_rows_in_a_json_array_are_named_by_row(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(BAD_ROWS[:2]))
    with pytest.raises(ValueError, match=re.escape(f"{src}, row 2, field 'output': missing")):
        load_records(src, format="alpaca")


def test_skip_mode_drops_and_counts_bad_rows(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", BAD_ROWS)
    loaded = read_records(src, on_bad_rows="skip")
    assert [r["response"] for r in loaded.rows] == ["fine", "fine too"]
    assert dict(loaded.dropped) == {"bad row: output missing": 1, "bad row: output wrong type": 1,
                                    "bad row: instruction empty": 1}
    assert loaded.source_rows == 5


def test_invalid_json_lines_fail_or_are_skipped(tmp_path):
    src = tmp_path / "g.jsonl"
    src.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "oops",\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"g\.jsonl, line 2, field '<row>': invalid JSON"):
        load_records(src)
    loaded = read_records(src, on_bad_rows="skip")
    assert len(loaded.rows) == 1
    assert dict(loaded.dropped) == {"bad row: <row> invalid JSON": 1, "bad row: <row> wrong type": 1}


def test_gsm8k_answer_without_final_number_is_a_bad_row(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ValueError, match=r"line 1, field 'answer': no final answer"):
        load_records(src)


@pytest.mark.parametrize(("messages", "field", "problem"), [
    ("not a list", "messages", "wrong type"),
    ([], "messages", "empty"),
    ([{"role": "user", "content": "hi"}], "messages", "no reply"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}], "messages[0].role", "wrong value"),
    ([{"content": "hi"}, {"role": "assistant", "content": "yo"}], "messages[0].role", "missing"),
    (["hi", {"role": "assistant", "content": "yo"}], "messages[0]", "wrong type"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}], "messages[0].content", "wrong type"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "messages[1].content", "empty"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "yo"}], "messages", "no prompt"),
])
def test_bad_chat_rows(tmp_path, messages, field, problem):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(ValueError, match=re.escape(f"line 1, field '{field}': {problem}")):
        load_records(src)


def test_all_rows_bad_in_skip_mode_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [BAD_ROWS[1], BAD_ROWS[2]])
    with pytest.raises(ValueError, match=r"no usable rows \(1 bad row: output missing, 1 bad row: output wrong type\)"):
        load_records(src, on_bad_rows="skip")


def test_non_utf8_file_is_a_clear_error(tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes('{"instruction": "café", "output": "ok"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not valid UTF-8 \(byte 0xe9 at offset 20, line 1\)"):
        load_records(src)
    csv_src = tmp_path / "latin1.csv"
    csv_src.write_bytes("instruction,output\ncafé,ok\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_records(csv_src)


def test_utf8_with_bom_is_fine(tmp_path):
    src = tmp_path / "bom.csv"
    src.write_bytes("instruction,output\nsay hi,hi\n".encode("utf-8-sig"))
    assert rows_of(src)[0]["response"] == "hi"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.json", b"  \n\n", "the file is empty"),
    ("empty_array.json", b"[]", "the file has no rows"),
    ("header_only.csv", b"instruction,output\n", "the file has no rows"),
    ("empty.parquet", b"", "the file is empty"),
])
def test_empty_files_are_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{name}: {message}")):
        load_records(tmp_path / name)


def test_empty_parquet_table_and_unsupported_files(tmp_path):
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}),
                   tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="none.parquet: the file has no rows"):
        load_records(tmp_path / "none.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="broken.parquet: not a readable Parquet file"):
        load_records(tmp_path / "broken.parquet")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="holds no data files"):
        load_records(tmp_path / "d")


def test_missing_local_path_and_offline_hub_id():
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_records("./no/such/dir")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_records("missing.jsonl")
    with pytest.raises(ValueError, match=r"'someorg/not-a-cached-dataset'.*offline.*local JSON / JSONL / Parquet / CSV"):
        load_records("someorg/not-a-cached-dataset")


# ----------------------------------------------------------------------------- tokenization and loss masks


def test_encode_masks_the_prompt_and_appends_eos(tokenizer):
    prompt = format_prompt("What is 2 + 3?")
    enc = encode(tokenizer, prompt, "2 + 3 = 5.\n#### 5", max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) == len(enc["attention_mask"]) and set(enc["attention_mask"]) == {1}
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    n_prompt = labels.index(next(x for x in labels if x != -100))
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[:n_prompt], skip_special_tokens=True) == prompt
    assert tokenizer.decode(ids[n_prompt:], skip_special_tokens=True) == "2 + 3 = 5.\n#### 5"
    assert enc["truncated"] is False


def test_encode_padding_is_masked(tokenizer):
    enc = encode(tokenizer, format_prompt("Hi"), "Hello.", max_length=64, padding=True)
    n = sum(enc["attention_mask"])
    assert len(enc["input_ids"]) == 64 and enc["input_ids"][n:] == [tokenizer.pad_token_id] * (64 - n)
    assert enc["labels"][n:] == [-100] * (64 - n) and enc["attention_mask"][n:] == [0] * (64 - n)


def test_truncation_cuts_the_response_end_then_the_prompt_start_and_keeps_some_response(tokenizer):
    short, long = format_prompt("Tell a story."), format_prompt("Tell a long story. " * 20)
    response = "The old dog sleeps under the table. " * 10
    p_ids, r_ids = tokenize_pair(tokenizer, short, response)
    # the prompt fits with room to spare: the response is cut from its end
    enc = encode(tokenizer, short, response, max_length=len(p_ids) + 40)
    assert enc["truncated"] and enc["input_ids"] == p_ids + r_ids[:40]
    assert enc["labels"] == [-100] * len(p_ids) + r_ids[:40]
    # the prompt leaves too little room: its start is cut (BOS kept) so a quarter of the budget is response
    p_ids, r_ids = tokenize_pair(tokenizer, long, response)
    enc = encode(tokenizer, long, response, max_length=40)
    assert enc["truncated"] and len(enc["input_ids"]) == 40 and enc["input_ids"][0] == tokenizer.bos_token_id
    assert enc["input_ids"][1:30] == p_ids[-29:] and enc["input_ids"][30:] == r_ids[:10]
    assert enc["labels"] == [-100] * 30 + r_ids[:10]
    # a short response is kept whole
    enc = encode(tokenizer, long, "Yes.", max_length=40)
    yes = tokenize_pair(tokenizer, long, "Yes.")[1]
    assert enc["input_ids"][-len(yes):] == yes and enc["labels"][-len(yes) - 1] == -100 and enc["truncated"]


def test_tokenize_pair_respects_a_template_that_already_has_bos(tokenizer):
    p_plain, _ = tokenize_pair(tokenizer, "### User:\nhi\n\n### Assistant:\n", "yo")
    p_bos, _ = tokenize_pair(tokenizer, "<s>### User:\nhi\n\n### Assistant:\n", "yo")
    assert p_bos == p_plain and p_bos.count(tokenizer.bos_token_id) == 1


# ----------------------------------------------------------------------------- dedup and split


def _rows(n: int, group=None) -> list[dict]:
    return [{"id": f"generic-{i:04d}", "prompt": f"p{i}", "response": "r", "group": group(i) if group else "",
             "task": "generic"} for i in range(n)]


def test_dedup_keeps_first_occurrence():
    rows = [{"prompt": "a", "response": "1", "k": 0}, {"prompt": "a", "response": "1", "k": 1},
            {"prompt": "a", "response": "2", "k": 2}]
    kept, n = dedup_rows(rows)
    assert [r["k"] for r in kept] == [0, 2] and n == 1


def test_split_is_deterministic_seeded_and_stable_when_data_grows():
    rows = _rows(1000)
    a, b = split_rows(rows, 0.1, 10_000, seed=0), split_rows(rows, 0.1, 10_000, seed=0)
    assert a.train == b.train and a.eval == b.eval
    assert 60 < len(a.eval) < 140 and len(a.train) + len(a.eval) == 1000
    assert {r["id"] for r in split_rows(rows, 0.1, 10_000, seed=1).eval} != {r["id"] for r in a.eval}
    grown = split_rows(rows + _rows(1500)[1000:], 0.1, 10_000, seed=0)
    assert {r["id"] for r in a.eval} <= {r["id"] for r in grown.eval}


def test_split_keeps_groups_whole_and_caps_eval():
    rows = _rows(600, group=lambda i: f"g{i // 6}")
    s = split_rows(rows, 0.2, 30, seed=0)
    assert len(s.eval) <= 30 and len(s.eval) % 6 == 0 and len(s.eval) > 0
    assert not {r["group"] for r in s.eval} & {r["group"] for r in s.train}
    assert len(s.train) + len(s.eval) == 600 and s.capped_to_train > 0


def test_split_of_a_tiny_source_still_has_both_sides():
    s = split_rows(_rows(2), 0.01, 10, seed=0)
    assert len(s.train) == len(s.eval) == 1


# ----------------------------------------------------------------------------- embedded synthetic sets


def test_synthetic_sets_are_seeded_deterministic_and_in_real_formats():
    assert synthetic.math_rows(50, seed=3) == synthetic.math_rows(50, seed=3) != synthetic.math_rows(50, seed=4)
    assert synthetic.choice_rows(50, seed=3) == synthetic.choice_rows(50, seed=3)
    for r in synthetic.math_rows(200):
        assert detect_format(r) == "gsm8k"
        final = int(r["answer"].rsplit("#### ", 1)[1])
        assert 0 <= final <= 36 and all(int(n) < 40 for n in re.findall(r"\d+", r["question"]))
    for r in synthetic.choice_rows(200):
        assert detect_format(r) == "llm_adapters"
        opts = parse_options(r["instruction"], "option")
        assert 2 <= len(opts) <= 4 and len(set(opts)) == len(opts)
        assert r["output"] == f"the correct answer is {r['answer']}"


def test_choice_questions_ask_about_facts_the_corpus_states():
    docs, _ = synthetic.pretraining_corpus(3000, 1, seed=0)
    corpus = " ".join(docs)
    world = {p.name: p for p in synthetic.WORLD.people}
    for r in synthetic.choice_rows(100):
        kind, _, key = r["group"].removeprefix("fact:").partition(":")
        gold = parse_options(r["instruction"], "option")[int(r["answer"][-1]) - 1]
        if kind in ("colour", "pet", "job", "home"):
            assert getattr(world[key], kind) == gold
            assert key in corpus and gold in corpus
        elif kind == "capital":
            assert f"{gold} is the capital of {key}." in corpus or f"capital of {key} is {gold}." in corpus


def test_heldout_documents_are_not_in_the_training_corpus():
    train, heldout = synthetic.pretraining_corpus(500, 100, seed=0)
    assert len(heldout) == 100 and not set(train) & set(heldout)
    assert synthetic.pretraining_corpus(500, 100, seed=0) == (train, heldout)


def test_write_task_files_round_trip_through_the_loader(tmp_path):
    synthetic.write_task_files(tmp_path, 20, 20, seed=0)
    loaded = read_records(tmp_path)
    assert {Path(k).name: v for k, v in loaded.formats.items()} == {"choice.jsonl": "llm_adapters",
                                                                   "math.jsonl": "gsm8k"}
    assert [r["task"] for r in loaded.rows] == ["choice"] * 20 + ["math"] * 20


# ----------------------------------------------------------------------------- the prepare stage


@pytest.fixture
def project(tmp_path, tokenizer):
    """A project root with a params file, the embedded tasks ingested into data/raw, and models/base.json
    pointing at a tokenizer-only base directory (all `prepare` reads from the base)."""
    paths = Paths(tmp_path)
    tokenizer.save_pretrained(paths.base_dir)
    write_json(paths.base_json, {"name_or_path": "embedded", "load_path": "models/base", "embedded": True})
    params = {"data": {"embedded": {"math_rows": 150, "choice_rows": 150}, "max_eval_rows": 40, "max_length": 512}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ingest_stage(_config(paths), paths)
    return paths


def _config(paths: Paths):
    return validate(yaml.safe_load((paths.root / "params.yaml").read_text()))


def _ingest(paths: Paths, source: Path, **data):
    """`data.source` set to `source` and ingested into data/raw (as `milora stage ingest` does)."""
    cfg = _config(paths)
    cfg.data.source = str(source)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    ingest_stage(cfg, paths)
    return cfg


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_embedded_writes_contract_rows_and_metrics(project):
    prepare_stage(_config(project), project)
    train, ev = _read(project.prepared_dir / "train.jsonl"), _read(project.prepared_dir / "eval.jsonl")
    assert len(ev) <= 40 and len(train) + len(ev) + read_json(project.report("data"))["dropped"].get("duplicate", 0) <= 300
    for r in train + ev:
        assert tuple(r) == ROW_KEYS
        assert r["task"] in ("math", "choice")
        if r["task"] == "choice":
            assert r["answer"] == f"option{r['answer'][-1]}" and r["n_options"] == len(r["options"]) >= 2
        else:
            assert r["answer"].isdigit() and r["n_options"] == 0 and r["options"] == []
    assert {r["task"] for r in ev} == {"math", "choice"}
    assert len({r["id"] for r in train + ev}) == len(train) + len(ev)
    # eval multiple-choice questions ask about facts no training question mentions
    def facts(rows):
        return {re.sub(r"\n\noption1:.*", "", r["prompt"], flags=re.S).rsplit(": ", 1)[-1]
                for r in rows if r["task"] == "choice"}
    assert not facts(ev) & facts(train)
    m = read_json(project.report("data"))
    assert m["rows"]["train"] == len(train) and m["rows"]["eval"] == len(ev)
    assert m["formats"] == {"math.jsonl": "gsm8k", "choice.jsonl": "llm_adapters"}
    assert m["tasks"]["eval"]["math"] + m["tasks"]["eval"]["choice"] == len(ev)
    assert m["truncated"] == {"max_length": 512, "train": 0, "eval": 0}
    assert 0 < m["token_lengths"]["total"]["p50"] <= m["token_lengths"]["total"]["p99"] <= 512


def test_prepare_output_is_byte_identical_across_runs(project, tmp_path_factory):
    cfg = _config(project)
    prepare_stage(cfg, project)
    first = {n: (project.prepared_dir / n).read_bytes() for n in ("train.jsonl", "eval.jsonl")}
    other = Paths(tmp_path_factory.mktemp("again"))
    shutil.copytree(project.base_dir, other.base_dir)
    shutil.copy(project.base_json, other.base_json)
    ingest_stage(cfg, other)
    prepare_stage(cfg, other)
    assert {n: (other.prepared_dir / n).read_bytes() for n in first} == first
    assert other.report("data").read_bytes() == project.report("data").read_bytes()


def test_prepare_local_source_skips_bad_rows_dedups_and_counts_truncation(project):
    rows = [*BAD_ROWS, BAD_ROWS[0], {"instruction": "long " * 300, "output": "short"}]
    cfg = _ingest(project, write_jsonl(project.root / "mine.jsonl", rows), on_bad_rows="skip", max_length=200)
    prepare_stage(cfg, project)
    m = read_json(project.report("data"))
    assert m["dropped"] == {"bad row: instruction empty": 1, "bad row: output missing": 1,
                            "bad row: output wrong type": 1, "duplicate": 1}
    assert m["rows"] == {"source": 7, "loaded": 4, "kept": 3, "train": 2, "eval": 1, "rehearsal": 0}
    assert m["truncated"]["train"] + m["truncated"]["eval"] == 1 and m["formats"] == {"mine.jsonl": "alpaca"}
    cfg.data.on_bad_rows = "fail"
    with pytest.raises(ValueError, match=r"mine\.jsonl, line 2, field 'output': missing"):
        prepare_stage(cfg, project)


def test_prepare_directory_source_names_files_relative_to_it(project):
    src = project.root / "source"
    (src / "math").mkdir(parents=True)
    (src / "math" / "gsm8k.jsonl").write_bytes((DATA / "gsm8k.jsonl").read_bytes())
    (src / "commonsense.json").write_bytes((DATA / "commonsense.json").read_bytes())
    cfg = _ingest(project, src)
    prepare_stage(cfg, project)
    m = read_json(project.report("data"))
    assert m["formats"] == {"commonsense.json": "llm_adapters", "math/gsm8k.jsonl": "gsm8k"}
    assert m["rows"]["train"] + m["rows"]["eval"] == 6 and m["rows"]["eval"] >= 1


@pytest.mark.parametrize("line", [1, 4, 9])
def test_prepare_names_the_users_source_file_and_line_not_the_copy(project, line):
    """The prepare stage reads the copy in data/raw; its errors name the file of `data.source` it came from."""
    src = project.root / "incoming"
    (src / "batch").mkdir(parents=True)
    rows = [{"instruction": f"q{i}", "output": "fine"} for i in range(line - 1)] + [BAD_ROWS[1]]
    write_jsonl(src / "batch" / "rows.jsonl", rows)
    cfg = _ingest(project, src, format="alpaca")
    with pytest.raises(ValueError) as err:
        prepare_stage(cfg, project)
    msg = str(err.value)
    assert msg.startswith(f"{src}/batch/rows.jsonl, line {line}, field 'output': missing")
    assert "data/raw" not in msg
    cfg = _ingest(project, src / "batch" / "rows.jsonl", format="alpaca")  # a single file as the source: named as given
    with pytest.raises(ValueError, match=re.escape(f"{src}/batch/rows.jsonl, line {line}, field 'output'")):
        prepare_stage(cfg, project)


@pytest.mark.slow
def test_an_s3_prefix_as_data_source_is_ingested_and_named_in_errors(project, s3_bucket):
    """`data.source: s3://bucket/prefix` on a real S3 server (moto): every object under the prefix but hidden ones
    is copied into data/raw; a bad row is reported by its object's s3:// URI and line."""
    import boto3

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="incoming/math/gsm8k.jsonl", Body=(DATA / "gsm8k.jsonl").read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="incoming/commonsense.json", Body=(DATA / "commonsense.json").read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="incoming/.staging/partial.jsonl", Body=b"not json")
    s3.put_object(Bucket=s3_bucket, Key="elsewhere/other.jsonl", Body=b"not json")
    source = f"s3://{s3_bucket}/incoming"
    cfg = _ingest(project, source)
    files = sorted(p.relative_to(project.raw_dir).as_posix() for p in project.raw_dir.rglob("*") if p.is_file())
    assert files == ["commonsense.json", "math/gsm8k.jsonl"]
    prepare_stage(cfg, project)
    assert read_json(project.report("data"))["formats"] == {"commonsense.json": "llm_adapters",
                                                            "math/gsm8k.jsonl": "gsm8k"}
    good = (DATA / "gsm8k.jsonl").read_text().splitlines()[:2]
    s3.put_object(Bucket=s3_bucket, Key="incoming/math/more.jsonl",
                  Body="\n".join([*good, json.dumps({"question": "q", "answer": "no final line"})]).encode())
    cfg = _ingest(project, source)
    with pytest.raises(ValueError, match=re.escape(f"{source}/math/more.jsonl, line 3, field 'answer': no final answer")):
        prepare_stage(cfg, project)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/nothing-here: no objects under that prefix"):
        _ingest(project, f"s3://{s3_bucket}/nothing-here")


def test_copied_from_inverts_the_ingest_layout(tmp_path):
    from milora.data.formats import copied_from

    (tmp_path / "d").mkdir()
    (tmp_path / "f.jsonl").write_text("{}")
    assert copied_from("s3://bucket/prefix", "sub/a.jsonl") == "s3://bucket/prefix/sub/a.jsonl"
    assert copied_from("s3://bucket/prefix/", "a.jsonl") == "s3://bucket/prefix/a.jsonl"
    assert copied_from("s3://bucket/data/a.jsonl", "a.jsonl") == "s3://bucket/data/a.jsonl"  # one object
    assert copied_from(str(tmp_path / "d"), "x/a.csv") == f"{tmp_path}/d/x/a.csv"
    assert copied_from(str(tmp_path / "f.jsonl"), "f.jsonl") == str(tmp_path / "f.jsonl")
    assert copied_from("embedded", "math.jsonl") == "data/raw/math.jsonl"
    assert copied_from("someorg/some-set", "data.jsonl").startswith("Hub dataset someorg/some-set")


def test_prepare_needs_ingest_and_base_first(tmp_path):
    paths = Paths(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `milora stage ingest` first"):
        prepare_stage(validate({}), paths)
    ingest_stage(validate({"data": {"embedded": {"math_rows": 10, "choice_rows": 10}}}), paths)
    with pytest.raises(FileNotFoundError, match="run `milora stage base` first"):
        prepare_stage(validate({}), paths)


def test_cli_stage_prepare_with_params_yaml(project, capsys):
    from milora.cli import main

    params = project.root / "params.yaml"
    for stage in ("ingest", "prepare"):
        assert main(["stage", stage, "--params", str(params), "--root", str(project.root)]) == 0
    assert (project.prepared_dir / "train.jsonl").stat().st_size > 0
    write_jsonl(project.raw_dir / "extra.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "hi"}])
    assert main(["stage", "prepare", "--params", str(params), "--root", str(project.root)]) == 2
    assert "extra.jsonl, line 2, field 'output': missing" in capsys.readouterr().err
