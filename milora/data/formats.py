"""Data records: loading, format detection and normalisation of every supported source format.

Every source (local JSON / JSONL / Parquet / CSV files, a directory of them, a Hub dataset id, or the
embedded synthetic sets) is normalised to the same rows: `prompt` (the full text the model sees,
template applied), `response` (the target), `answer` (the gold final answer where the format has one),
`task` (`math` | `choice` | `generic`) and, for multiple choice, `options` / `n_options`.

Supported formats (auto-detected from the columns, or forced with `data.format`):

* `alpaca`: `instruction`, `input` (optional), `output`;
* `llm_adapters`: `instruction`, `input` (optional), `output`, `answer`: LLM-Adapters' commonsense_170k
  and math_10k, the sets MiLoRA was trained on, and their per-set test files (`answer` may be a one-item
  list, as the math test sets have it: its last item is the answer). The task is read from the row: an `optionK` /
  `answerK` / `solutionK` / `endingK` label with matching option lines, `true`/`false`, or a letter
  with `(A)`-style choices is multiple choice; a number is math; anything else is generic;
* `metamath`: `query`, `response`, `type` (optional); the answer is the text after `The answer is:`;
* `gsm8k`: `question`, `answer` (the worked solution, ending in `#### <number>`);
* `math`: Hendrycks MATH, `problem`, `solution` (ending in `\\boxed{<answer>}`), `level` and `type` (optional);
  the answer is the last `\\boxed{...}` of the solution (or an `answer` column, as MATH-500 has). The
  published layout (one JSON object per file, `train/algebra/1.json`) loads as a directory;
* `chat`: `messages` (a list of `{role, content}` ending with the assistant's reply), rendered with the
  tokenizer's chat template when it has one, else with plain `### Role:` tags;
* `qa`: open questions in the NQ-open / TriviaQA-open layout, `question` and `answer` (a list of accepted
  aliases, or one string); optional `options` (candidate replies, bare answers or sentences, exactly one
  of them containing an alias) for log-likelihood scoring. The prompt is the question as one user message through the chat template (what
  the served model builds for `{"messages": [{"role": "user", "content": question}]}`); the response is the
  first alias; judged by any alias appearing in the generated answer (`milora.model.scoring.contains_answer`).
  Auto-detection tells it from `gsm8k` (also `question`, `answer`) by a list of aliases in `answer`; a file
  whose answers are all single strings is read as `qa` when the format says so.

Any format may carry an optional `group` column: rows sharing a group always land in the same split
(the embedded multiple-choice set uses it so that eval questions ask about facts no training question
mentions).

Local files are parsed here rather than by `datasets`' builders, so that every bad row can be named by
file, row and field and skipped on request (`datasets` fails a whole file on one mistyped row); the
result is a `datasets.Dataset`, and Hub ids load through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from milora.core.errors import InvalidInput, MissingInput
from milora.model import latex
from milora.model.prompts import format_prompt, render_chat
from milora.model.scoring import gold_option, normalize_answer

log = logging.getLogger(__name__)

FORMATS = ("alpaca", "llm_adapters", "metamath", "gsm8k", "math", "chat", "qa")
EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
TASKS = ("math", "choice", "qa", "generic")

CHAT_ROLES = ("system", "user", "assistant", "tool")

ROW_KEYS = ("id", "task", "prompt", "response", "answer", "n_options", "options")  # prepared JSONL, in order
_SKIP_HINT = "Fix the row, or set data.on_bad_rows: skip to drop bad rows and count them."




# ----------------------------------------------------------------------------- reading files


class BadRow(Exception):
    """One row that cannot be used: which field, what kind of problem, and details."""

    def __init__(self, field: str, kind: str, detail: str = "") -> None:
        super().__init__(f"field '{field}': {kind}{': ' + detail if detail else ''}")
        self.field, self.kind, self.detail = field, kind, detail


@dataclass
class RawRow:
    """A row as read from its source, with where it came from (`where` is e.g. `line 3` or `row 3`)."""

    origin: str
    where: str
    index: int
    data: dict[str, Any] | BadRow
    label: str = ""  # how messages name the file (default: `origin`), e.g. the user's source for a copy

    @property
    def name(self) -> str:
        """The file as messages name it."""
        return self.label or self.origin


def _read_text(path: Path, name: str) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidInput(
            f"{name}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}). "
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    if not text.strip():
        raise InvalidInput(f"{name}: the file is empty; put rows in it or remove it from data.source")
    return text


def _json_rows(path: Path, text: str, name: str) -> list[RawRow]:
    origin = str(path)
    if text.lstrip().startswith("{") and "\n" in text.strip():  # one pretty-printed object (MATH's layout)?
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # JSON Lines
        if isinstance(obj, dict):
            return [RawRow(origin, "row 1", 1, obj)]
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        if not isinstance(data, list):
            raise InvalidInput(f"{name}: expected a JSON array of row objects")
        return [RawRow(origin, f"row {i}", i,
                       obj if isinstance(obj, dict) else BadRow("<row>", "wrong type", f"not a JSON object: {obj!r:.40}"))
                for i, obj in enumerate(data, 1)]
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = BadRow("<row>", "invalid JSON", f"{exc.msg} at column {exc.colno}")
        if not isinstance(obj, dict | BadRow):
            obj = BadRow("<row>", "wrong type", f"not a JSON object: {obj!r:.40}")
        rows.append(RawRow(origin, f"line {lineno}", len(rows) + 1, obj))
    return rows


def _csv_rows(path: Path, text: str, name: str) -> list[RawRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise InvalidInput(f"{name}: the CSV file has no header row")
    out = []
    for i, row in enumerate(reader, 1):
        extra = row.pop(None, None)  # type: ignore[call-overload]
        data: dict[str, Any] | BadRow = row
        if extra:
            data = BadRow("<row>", "wrong type", f"{len(extra)} more values than header columns")
        out.append(RawRow(str(path), f"row {i}", i, data))
    return out


def _parquet_rows(path: Path, name: str) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise InvalidInput(f"{name}: the file is empty; put rows in it or remove it from data.source")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"{name}: not a readable Parquet file ({exc})") from None
    return [RawRow(str(path), f"row {i}", i, r) for i, r in enumerate(table.to_pylist(), 1)]


def read_file(path: str | os.PathLike[str], label: str | None = None) -> list[RawRow]:
    """The rows of one local JSON / JSONL / Parquet / CSV file, in file order (empty files are errors).

    `label` is how messages name the file (default: its path), e.g. the user's source of a copy."""
    p = Path(path)
    name = label or str(p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(p, name)
    elif suffix in (".json", ".jsonl"):
        rows = _json_rows(p, _read_text(p, name), name)
    elif suffix == ".csv":
        rows = _csv_rows(p, _read_text(p, name), name)
    else:
        raise InvalidInput(f"{name}: unsupported file type '{suffix}'; use one of {', '.join(EXTENSIONS)}")
    if not rows:
        raise InvalidInput(f"{name}: the file has no rows")
    for r in rows:
        r.label = label or ""
    return rows


def source_files(source: str | os.PathLike[str]) -> list[Path]:
    """The data files of a local source: the file itself, or the supported files under a directory, sorted."""
    p = Path(source)
    if p.is_file():
        return [p]
    files = sorted(
        f for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in EXTENSIONS and not any(part.startswith(".") for part in f.relative_to(p).parts)
    )
    if not files:
        raise InvalidInput(f"{p}: the directory holds no data files ({', '.join(EXTENSIONS)})")
    return files


def copied_from(source: str, rel: str) -> str:
    """The `data.source` file that the ingest stage copied to `data/raw/<rel>`, as the user would name it:
    the source file itself, `<source dir>/<rel>`, `s3://bucket/prefix/<rel>`, or a Hub dataset's export."""
    if source == "embedded":  # generated into data/raw by the ingest stage: the copy is the source
        return f"data/raw/{rel}"
    if source.startswith("s3://"):
        uri = source.rstrip("/")
        return uri if uri.endswith("/" + rel) else f"{uri}/{rel}"
    local = Path(os.path.expanduser(source))
    if local.is_file() or (not local.exists() and local.name == rel):
        return source
    if local.is_dir() or _looks_local(source):
        return os.path.join(source, rel)
    return f"Hub dataset {source} (exported as data/raw/{rel})"


def _looks_local(source: str) -> bool:
    """A path-like string (a Hub id is `name` or `owner/name`, without a data file extension)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.lower().endswith(EXTENSIONS)


def load_hub_dataset(source: str, split: str = "train") -> Any:
    """The `split` split of a Hub dataset id (`name`, `owner/name` or `owner/name:config`), as published.

    Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) with no cached copy, a ValueError says how to point at
    local files instead.
    """
    import datasets

    name, _, config = source.removeprefix("hf://").partition(":")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this id"
        if offline:
            raise InvalidInput(
                f"data.source {source!r} is not a local file or directory, and the Hugging Face Hub is offline "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) with no cached copy of that dataset. Download it "
                "while online, or point data.source at local JSON / JSONL / Parquet / CSV files."
            ) from None
        raise InvalidInput(f"data.source {source!r}: cannot load it from the Hugging Face Hub: {exc}") from None


def _hub_rows(source: str, split: str = "train") -> list[RawRow]:
    return [RawRow(f"hub:{source}", f"row {i}", i, dict(r)) for i, r in enumerate(load_hub_dataset(source, split), 1)]


# ----------------------------------------------------------------------------- format detection


def detect_format(columns: Iterable[str], origin: str = "data", answers: Iterable[Any] = ()) -> str:
    """The format a set of column names describes (see the module docstring), or a ValueError. `question` and
    `answer` are `gsm8k` (a worked solution ending `#### N`) unless one of the `answers` (the column's values,
    when given) is a list of aliases: `qa`. Open questions whose answers are all single strings are `qa` only
    when the format says so."""
    cols = set(columns)
    if {"question", "answer"} <= cols and any(isinstance(a, list) for a in answers):
        return "qa"
    if "messages" in cols:
        return "chat"
    if {"query", "response"} <= cols:
        return "metamath"
    if {"instruction", "output", "answer"} <= cols:
        return "llm_adapters"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    if {"problem", "solution"} <= cols:
        return "math"
    raise InvalidInput(
        f"{origin}: cannot tell the data format from its columns {sorted(cols)}. Expected one of: alpaca "
        "(instruction, input, output), llm_adapters (instruction, input, output, answer), metamath (query, "
        "response, type), gsm8k (question, answer), math (problem, solution), chat (messages), qa (question, "
        "answer aliases). Rename the "
        "columns or set the format (data.format, or the suite's format)."
    )


def _columns(rows: Sequence[RawRow]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        if isinstance(r.data, dict):
            cols.update(dict.fromkeys(r.data))
    return list(cols)


# ----------------------------------------------------------------------------- normalisation

_MISSING = object()
_NUMBER_RE = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def _is_missing(v: Any) -> bool:
    return v is _MISSING or v is None or (isinstance(v, float) and math.isnan(v))


def _text(row: dict[str, Any], name: str, required: bool = True, numbers: bool = False) -> str:
    v = row.get(name, _MISSING)
    if numbers and isinstance(v, list) and v:  # LLM-Adapters' math test files: "answer": ["12"]
        v = v[-1]
    if _is_missing(v):
        if required:
            raise BadRow(name, "missing")
        return ""
    if numbers and isinstance(v, int | float) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise BadRow(name, "wrong type", f"expected text, got {type(v).__name__}")
    v = v.strip()
    if required and not v:
        raise BadRow(name, "empty")
    return v


def normalize_number(text: str) -> str | None:
    """`'1,234'` -> `'1234'`, `'$5.50'` -> `'5.5'`, `'3.0'` -> `'3'`; None if `text` is not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not _NUMBER_RE.fullmatch(t):
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


