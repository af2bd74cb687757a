"""Answer extraction from model text (and, re-exported, answer equivalence).

Extractors return the answer's text (None when there is none); ``equivalent`` decides
whether two answers agree: numerically for numbers and simple LaTeX expressions (a small
parser of our own, never ``eval``), else by normalized string. It lives in
cotrt/control/equivalence.py with ``normalize``: the two halves had grown to 500 lines.

Used by probes (DEER / Dynasor read the answer a probe produced, Dynasor compares the
last k of them) and by benchmark scoring.
"""
from __future__ import annotations

import re

from .equivalence import _BOX_RE, _close_brace, equivalent, normalize

__all__ = ["DEFAULT_METHODS", "equivalent", "extract", "extract_answer_is", "extract_boxed", "extract_hash",
           "extract_last_number", "normalize"]

DEFAULT_METHODS = ("boxed", "hash", "answer_is", "last_number")

# ---------------------------------------------------------------------------- extraction

def extract_boxed(text: str, partial: bool = False) -> str | None:
    """Content of the last top-level ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces kept.

    ``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``; a box wrapping only another box is unwrapped
    (``\\boxed{\\boxed{3}}`` -> ``3``). The last box decides: if it is unterminated the result is
    None, or with ``partial=True`` its content so far (a probe cut off at its token limit). An
    empty box is no answer (None). ``\\boxed`` not followed by ``{`` (prose about the macro)
    is not a box; the brace-less ``\\boxed 5`` form is not read.
    """
    if not isinstance(text, str):
        return None
    last, pos = None, 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            break
        end = _close_brace(text, m.end())
        if end < 0:  # unterminated: it is the last box, everything after is inside it
            last = text[m.end():] if partial else None
            break
        last, pos = text[m.end():end], end + 1
    if last is None:
        return None
    inner = last.strip()
    while True:  # \boxed{\boxed{x}} -> x
        m = _BOX_RE.match(inner)
        if m is None or _close_brace(inner, m.end()) != len(inner) - 1:
            break
        inner = inner[m.end():-1].strip()
    return inner or None


_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:\bfinal\s+answer|\banswer)\s*(?:\*\*)?\s*(?:\bis\b\s*:?|[:：])\s*(?:\*\*)?\s*([^\n]*)",
    re.IGNORECASE)
_TRAIL = " \t.,;:!。"


def _clean_phrase(s: str) -> str | None:
    """Trim a captured answer phrase: a box inside wins; stop at a sentence end ('. ');
    drop markdown bold, '$' and trailing punctuation (a decimal point stays: '3.5.' -> '3.5')."""
    boxed = extract_boxed(s)
    if boxed is not None:
        return boxed
    s = re.split(r"[.!?]\s", s, maxsplit=1)[0]
    s = s.replace("**", "").replace("$", "").strip().rstrip(_TRAIL).strip()
    return s or None


def extract_hash(text: str) -> str | None:
    """GSM8K's ``#### 42``: the text after the last ``####`` on its line."""
    if not isinstance(text, str):
        return None
    found = _HASH_RE.findall(text)
    return _clean_phrase(found[-1]) if found else None


def extract_answer_is(text: str) -> str | None:
    """The last "the answer is X" / "Final answer: X" / "**Answer:** X" (case-insensitive)."""
    if not isinstance(text, str):
        return None
    for m in reversed(list(_ANSWER_IS_RE.finditer(text))):
        ans = _clean_phrase(m.group(1))
        if ans:
            return ans
    return None


# A number: 1,234,567 (groups of three) or 1234; decimals; scientific notation; a fraction
# 3/4. The lookarounds keep digits glued to letters ("x2", "3rd") out, and a minus is a sign
# only where it cannot be a binary minus ("3-5" is 3 and 5).
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?:(?<![\d)])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?(?:/\d+(?:\.\d+)?)?"
    r"|(?<![\w.])-?\.\d+(?:[eE][+-]?\d+)?")


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, thousands separators removed ("1,234" -> "1234")."""
    if not isinstance(text, str):
        return None
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


_EXTRACTORS = {"boxed": extract_boxed, "hash": extract_hash,
               "answer_is": extract_answer_is, "last_number": extract_last_number}


def extract(text: str, methods=DEFAULT_METHODS) -> str | None:
    """The first answer found by ``methods``, tried in order (names of the extractors above)."""
    if isinstance(methods, str):
        methods = (methods,)
    for name in methods:
        if name not in _EXTRACTORS:
            raise ValueError(f"methods: unknown extractor {name!r}; known: {', '.join(_EXTRACTORS)}")
        ans = _EXTRACTORS[name](text)
        if ans:
            return ans
    return None
