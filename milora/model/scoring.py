"""Answer extraction and scoring, one rule for every suite: `judge(record, prediction)`.

`record` is a row as `milora.load_records` returns it (`task`, `answer`, `n_options`, ...); its gold answer
says how a prediction is read (an option label of the set's vocabulary, a number, a MATH answer, text).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from milora.core.errors import InvalidInput
from milora.model import latex

_NUM = r"[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?"


_NUM_RE = re.compile(_NUM)


_ANSWER_CUES = re.compile(r"(?:####|answer\s*(?:is|:|=)|answer\s+would\s+be|result\s+is|total\s+is)", re.I)


def parse_number(token: str) -> float | None:
    t = token.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    if "/" in t:
        num, den = t.split("/", 1)
        try:
            frac = Fraction(num) / Fraction(den)
        except (ValueError, ZeroDivisionError):
            return None
        return float(frac)
    try:
        return float(t)
    except ValueError:
        return None


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUM_RE.finditer(text):
        tok = m.group(0)
        end = m.end()
        # a date-like a/b/c or a version-like 1.2.3 is not a number we can trust
        if end < len(text) and text[end] in "/" and "/" in tok:
            continue
        out.append(tok)
    return out


def extract_number(text: str) -> float | None:
    """The final numeric answer of a generated math solution (GSM8K conventions), or None."""
    if not text:
        return None
    cues = list(_ANSWER_CUES.finditer(text))
    if cues:
        tail = text[cues[-1].end():]
        nums = _numbers(tail)
        if nums:
            return parse_number(nums[0])
    nums = _numbers(text)
    return parse_number(nums[-1]) if nums else None


# ----------------------------------------------------------------------------- open questions (NQ-open / TriviaQA)

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_DECIMAL = re.compile(r"^(\d+)\.(\d*?)0*$")


def _number_token(token: str) -> str:
    """`100.0` -> `100`, `8.50` -> `8.5`: a decimal written with trailing zeros is the same number."""
    m = _DECIMAL.match(token)
    return token if m is None else m.group(1) + (f".{m.group(2)}" if m.group(2) else "")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation for open questions: lowercase, punctuation and articles (a, an, the)
    removed, white space collapsed. Punctuation separates words, as in TriviaQA's evaluation ("90-degree"
    holds `90`, "Newton's" holds `newton`), except the dot after a single letter (`U.S.A.` is `usa`, as in
    SQuAD). Numbers: a comma between digits is dropped (`1,000` is `1000`), a decimal point between digits is
    kept (`8.5` stays apart from `85`) and trailing decimal zeros are not (`100.0` is `100`). Other scripts:
    accents are folded (`Bogotá` is `bogota`), Unicode symbols separate words (`0°C` holds `0`) and
    compatibility forms read as their plain letters (`H₂O` is `h2o`)."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    out = []
    for i, c in enumerate(text):
        between_digits = 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit()
        initial = c == "." and i > 0 and text[i - 1].isalpha() and (i < 2 or not text[i - 2].isalpha())
        if c in ".," and between_digits:
            out.append("." if c == "." else "")
        elif initial:  # the dots of initials and abbreviations: `U.S.A.` is `usa`, `J.K.` is `jk`
            out.append("")
        elif unicodedata.category(c)[0] in "PS":  # ASCII punctuation is category P or S too
            out.append(" ")
        else:
            out.append(c)
    return " ".join(_number_token(t) for t in _ARTICLES.sub(" ", "".join(out)).split())


def aliases_of(record: Mapping[str, Any]) -> list[str]:
    """The accepted answers of an open question: its `aliases`, else its `answer`."""
    aliases = record.get("aliases")
    if aliases:
        return [str(a) for a in aliases]
    return [str(record.get("answer", ""))]


def contains_answer(prediction: str, aliases: Sequence[str]) -> bool:
    """Whether any alias, normalised, is a whole-word span of the normalised prediction (`8` is in "it is 8."
    but not in "18", "80" or "8.5")."""
    pred = f" {normalize_answer(prediction or '')} "
    return any(a and f" {a} " in pred for a in (normalize_answer(x) for x in aliases))


def gold_option(options: Sequence[str], aliases: Sequence[str]) -> int | None:
    """The 0-based index of the one option that contains an alias (as `contains_answer` judges a reply: an
    option may be a bare answer or a whole reply sentence); None when none or several do."""
    hits = [i for i, o in enumerate(options) if contains_answer(o, aliases)]
    return hits[0] if len(hits) == 1 else None


# ----------------------------------------------------------------------------- the one scoring rule

_LABEL = re.compile(r"(option|answer|solution|ending)\s*(\d+)", re.I)
_BOOL = re.compile(r"\b(true|false)\b", re.I)
# An option letter: `(C)`, or a standalone capital A-E that does not start a lowercase phrase ("A car ...").
_LETTER = re.compile(r"\(([A-E])\)|\b([A-E])\b(?!\s+[a-z])")
_FINAL_CUE = re.compile(r"(?:####|the answer is\s*:?|answer\s*:)\s*", re.I)

Extracted = str | float | None


def answer_kind(record: Mapping[str, Any]) -> str:
    """How a record's gold answer is judged: `qa` (open question, any alias in the answer), `label`
    (optionK / answerK / solutionK / endingK), `bool` (true/false), `letter` (A-E), `number`, `latex` (a MATH
    answer that is not a plain number), `text`, or `none` (no gold answer: loss / perplexity only)."""
    answer = str(record.get("answer") if record.get("answer") is not None else "").strip()
    if not answer:
        return "none"
    if record.get("task") == "qa":
        return "qa"
    if record.get("task") == "choice" or record.get("n_options"):
        if _LABEL.fullmatch(answer):
            return "label"
        if answer.lower() in ("true", "false"):
            return "bool"
        if re.fullmatch(r"[A-E]", answer):
            return "letter"
    if parse_number(answer) is not None and re.fullmatch(r"[-−$\d.,/ ]+", answer):
        return "number"
    if record.get("task") == "math":
        return "latex"
    return "text"


def _label(text: str) -> tuple[str, int] | None:
    m = _LABEL.fullmatch(text.strip())
    return (m.group(1).lower(), int(m.group(2))) if m else None


def option_index(record: Mapping[str, Any]) -> int | None:
    """The 1-based option a multiple-choice record's gold answer names (`option2` -> 2, true -> 1, `C` -> 3)."""
    kind, answer = answer_kind(record), str(record.get("answer", "")).strip()
    if kind == "label":
        return _label(answer)[1]  # type: ignore[index]
    if kind == "bool":
        return 1 if answer.lower() == "true" else 2
    if kind == "letter":
        return ord(answer) - ord("A") + 1
    return None