_LABEL_RE = re.compile(r"(option|answer|solution|ending)\s*(\d+)", re.I)
_LETTER_OPTION_RE = re.compile(r"\(([A-E])\)\s*(.*?)(?=\s*\([A-E]\)|\n|$)")


def parse_options(text: str, word: str) -> list[str]:
    """Option texts of `wordK: ...` lines (or inline `wordK: ...` runs) in an instruction, in K order."""
    marks = [m for m in re.finditer(rf"\b{word}\s*(\d+)\s*:", text, re.I)]
    options: dict[int, str] = {}
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        end = nxt.start() if nxt is not None else len(text)
        body = re.split(r"\n\s*\n|\nAnswer format", text[m.end():end], maxsplit=1)[0].strip()
        options.setdefault(int(m.group(1)), body)
    keys = sorted(options)
    return [options[k] for k in keys] if keys == list(range(1, len(keys) + 1)) else []


def _classify(instruction: str, answer: str) -> dict[str, Any]:
    """Task, normalised answer and options of an LLM-Adapters row."""
    label = _LABEL_RE.fullmatch(answer)
    if label:
        word, k = label.group(1).lower(), int(label.group(2))
        options = parse_options(instruction, word)
        if 1 <= k <= len(options):
            return {"task": "choice", "answer": f"{word}{k}", "options": options}
    if answer.lower() in ("true", "false") and re.search(r"true\s*/\s*false|true or false", instruction, re.I):
        return {"task": "choice", "answer": answer.lower(), "options": ["true", "false"]}
    if re.fullmatch(r"[A-E]", answer):
        options = [t.strip() for _, t in _LETTER_OPTION_RE.findall(instruction)]
        if ord(answer) - ord("A") < len(options):
            return {"task": "choice", "answer": answer, "options": options}
    number = normalize_number(answer)
    if number is not None:
        return {"task": "math", "answer": number, "options": []}
    return {"task": "generic", "answer": answer, "options": []}


