"""Data: loading, format detection, normalisation, prompt templates, tokenization, and the `prepare` stage.

Every source (local JSON / JSONL / Parquet / CSV files, a directory of them, a Hub dataset id, or the
embedded synthetic sets) is normalised to the same rows: `prompt` (the full text the model sees,
template applied), `response` (the target), `answer` (the gold final answer where the format has one),
`task` (`math` | `choice` | `generic`) and, for multiple choice, `options` / `n_options`.

Supported formats (auto-detected from the columns, or forced with `data.format`):

* `alpaca`: `instruction`, `input` (optional), `output`;
* `llm_adapters`: `instruction`, `input` (optional), `output`, `answer`: LLM-Adapters' commonsense_170k
  and math_10k, the sets MiLoRA was trained on. The task is read from the row: an `optionK` /
  `answerK` / `solutionK` / `endingK` label with matching option lines, `true`/`false`, or a letter
  with `(A)`-style choices is multiple choice; a number is math; anything else is generic;
* `metamath`: `query`, `response`, `type` (optional); the answer is the text after `The answer is:`;
* `gsm8k`: `question`, `answer` (the worked solution, ending in `#### <number>`);
* `chat`: `messages` (a list of `{role, content}` ending with the assistant's reply), rendered with the
  tokenizer's chat template when it has one, else with plain `### Role:` tags.

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
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMATS = ("alpaca", "llm_adapters", "metamath", "gsm8k", "chat")
EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
TASKS = ("math", "choice", "generic")

# The Alpaca prompt template, as LLM-Adapters uses it for commonsense_170k and math_10k.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_ROLES = ("system", "user", "assistant", "tool")

ROW_KEYS = ("id", "task", "prompt", "response", "answer", "n_options", "options")  # prepared JSONL, in order
_SKIP_HINT = "Fix the row, or set data.on_bad_rows: skip to drop bad rows and count them."


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca / LLM-Adapters prompt for an instruction and an optional input."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


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


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}). "
            "Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; put rows in it or remove it from data.source")
    return text


def _json_rows(path: Path, text: str) -> list[RawRow]:
    origin = str(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of row objects")
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


def _csv_rows(path: Path, text: str) -> list[RawRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise ValueError(f"{path}: the CSV file has no header row")
    out = []
    for i, row in enumerate(reader, 1):
        extra = row.pop(None, None)  # type: ignore[call-overload]
        data: dict[str, Any] | BadRow = row
        if extra:
            data = BadRow("<row>", "wrong type", f"{len(extra)} more values than header columns")
        out.append(RawRow(str(path), f"row {i}", i, data))
    return out


def _parquet_rows(path: Path) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; put rows in it or remove it from data.source")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    return [RawRow(str(path), f"row {i}", i, r) for i, r in enumerate(table.to_pylist(), 1)]


def read_file(path: str | os.PathLike[str]) -> list[RawRow]:
    """The rows of one local JSON / JSONL / Parquet / CSV file, in file order (empty files are errors)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(p)
    elif suffix in (".json", ".jsonl"):
        rows = _json_rows(p, _read_text(p))
    elif suffix == ".csv":
        rows = _csv_rows(p, _read_text(p))
    else:
        raise ValueError(f"{p}: unsupported file type '{suffix}'; use one of {', '.join(EXTENSIONS)}")
    if not rows:
        raise ValueError(f"{p}: the file has no rows")
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
        raise ValueError(f"{p}: the directory holds no data files ({', '.join(EXTENSIONS)})")
    return files


