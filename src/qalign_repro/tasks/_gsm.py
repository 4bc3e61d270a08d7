"""Shared grading for GSM8K-style tasks: a word problem, a worked solution ending in ``#### <number>``."""

from __future__ import annotations

import re
from typing import Any

from qalign_repro.errors import DataError
from qalign_repro.tasks._numbers import extract_final_number, normalize_number
from qalign_repro.tasks._prompt import Messages, chat_prompt
from qalign_repro.tasks.base import Doc, Task

_FINAL = re.compile(r"####\s*(.+?)\s*$")
_HASHES = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_CALC = re.compile(r"<<[^<>]*>>")
#: the fields every GSM-style row needs (``check_row`` kinds)
GSM_FIELDS = {"question": "text", "answer": "text"}


def solution_final_number(solution: str, where: str) -> str:
    """The normalised number on a solution's last ``####`` line."""
    lines = [ln for ln in solution.strip().splitlines() if "####" in ln]
    match = _FINAL.search(lines[-1]) if lines else None
    value = normalize_number(match.group(1)) if match else None
    if value is None:
        raise DataError(f"{where}: field 'answer' has no '#### <number>' line (got ...{solution[-60:]!r}); "
                        "allowed: a worked solution ending in '#### <number>'")
    return value


def strip_calculator(solution: str) -> str:
    """GSM8K solutions carry calculator annotations ``<<48/2=24>>``; drop them."""
    return _CALC.sub("", solution)


class GSMStyleTask(Task):
    """doc: ``{"id", "question", "answer"}`` with ``answer`` a worked solution ending in ``#### N``."""

    mbr_kind = "exact"

    def prompt(self, doc: Doc) -> Messages:
        return chat_prompt(self.cfg.get("prompt"), {"question": doc["question"]}, self.name)

    def extract(self, text: str) -> str | None:
        """``#### N`` (GSM8K's own final-answer line) when present, else ``extract_final_number``."""
        marked = _HASHES.findall(text)
        if marked:
            value = normalize_number(marked[-1])
            if value is not None:
                return value
        return extract_final_number(text, strict=bool(self.cfg.get("strict_extract", False)))

    def gold(self, doc: Doc) -> str:
        if "gold" not in doc:
            doc["gold"] = solution_final_number(doc["answer"], f"{self.name} doc {doc.get('id')!r}")
        return doc["gold"]

    def grade(self, doc: Doc, text: str) -> dict[str, Any]:
        answer = self.extract(text)
        return {"answer": answer, "correct": answer is not None and answer == self.gold(doc), "valid": answer is not None}

    def oracle_completion(self, doc: Doc) -> str:
        """The reference solution itself (reasoning + ``#### N``), calculator annotations removed."""
        return strip_calculator(doc["answer"])