def _gsm8k_answer(solution: str) -> str:
    if "####" not in solution:
        raise BadRow("answer", "no final answer", "expected the solution to end with '#### <number>' "
                     "(open questions with short answers: set the format to qa)")
    final = solution.rsplit("####", 1)[1].strip()
    number = normalize_number(final)
    if number is None:
        raise BadRow("answer", "no final answer", f"'#### {final[:30]}' is not a number")
    return number


_METAMATH_ANSWER_RE = re.compile(r"The answer is:?\s*(.+?)\s*$", re.I | re.S)


def _metamath_answer(response: str) -> str:
    m = _METAMATH_ANSWER_RE.search(response.rsplit("\n", 1)[-1]) or _METAMATH_ANSWER_RE.search(response)
    if not m:
        return ""
    final = m.group(1).strip()
    return normalize_number(final) or final.rstrip(".")


def _math_answer(row: dict[str, Any], solution: str) -> str:
    given = _text(row, "answer", required=False, numbers=True)
    if given:
        return given
    boxed = latex.last_boxed(solution)
    if not boxed:
        raise BadRow("solution", "no final answer", "expected the solution to end with \\boxed{<answer>}")
    return boxed


def _messages(row: dict[str, Any], reply: bool = True) -> list[dict[str, str]]:
    msgs = row.get("messages", _MISSING)
    if _is_missing(msgs):
        raise BadRow("messages", "missing")
    if isinstance(msgs, str):  # CSV cells hold JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise BadRow("messages", "wrong type", "expected a list of {role, content}") from None
    if not isinstance(msgs, list):
        raise BadRow("messages", "wrong type", f"expected a list of {{role, content}}, got {type(msgs).__name__}")
    if not msgs:
        raise BadRow("messages", "empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRow(f"messages[{i}]", "wrong type", f"expected {{role, content}}, got {type(m).__name__}")
        try:
            role = _text(m, "role")
        except BadRow as exc:
            raise BadRow(f"messages[{i}].role", exc.kind, exc.detail) from None
        if role not in CHAT_ROLES:
            raise BadRow(f"messages[{i}].role", "wrong value", f"{role!r} is not one of {', '.join(CHAT_ROLES)}")
        try:
            content = _text(m, "content", required=role in ("user", "assistant"))
        except BadRow as exc:
            raise BadRow(f"messages[{i}].content", exc.kind, exc.detail) from None
        out.append({"role": role, "content": content})
    if not reply:  # a request: the conversation so far, to be answered
        if not any(m["role"] == "user" for m in out):
            raise BadRow("messages", "no prompt", "there is no user message to answer")
        return out
    if out[-1]["role"] != "assistant":
        raise BadRow("messages", "no reply", "the last message must be the assistant's reply (role 'assistant')")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise BadRow("messages", "no prompt", "there is no user message before the assistant's reply")
    return out




def _aliases(row: dict[str, Any]) -> list[str]:
    """The accepted answers of a `qa` row: `answer` as a list of aliases, or one string."""
    v = row.get("answer", _MISSING)
    if _is_missing(v):
        raise BadRow("answer", "missing")
    if isinstance(v, str):  # a CSV cell may hold the list as JSON text
        try:
            v = json.loads(v) if v.lstrip().startswith("[") else [v]
        except json.JSONDecodeError:
            v = [v]
    if not isinstance(v, list):
        raise BadRow("answer", "wrong type", f"expected a list of accepted answers, got {type(v).__name__}")
    if not v:
        raise BadRow("answer", "empty", "the list of accepted answers is empty")
    out = []
    for i, a in enumerate(v):
        if not isinstance(a, str):
            raise BadRow(f"answer[{i}]", "wrong type", f"expected text, got {type(a).__name__} {a!r:.40}")
        if not normalize_answer(a):
            raise BadRow(f"answer[{i}]", "empty",
                         f"{a!r:.40} is nothing once articles and punctuation are ignored")
        out.append(a.strip())
    return out


def _qa_options(row: dict[str, Any], aliases: list[str]) -> list[str]:
    """The optional candidate replies of a `qa` row: at least two texts, exactly one containing an alias."""
    v = row.get("options", _MISSING)
    if _is_missing(v):
        return []
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(o, str) and o.strip() for o in v):
        raise BadRow("options", "wrong type", "expected a list of at least two candidate replies (texts)")
    if gold_option(v, aliases) is None:
        raise BadRow("options", "wrong value", "exactly one option must contain an accepted answer")
    return [o.strip() for o in v]