def _looks_local(source: str) -> bool:
    """A path-like string (a Hub id is `name` or `owner/name`, without a data file extension)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.lower().endswith(EXTENSIONS)


def load_hub_dataset(source: str) -> Any:
    """The `train` split of a Hub dataset id (`name`, `owner/name` or `owner/name:config`), as published.

    Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) with no cached copy, a ValueError says how to point at
    local files instead.
    """
    import datasets

    name, _, config = source.removeprefix("hf://").partition(":")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load this id"
        if offline:
            raise ValueError(
                f"data.source {source!r} is not a local file or directory, and the Hugging Face Hub is offline "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) with no cached copy of that dataset. Download it "
                "while online, or point data.source at local JSON / JSONL / Parquet / CSV files."
            ) from None
        raise ValueError(f"data.source {source!r}: cannot load it from the Hugging Face Hub: {exc}") from None


def _hub_rows(source: str) -> list[RawRow]:
    return [RawRow(f"hub:{source}", f"row {i}", i, dict(r)) for i, r in enumerate(load_hub_dataset(source), 1)]


# ----------------------------------------------------------------------------- format detection


def detect_format(columns: Iterable[str], origin: str = "data") -> str:
    """The format a set of column names describes (see the module docstring), or a ValueError."""
    cols = set(columns)
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
    raise ValueError(
        f"{origin}: cannot tell the data format from its columns {sorted(cols)}. Expected one of: alpaca "
        "(instruction, input, output), llm_adapters (instruction, input, output, answer), metamath (query, "
        "response, type), gsm8k (question, answer), chat (messages). Rename the columns or set data.format."
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
        raise BadRow("answer", "no final answer", "expected the solution to end with '#### <number>'")
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


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
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
    if out[-1]["role"] != "assistant":
        raise BadRow("messages", "no reply", "the last message must be the assistant's reply (role 'assistant')")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise BadRow("messages", "no prompt", "there is no user message before the assistant's reply")
    return out


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any = None) -> str:
    """The prompt text of a conversation up to the reply: the tokenizer's chat template, else `### Role:` tags."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    turns = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return turns + "### Assistant:\n"


def normalize_row(row: dict[str, Any], fmt: str, tokenizer: Any = None) -> dict[str, Any]:
    """One source row in format `fmt` -> {prompt, response, answer, task, options, group}; BadRow if unusable."""
    answer, task, options = "", "generic", []
    if fmt in ("alpaca", "llm_adapters"):
        instruction = _text(row, "instruction")
        prompt = format_prompt(instruction, _text(row, "input", required=False))
        response = _text(row, "output")
        if fmt == "llm_adapters":
            c = _classify(instruction, _text(row, "answer", numbers=True))
            task, answer, options = c["task"], c["answer"], c["options"]
    elif fmt == "metamath":
        prompt = format_prompt(_text(row, "query"))
        response = _text(row, "response")
        _text(row, "type", required=False)
        task, answer = "math", _metamath_answer(response)
    elif fmt == "gsm8k":
        prompt = format_prompt(_text(row, "question"))
        response = _text(row, "answer", numbers=True)
        task, answer = "math", _gsm8k_answer(response)
    elif fmt == "chat":
        msgs = _messages(row)
        try:
            prompt = render_chat(msgs[:-1], tokenizer)
        except Exception as exc:  # noqa: BLE001 - jinja templates raise their own errors for unsupported roles
            raise BadRow("messages", "rejected by the chat template", str(exc)) from None
        response = msgs[-1]["content"]
    else:
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)} (or auto)")
    group = row.get("group")
    return {"prompt": prompt, "response": response, "answer": answer, "task": task, "options": options,
            "group": str(group) if not _is_missing(group) else ""}


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
        """The rows as a `datasets.Dataset` (columns of `ROW_KEYS` plus group, source, source_row)."""
        from datasets import Dataset, Features, List, Value

        features = Features({
            "id": Value("string"), "task": Value("string"), "prompt": Value("string"), "response": Value("string"),
            "answer": Value("string"), "n_options": Value("int32"), "options": List(Value("string")),
            "group": Value("string"), "source": Value("string"), "source_row": Value("int64"),
        })
        return Dataset.from_dict({k: [r[k] for r in self.rows] for k in features}, features=features)


