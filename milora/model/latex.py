"""MATH (Hendrycks et al.) answers: the final `\\boxed{...}` of a solution, and the standard normalisation of
LaTeX answers before comparing them, so that `\\frac12`, `\\dfrac{1}{2}` and `1/2` are one answer.

The normalisation follows the one published with the MATH benchmark (and used by MetaMath and
lm-evaluation-harness' `hendrycks_math`): line breaks and `\\!` removed, `\\tfrac`/`\\dfrac` -> `\\frac`,
`\\left`/`\\right` dropped, degrees (`^\\circ`), dollar signs and percent signs removed, units written as a
trailing `\\text{ ...}` removed, a short `x = ` prefix dropped, `\\sqrt3` -> `\\sqrt{3}`, spaces removed,
`\\frac12` -> `\\frac{1}{2}`, `a/b` -> `\\frac{a}{b}`. On top of it: thousands separators and a trailing
`.0` of plain numbers go, and `\\text{...}` around a word is unwrapped.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def _group(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at `text[start] == '{'`, and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1: i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`, or None."""
    found = None
    for m in _BOXED.finditer(text or ""):
        end = m.end()
        if end < len(text) and text[end] == "{":
            group = _group(text, end)
            if group is not None:
                found = group[0]
        elif m.group(0).endswith(" "):  # `\boxed 5`: up to the next space or `$`
            found = re.split(r"[\s$]", text[end:], maxsplit=1)[0] or found
    return found.strip() if found is not None else None


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`, `\\frac{a}b` -> `\\frac{a}{b}`."""
    head, *parts = s.split("\\frac")
    out = [head]
    for part in parts:
        args: list[str] = []
        rest = part
        for _ in range(2):
            if rest.startswith("{"):
                group = _group(rest, 0)
                if group is None:
                    return s
                args.append(group[0])
                rest = rest[group[1]:]
            elif rest:
                args.append(rest[0])
                rest = rest[1:]
            else:
                return s
        out.append("\\frac{" + args[0] + "}{" + args[1] + "}" + rest)
    return "".join(out)


def _fix_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    return re.sub(r"\\sqrt(?!\s*[{\[])\s*(\w)", r"\\sqrt{\1}", s)


_TRAILING_UNITS = re.compile(r"^(.+?)\\(?:text|mbox|textbf|mathrm)\{\s[^{}]*\}$")
_TEXT = re.compile(r"\\(?:text|mbox|textbf|mathrm)\{([^{}]*)\}")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize(answer: str) -> str:
    """A LaTeX answer in the canonical form two equal answers share (see the module docstring)."""
    s = str(answer).strip()
    for old, new in (("\n", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\\\", "\\"), ("tfrac", "frac"),
                     ("dfrac", "frac"), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""),
                     ("\\$", ""), ("$", "")):
        s = s.replace(old, new)
    units = _TRAILING_UNITS.match(s)
    if units:
        s = units.group(1)
    s = _TEXT.sub(r"\1", s).replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.").strip()
    if s.startswith("."):
        s = "0" + s
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs.strip()) <= 2:
        s = rhs
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        s = f"\\frac{{{num}}}{{{den}}}"
    if _PLAIN_NUMBER.fullmatch(s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
    return s.rstrip(".")


def to_number(answer: str) -> float | None:
    """The value of a normalised answer that is a plain number, `\\frac{a}{b}` or `a/b` (signed), else None."""
    s = normalize(answer)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    try:
        if m:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return float(-value if m.group(1) else value)
        if re.fullmatch(r"-?\d+(?:\.\d+)?", s):
            return float(s)
    except ZeroDivisionError:
        return None
    return None