_QUESTION = {"metamath": "query", "gsm8k": "question", "math": "problem"}


def prompt_of(row: Mapping[str, Any], fmt: str) -> str:
    """The training template applied to a row of an instruction-like format (not chat): the one place the
    prompts of training, evaluation and serving come from."""
    if fmt in ("alpaca", "llm_adapters"):
        return format_prompt(_text(row, "instruction"), _text(row, "input", required=False))
    return format_prompt(_text(row, _QUESTION[fmt]))


def normalize_row(row: dict[str, Any], fmt: str, tokenizer: Any = None, require_response: bool = True) -> dict[str, Any]:
    """One source row in format `fmt` -> {prompt, response, answer, task, options, aliases, group}; BadRow if
    unusable (`aliases`: a `qa` row's accepted answers, else empty).

    `require_response=False` (test sets) accepts alpaca / llm_adapters rows with an empty `output`."""
    answer, task, options, aliases = "", "generic", [], []
    if fmt in ("alpaca", "llm_adapters"):
        instruction = _text(row, "instruction")
        prompt = prompt_of(row, fmt)
        response = _text(row, "output", required=require_response)
        if fmt == "llm_adapters":
            c = _classify(instruction, _text(row, "answer", numbers=True))
            task, answer, options = c["task"], c["answer"], c["options"]
    elif fmt == "metamath":
        prompt = prompt_of(row, fmt)
        response = _text(row, "response")
        _text(row, "type", required=False)
        task, answer = "math", _metamath_answer(response)
    elif fmt == "gsm8k":
        prompt = prompt_of(row, fmt)
        response = _text(row, "answer", numbers=True)
        task, answer = "math", _gsm8k_answer(response)
    elif fmt == "math":
        prompt = prompt_of(row, fmt)
        response = _text(row, "solution")
        task, answer = "math", _math_answer(row, response)
    elif fmt == "chat":
        msgs = _messages(row)
        try:
            prompt = render_chat(msgs[:-1], tokenizer)
        except Exception as exc:  # noqa: BLE001 - jinja templates raise their own errors for unsupported roles
            raise BadRow("messages", "rejected by the chat template", str(exc)) from None
        response = msgs[-1]["content"]
    elif fmt == "qa":
        question = _text(row, "question")
        aliases = _aliases(row)
        prompt = render_chat([{"role": "user", "content": question}], tokenizer)
        response, answer, task, options = aliases[0], aliases[0], "qa", _qa_options(row, aliases)
    else:
        raise InvalidInput(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)} (or auto)")
    group = row.get("group")
    return {"prompt": prompt, "response": response, "answer": answer, "task": task, "options": options,
            "aliases": aliases, "group": str(group) if not _is_missing(group) else ""}