def normalize_rows(raw: Sequence[RawRow], fmt: str, on_bad_rows: str = "fail", tokenizer: Any = None,
                   loaded: Loaded | None = None) -> Loaded:
    """Normalise the rows of one source in format `fmt` (or `auto`), failing on or skipping bad rows."""
    if on_bad_rows not in ("fail", "skip"):
        raise ValueError(f"on_bad_rows must be 'fail' or 'skip', got {on_bad_rows!r}")
    loaded = loaded if loaded is not None else Loaded(rows=[])
    if not raw:
        return loaded
    origin = raw[0].origin
    if fmt == "auto":
        fmt = detect_format(_columns(raw), origin)
    loaded.formats[origin] = fmt
    loaded.source_rows += len(raw)
    for r in raw:
        try:
            if isinstance(r.data, BadRow):
                raise r.data
            row = normalize_row(r.data, fmt, tokenizer)
        except BadRow as exc:
            if on_bad_rows == "fail":
                raise ValueError(f"{r.origin}, {r.where}, {exc}. {_SKIP_HINT}") from None
            loaded.dropped[f"bad row: {exc.field} {exc.kind}"] += 1
            log.debug("skipping %s, %s: %s", r.origin, r.where, exc)
            continue
        row.update(id=row_id(row["task"], row["prompt"], row["response"]), n_options=len(row["options"]),
                   source=r.origin, source_row=r.index)
        loaded.rows.append(row)
    return loaded


def read_records(source: str | os.PathLike[str], format: str = "auto", on_bad_rows: str = "fail",
                 tokenizer: Any = None) -> Loaded:
    """Load and normalise a file, a directory of files, or a Hub dataset id (`name` or `name:config`)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; use one of auto, {', '.join(FORMATS)}")
    src = str(source)
    if src.startswith("s3://"):
        raise ValueError(f"data.source {src!r}: S3 sources are fetched into a local directory first; "
                         "point the loader at that directory")
    path = Path(os.path.expanduser(src))
    loaded = Loaded(rows=[])
    if path.exists():
        for f in source_files(path):
            normalize_rows(read_file(f), format, on_bad_rows, tokenizer, loaded)
    elif _looks_local(src):
        raise FileNotFoundError(f"data.source {src!r}: no such file or directory")
    else:
        normalize_rows(_hub_rows(src), format, on_bad_rows, tokenizer, loaded)
    if not loaded.rows:
        reasons = ", ".join(f"{n} {k}" for k, n in sorted(loaded.dropped.items())) or "no rows"
        raise ValueError(f"data.source {src!r}: no usable rows ({reasons})")
    if loaded.dropped:
        log.warning("skipped %d bad rows of %s: %s", sum(loaded.dropped.values()), src, dict(loaded.dropped))
    return loaded


def load_records(source: str | os.PathLike[str], format: str = "auto", on_bad_rows: str = "fail",
                 tokenizer: Any = None) -> Any:
    """Load a file, directory or Hub id as a `datasets.Dataset` of normalised rows, in the source's row order.

    Columns: id, task, prompt, response, answer, n_options, options, group, source, source_row. Bad rows
    raise a ValueError naming file, row and field (`on_bad_rows="fail"`) or are skipped (`"skip"`).
    `tokenizer` (optional) renders chat rows with its chat template.
    """
    return read_records(source, format, on_bad_rows, tokenizer).dataset()


# ----------------------------------------------------------------------------- tokenization


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    eos_id = tokenizer.eos_token_id
    if ids and eos_id is not None and ids[-1] == eos_id and not prompt.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # some tokenizers append EOS to every text; a prompt must not end the sequence
    return list(ids)


def tokenize_pair(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with BOS as the tokenizer adds it) and of the response (with EOS appended).

    The pair is tokenized as one text when that keeps the prompt's tokens a prefix (so the response is
    tokenized as in context), else separately.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token: cannot mark the end of a response")
    p_ids = _prompt_ids(tokenizer, prompt)
    full = _prompt_ids(tokenizer, prompt + response)
    if full[: len(p_ids)] == p_ids:
        r_ids = full[len(p_ids):]
    else:
        r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return p_ids, r_ids + [tokenizer.eos_token_id]


def _fit(n_prompt: int, n_response: int, max_length: int) -> tuple[int, int]:
    """How many prompt and response tokens to keep within `max_length` (some response always survives)."""
    if n_prompt + n_response <= max_length:
        return n_prompt, n_response
    keep_r = min(n_response, max(max_length - n_prompt, max(1, max_length // 4)))
    return max_length - keep_r, keep_r


def encode(tokenizer: Any, prompt: str, response: str, max_length: int, padding: bool = False) -> dict[str, Any]:
    """Token ids, labels (-100 on prompt and padding: loss on the response only), attention mask, truncated flag.

    EOS is appended to the response. Over-long rows are truncated to `max_length`: the response keeps at
    least a quarter of `max_length` (all of it if shorter) and is cut from its end; the prompt keeps as
    much of its *end* as fits (plus BOS), so the tokens next to the response always remain and every row
    has response tokens to learn from. `padding=True` right-pads to `max_length`.
    """
    p_ids, r_ids = tokenize_pair(tokenizer, prompt, response)
    keep_p, keep_r = _fit(len(p_ids), len(r_ids), max_length)
    truncated = keep_p < len(p_ids) or keep_r < len(r_ids)
    if keep_p < len(p_ids):
        head = p_ids[:1] if p_ids and p_ids[0] == tokenizer.bos_token_id and keep_p > 1 else []
        p_ids = head + p_ids[len(p_ids) - (keep_p - len(head)):]
    r_ids = r_ids[:keep_r]
    input_ids = p_ids + r_ids
    labels = [-100] * len(p_ids) + r_ids
    attention = [1] * len(input_ids)
    if padding and len(input_ids) < max_length:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        n = max_length - len(input_ids)
        input_ids, labels, attention = input_ids + [pad_id] * n, labels + [-100] * n, attention + [0] * n
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "truncated": truncated}


# ----------------------------------------------------------------------------- dedup and split


def dedup(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Drop exact duplicates (same prompt and response), keeping the first; returns (rows, number dropped)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        key = (r["prompt"], r["response"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, len(rows) - len(out)


def _unit(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()[:16], 16) / 2**64


@dataclass
class Split:
    """A train/eval split and what the eval cap did."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    capped_to_train: int = 0
    capped_dropped: int = 0


