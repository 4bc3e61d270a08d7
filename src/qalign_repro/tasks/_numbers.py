"""Final-number extraction and normalisation shared by GSM8K-style tasks (gsm8k, gsm_symbolic, arith).

Strict patterns first ("The answer is 42", "#### 42", "\\boxed{42}"), then, unless ``strict``, the last number
in the text (lm-eval's "flexible-extract"). Numbers are normalised so "$1,000.", "1000.00" and "1000" agree.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"
#: "The answer is 182 * 2 = 364." -> the last number of the sentence that states the answer
_ANSWER_IS = re.compile(r"answer is[:\s]*(.*?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_STRICT = [
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
]
_ANY = re.compile(_NUM)


def normalize_number(raw: str) -> str | None:
    """Canonical decimal string: no "$", commas, spaces or trailing ".0"; None if not a number."""
    s = raw.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str, strict: bool = False) -> str | None:
    stated = [m for m in _ANSWER_IS.findall(text) if _ANY.search(m)]
    if stated:
        return normalize_number(_ANY.findall(stated[-1])[-1])
    for pattern in _STRICT:
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1])
    if strict:
        return None
    matches = _ANY.findall(text)
    return normalize_number(matches[-1]) if matches else None