def row_id(task: str, prompt: str, response: str) -> str:
    """A stable id from a row's content: `<task>-<16 hex of sha256(prompt, response)>`."""
    digest = hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:16]
    return f"{task}-{digest}"


# ----------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """What `read_records` found: normalised rows, each source's format, and why rows were dropped."""

    rows: list[dict[str, Any]]
    formats: dict[str, str] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    source_rows: int = 0

    def dataset(self) -> Any:
        """The rows as a `datasets.Dataset` (columns of `ROW_KEYS` plus aliases, group, source, source_row)."""
        from datasets import Dataset, Features, List, Value

        features = Features({
            "id": Value("string"), "task": Value("string"), "prompt": Value("string"), "response": Value("string"),
            "answer": Value("string"), "n_options": Value("int32"), "options": List(Value("string")),
            "aliases": List(Value("string")), "group": Value("string"), "source": Value("string"), "source_row": Value("int64"),
        })
        return Dataset.from_dict({k: [r[k] for r in self.rows] for k in features}, features=features)


def normalize_rows(raw: Sequence[RawRow], fmt: str, on_bad_rows: str = "fail", tokenizer: Any = None,
                   loaded: Loaded | None = None, require_response: bool = True) -> Loaded:
    """Normalise the rows of one source in format `fmt` (or `auto`), failing on or skipping bad rows."""
    if on_bad_rows not in ("fail", "skip"):
        raise InvalidInput(f"on_bad_rows must be 'fail' or 'skip', got {on_bad_rows!r}")
    loaded = loaded if loaded is not None else Loaded(rows=[])
    if not raw:
        return loaded
    origin = raw[0].origin
    if fmt == "auto":
        fmt = detect_format(_columns(raw), raw[0].name, (r.data.get("answer") for r in raw if isinstance(r.data, dict)))
    loaded.formats[origin] = fmt
    loaded.source_rows += len(raw)
    for r in raw:
        try:
            if isinstance(r.data, BadRow):
                raise r.data
            row = normalize_row(r.data, fmt, tokenizer, require_response)
        except BadRow as exc:
            if on_bad_rows == "fail":
                raise InvalidInput(f"{r.name}, {r.where}, {exc}. {_SKIP_HINT}") from None
            loaded.dropped[f"bad row: {exc.field} {exc.kind}"] += 1
            log.debug("skipping %s, %s: %s", r.name, r.where, exc)
            continue
        row.update(id=row_id(row["task"], row["prompt"], row["response"]), n_options=len(row["options"]),
                   source=r.origin, source_row=r.index)
        loaded.rows.append(row)
    return loaded