def split_rows(rows: Sequence[dict[str, Any]], eval_fraction: float, max_eval_rows: int, seed: int = 0) -> Split:
    """Deterministic split by hashing each row's group (or id) with the seed; eval capped at `max_eval_rows`.

    A row's side depends only on its own content and the seed, so appending data never moves existing
    rows between splits. Groups stay whole; eval groups beyond the cap go to train. Both splits are
    ordered by a seeded hash of the row id (a shuffle that interleaves tasks).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("group") or r["id"], []).append(r)
    ranked = sorted(groups, key=lambda g: (_unit(seed, g), g))
    chosen = [g for g in ranked if _unit(seed, g) < eval_fraction]
    if not chosen and len(ranked) > 1:
        chosen = ranked[:1]  # tiny sources still get an eval row
    if len(chosen) == len(ranked) and len(ranked) > 1:
        chosen = chosen[:-1]
    eval_rows: list[dict[str, Any]] = []
    held = set(chosen)
    train_rows = [r for g in ranked if g not in held for r in groups[g]]
    capped_to_train = capped_dropped = 0
    for g in chosen:
        room = max_eval_rows - len(eval_rows)
        if room >= len(groups[g]):
            eval_rows.extend(groups[g])
        elif room > 0 and not eval_rows:  # a single group larger than the cap: take part, drop the rest
            eval_rows.extend(groups[g][:room])
            capped_dropped += len(groups[g]) - room
        else:
            train_rows.extend(groups[g])
            capped_to_train += len(groups[g])
    order = lambda r: (_unit(seed, r["id"]), r["id"])  # noqa: E731
    return Split(sorted(train_rows, key=order), sorted(eval_rows, key=order), capped_to_train, capped_dropped)


# ----------------------------------------------------------------------------- the prepare stage


def _percentiles(values: Sequence[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 90, 95, 99)}
    out.update(mean=round(float(a.mean()), 2), max=int(a.max()), min=int(a.min()))
    return out


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps({k: r[k] for k in ROW_KEYS}, ensure_ascii=False) + "\n" for r in rows)


def _short_origin(origin: str, raw_dir: Path) -> str:
    """A machine-independent name for a source file in metrics: its path inside the raw data directory."""
    p = Path(origin)
    return p.relative_to(raw_dir).as_posix() if p.is_relative_to(raw_dir) and p != raw_dir else p.name


def prepare_stage(cfg: Any, paths: Any) -> None:
    """Normalise, dedup, tokenize-check and split `data/raw` (written by `ingest`); write train/eval JSONL and
    metrics/data.json. The output depends only on the raw files, the tokenizer and the data params."""
    from milora.base import load_tokenizer
    from milora.io import atomic_write_text, write_json

    t0 = time.perf_counter()
    d = cfg.data
    raw = paths.raw_dir
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw} not found: run `milora stage ingest` first (it copies data.source there)")
    tokenizer = load_tokenizer(cfg, paths)
    loaded = read_records(raw, d.format, d.on_bad_rows, tokenizer)
    rows = loaded.rows
    dropped = Counter(loaded.dropped)
    if d.dedup:
        rows, n_dup = dedup(rows)
        if n_dup:
            dropped["duplicate"] = n_dup
    else:  # keep duplicates, but give them distinct ids
        seen: Counter[str] = Counter()
        for r in rows:
            seen[r["id"]] += 1
            if seen[r["id"]] > 1:
                r["id"] = f"{r['id']}-{seen[r['id']]}"
    lengths: dict[str, list[int]] = {"prompt": [], "response": [], "total": []}
    truncated: set[str] = set()
    for r in rows:
        p_ids, r_ids = tokenize_pair(tokenizer, r["prompt"], r["response"])
        lengths["prompt"].append(len(p_ids))
        lengths["response"].append(len(r_ids))
        lengths["total"].append(len(p_ids) + len(r_ids))
        if len(p_ids) + len(r_ids) > d.max_length:
            truncated.add(r["id"])
    split = split_rows(rows, d.eval_fraction, d.max_eval_rows, d.seed)
    out = paths.prepared_dir
    atomic_write_text(out / "train.jsonl", _jsonl(split.train))
    atomic_write_text(out / "eval.jsonl", _jsonl(split.eval))
    if split.capped_dropped:
        dropped["eval cap (rest of an oversized group)"] = split.capped_dropped
    metrics = {
        "source": d.source,
        "formats": {_short_origin(k, raw): v for k, v in loaded.formats.items()},
        "rows": {"source": loaded.source_rows, "loaded": len(loaded.rows), "kept": len(rows),
                 "train": len(split.train), "eval": len(split.eval)},
        "dropped": dict(sorted(dropped.items())),
        "eval_capped_to_train": split.capped_to_train,
        "tasks": {name: dict(sorted(Counter(r["task"] for r in part).items()))
                  for name, part in (("train", split.train), ("eval", split.eval))},
        "truncated": {"max_length": d.max_length, "train": sum(r["id"] in truncated for r in split.train),
                      "eval": sum(r["id"] in truncated for r in split.eval)},
        "token_lengths": {k: _percentiles(v) for k, v in lengths.items()},
    }
    write_json(paths.metrics("data"), metrics)
    log.info("prepare: %d rows (%d train, %d eval, dropped %s, truncated %d) -> %s in %.1fs",
             len(loaded.rows), len(split.train), len(split.eval), dict(dropped) or "none", len(truncated), out,
             time.perf_counter() - t0)