def extract_option(text: str, record: Mapping[str, Any]) -> str | None:
    """The option a generated answer picks, in the record's answer vocabulary, by the LLM-Adapters rule: the
    first mention of a label of that vocabulary (`optionK` for WinoGrande, `answerK` for SIQA / ARC / OBQA,
    `solutionK` for PIQA, `endingK` for HellaSwag, `true`/`false` for BoolQ, a letter for AQuA). Labels are
    matched case-insensitively as whole words; a label out of the record's range is still the pick (and wrong)."""
    kind = answer_kind(record)
    if not text:
        return None
    if kind == "label":
        word = _label(str(record["answer"]))[0]  # type: ignore[index]
        m = re.search(rf"\b{word}\s*(\d+)\b", text, re.I)
        return f"{word}{int(m.group(1))}" if m else None
    if kind == "bool":
        m = _BOOL.search(text)
        return m.group(1).lower() if m else None
    if kind == "letter":
        m = _LETTER.search(text)
        return (m.group(1) or m.group(2)) if m else None
    return None


def final_answer(text: str) -> str | None:
    """The final answer text of a worked solution: the last `\\boxed{...}`, else what follows the last
    `The answer is` / `####` / `Answer:` cue on its line (MetaMath, GSM8K, LLM-Adapters outputs), else None."""
    boxed = latex.last_boxed(text)
    if boxed is not None:
        return boxed
    cues = list(_FINAL_CUE.finditer(text or ""))
    if cues:
        tail = text[cues[-1].end():].strip().split("\n", 1)[0].strip()
        return tail.rstrip(".").strip() or None
    return None


def extract(record: Mapping[str, Any], prediction: str) -> Extracted:
    """The answer `prediction` gives, in the form `judge` compares: an option label, a number, or a
    normalised LaTeX / text answer; None when it gives none."""
    kind = answer_kind(record)
    if kind in ("label", "bool", "letter"):
        return extract_option(prediction, record)
    if kind == "qa":
        return normalize_answer(prediction or "") or None
    if kind == "number":
        boxed = latex.last_boxed(prediction or "")
        if boxed is not None:
            value = latex.to_number(boxed)
            return value if value is not None else extract_number(boxed)
        return extract_number(prediction)
    if kind == "latex":
        final = final_answer(prediction or "")
        return latex.normalize(final) if final is not None else None
    if kind == "text":
        final = final_answer(prediction or "") or (prediction or "").strip().split("\n", 1)[0]
        return _plain(final) or None
    raise InvalidInput(
        f"record {record.get('id', '')!r} has no gold answer to judge (task {record.get('task')!r}): alpaca and "
        "chat rows are scored by loss / perplexity only"
    )


def _plain(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def judge(record: Mapping[str, Any], prediction: str) -> bool:
    """Whether `prediction` (generated text) answers `record` (a row as `milora.load_records` returns it)
    correctly. The one scoring rule of the evaluate stage, `milora eval` and the benchmark suites:

    * multiple choice: the first mention of a label of the record's answer vocabulary (LLM-Adapters);
    * numbers (GSM8K, math_10k, AddSub, MultiArith, SingleEq, SVAMP, MetaMath): the final number (a
      `\\boxed{}` answer, else after `The answer is` / `####`, else the last number), compared as numbers:
      commas, `$`, fractions and `-0` are fine;
    * MATH answers: the last `\\boxed{...}` (or the text after `The answer is`), equal to the gold answer
      after the standard LaTeX normalisation (`milora.model.latex`), or equal in value when both are numbers;
    * open questions (`qa`: NQ-open / TriviaQA layout): any accepted alias, SQuAD-normalised, a whole-word
      span of the normalised prediction (`normalize_answer`, `contains_answer`);
    * other answers: the final answer equal to the gold one, ignoring case, spaces and a final period.

    A record with no gold answer (alpaca, chat) raises InvalidInput: those are scored by loss only.
    """
    got = extract(record, prediction)
    if got is None:
        return False
    kind, gold = answer_kind(record), str(record.get("answer", "")).strip()
    if kind == "qa":
        return contains_answer(prediction, aliases_of(record))
    if kind in ("label", "bool", "letter"):
        return str(got).lower() == gold.lower() if kind != "letter" else got == gold
    if kind == "number":
        want = parse_number(gold)
        return isinstance(got, float) and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if kind == "latex":
        if got == latex.normalize(gold):
            return True
        a, b = latex.to_number(str(got)), latex.to_number(gold)
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return got == _plain(gold)