def read_records(source: str | os.PathLike[str], format: str = "auto", on_bad_rows: str = "fail",
                 tokenizer: Any = None, split: str = "train", require_response: bool = True,
                 describe: Callable[[Path], str] | None = None) -> Loaded:
    """Load and normalise a file, a directory of files, an `s3://bucket/prefix` or a Hub dataset id (`name`
    or `name:config`, its `split`). `require_response=False` keeps rows without a target (test sets).

    `describe(path)` names a local file (or the source itself) in messages: the prepare stage reads the
    copy in `data/raw` and names the user's `data.source` file instead."""
    if format != "auto" and format not in FORMATS:
        raise InvalidInput(f"unknown data format {format!r}; use one of auto, {', '.join(FORMATS)}")
    src = str(source)
    path = Path(os.path.expanduser(src))
    loaded = Loaded(rows=[])
    opts = dict(on_bad_rows=on_bad_rows, tokenizer=tokenizer, loaded=loaded, require_response=require_response)
    if src.startswith("s3://"):
        import tempfile

        from milora.core.s3 import download_prefix

        with tempfile.TemporaryDirectory(prefix="milora-s3-") as tmp:
            download_prefix(src, tmp)
            for f in source_files(tmp):
                where = f"{src.rstrip('/')}/{f.relative_to(tmp).as_posix()}"
                raw = [RawRow(where, r.where, r.index, r.data) for r in read_file(f)]
                normalize_rows(raw, format, **opts)  # type: ignore[arg-type]
    elif path.exists():
        for f in source_files(path):
            normalize_rows(read_file(f, describe(f) if describe else None), format, **opts)  # type: ignore[arg-type]
    elif _looks_local(src):
        raise MissingInput(f"data.source {src!r}: no such file or directory")
    else:
        normalize_rows(_hub_rows(src, split), format, **opts)  # type: ignore[arg-type]
    if not loaded.rows:
        reasons = ", ".join(f"{n} {k}" for k, n in sorted(loaded.dropped.items())) or "no rows"
        shown = describe(path) if describe and path.exists() else src
        raise InvalidInput(f"data.source {shown!r}: no usable rows ({reasons})")
    if loaded.dropped:
        log.warning("skipped %d bad rows of %s: %s", sum(loaded.dropped.values()), src, dict(loaded.dropped))
    return loaded


