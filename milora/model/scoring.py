"""Answer extraction and scoring: the final number of a math answer, the option picked in multiple choice."""

from __future__ import annotations

import re
from fractions import Fraction

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


_CHOICE_RE = re.compile(r"\b(?:option|answer|solution|ending|choice)\s*#?\s*(\d+)\b", re.I)


_LETTER_RE = re.compile(r"(?:answer\s*(?:is|:)\s*\(?|^\(?)([A-Ea-e])(?:\)|\.|\b)", re.I)


_BOOL_RE = re.compile(r"\b(true|false)\b", re.I)


def extract_choice(text: str, n_options: int) -> int | None:
    """The 1-based option a generated multiple-choice answer picks (LLM-Adapters style), or None."""
    if not text or n_options < 1:
        return None
    cue = re.search(r"correct\s+answer\s+is|answer\s+is|answer\s*:", text, re.I)
    region = text[cue.start():] if cue else text
    m = _CHOICE_RE.search(region) or (_CHOICE_RE.search(text) if cue else None)
    if m:
        k = int(m.group(1))
        return k if 1 <= k <= n_options else None
    if n_options == 2:
        b = _BOOL_RE.search(region)
        if b:
            return 1 if b.group(1).lower() == "true" else 2
    letter = _LETTER_RE.search(region.strip())
    if letter:
        k = ord(letter.group(1).upper()) - ord("A") + 1
        return k if 1 <= k <= n_options else None
    return None


def gold_choice(answer: str) -> int | None:
    """The 1-based option index of a gold label like `option2`, `answer3`, `true`/`false`."""
    return extract_choice(f"the correct answer is {answer}", max(2, _max_index(answer)))


def _max_index(answer: str) -> int:
    m = re.search(r"(\d+)", answer or "")
    return int(m.group(1)) if m else 2