def load_records(source: str | os.PathLike[str], format: str = "auto", on_bad_rows: str = "fail",
                 tokenizer: Any = None, split: str = "train", require_response: bool = True) -> Any:
    """Load a file, directory, `s3://` prefix or Hub id (its `split`) as a `datasets.Dataset` of normalised
    rows, in the source's row order; each row is a record `milora.judge` scores.

    Columns: id, task, prompt, response, answer, n_options, options, aliases, group, source, source_row. Bad rows
    raise a ValueError naming file, row and field (`on_bad_rows="fail"`) or are skipped (`"skip"`).
    `tokenizer` (optional) renders chat rows with its chat template. Test sets whose rows have no target
    text (an empty `output`) load with `require_response=False`.
    """
    return read_records(source, format, on_bad_rows, tokenizer, split, require_response).dataset()


# ----------------------------------------------------------------------------- serving requests

REQUEST_FIELDS = {"messages": "chat", "instruction": "alpaca", "query": "metamath", "question": "gsm8k",
                  "problem": "math"}


def request_prompt(request: Mapping[str, Any], tokenizer: Any = None) -> str:
    """The prompt the model sees for one serving request, built as for training rows: `messages` with the
    tokenizer's chat template (the conversation so far; the reply is generated), `instruction` (+ `input`)
    and the other formats' question fields with the training template, or a raw `prompt` as given."""
    row = {k: v for k, v in request.items() if not _is_missing(v)}
    try:
        if "messages" in row:
            return render_chat(_messages(row, reply=False), tokenizer)
        for name, fmt in REQUEST_FIELDS.items():
            if name in row:
                return prompt_of(row, fmt)
        if "prompt" in row:
            return str(row["prompt"])
    except BadRow as exc:
        raise InvalidInput(f"request {dict(row)!r:.200}: {exc}") from None
    raise InvalidInput(f"request {dict(row)!r:.200}: give `instruction` (and optional `input`), chat `messages` "
                       "or a raw `prompt`")


# ----------------------------------------------------------------------------- tokenization










# ----------------------------------------------------------------------------- dedup and split










# ----------------------------------------------------------------------------- the prepare stage









