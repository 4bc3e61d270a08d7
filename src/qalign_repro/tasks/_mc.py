"""Multiple-choice helpers shared by MMLU-Redux and TruthfulQA: deterministic option shuffling, lettered option
lists, and letter extraction from free-form reasoning.

Extraction order (the last match of the first rule that matches wins; letters outside the doc's options are
invalid):

1. an explicit statement: "The answer is (C)", "answer: c.", "Answer: **B**", "\\boxed{B}";
   lower-case letters only in parentheses or followed by punctuation / end of text ("the answer is a bit" is not "A");
2. the same with "option"/"choice" as the keyword ("... so option C");
3. a last line that is only the letter: "C", "(C)", "**C**", "C) Paris";
4. the last parenthesised capital letter anywhere, "(C)";
5. only with ``letter_fallback: true``: the last stand-alone capital letter A-J (the authors' ``get_last_option``).

No rule matching -> None (an invalid output, counted wrong).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from qalign_repro.errors import DataError
from qalign_repro.tasks._prompt import Messages, chat_prompt
from qalign_repro.tasks.base import Doc, Task

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_LEAD = r"(?:\s+(?:is|was|would\s+be|should\s+be|must\s+be))?\s*(?:[:\-=]\s*)?(?:is\s+)?(?:\*\*|__|\*)?\s*"
_ANSWER_KW = r"(?i:\b(?:final\s+answer|correct\s+answer|right\s+answer|best\s+answer|answer)\b)"
_OPTION_KW = r"(?i:\b(?:correct\s+option|correct\s+choice|option|choice)\b)"


def _kw_patterns(keyword: str) -> list[re.Pattern[str]]:
    return [
        re.compile(keyword + _LEAD + r"[\(\[]\s*([A-Za-z])\s*[\)\]]"),
        re.compile(keyword + _LEAD + r"([A-Z])(?![A-Za-z0-9'’])"),
        re.compile(keyword + _LEAD + r"([a-z])(?=\s*(?:\*\*|__|\*)?\s*(?:[.,;:!)\]]|$))"),
    ]


_ANSWER_PATTERNS = [*_kw_patterns(_ANSWER_KW), re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*\(?([A-Za-z])\)?\s*\}")]
_OPTION_PATTERNS = _kw_patterns(_OPTION_KW)
_LAST_LINE = re.compile(r"^\(?([A-Z])\)?\.?$|^\(?([A-Z])\)\s+\S.*$")
_PAREN = re.compile(r"\(([A-Z])\)")
_BARE = re.compile(r"\b([A-J])\b")


def _last(patterns: list[re.Pattern[str]], text: str) -> str | None:
    best: tuple[int, str] | None = None
    for pattern in patterns:
        for m in pattern.finditer(text):
            if best is None or m.start(1) > best[0]:
                best = (m.start(1), m.group(1))
    return best[1].upper() if best else None


def extract_letter(text: str, n_options: int, letter_fallback: bool = False) -> str | None:
    """The chosen option letter (upper case) or None; see the module docstring for the rules."""
    valid = LETTERS[:n_options]

    def ok(letter: str | None) -> str | None:
        return letter if letter is not None and letter in valid else None

    for patterns in (_ANSWER_PATTERNS, _OPTION_PATTERNS):
        found = _last(patterns, text)
        if found is not None:
            return ok(found)
    lines = [ln.strip().strip("*_#`").strip() for ln in text.strip().splitlines() if ln.strip().strip("*_#`").strip()]
    if lines:
        m = _LAST_LINE.match(lines[-1])
        if m:
            return ok(m.group(1) or m.group(2))
    parens = [p for p in _PAREN.findall(text) if p in valid]
    if parens:
        return parens[-1]
    if letter_fallback:
        bare = [b for b in _BARE.findall(text) if b in valid]
        if bare:
            return bare[-1]
    return None


def permutation(doc_id: str, n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, doc id): same order on every run and machine."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return [int(i) for i in rng.permutation(n)]


def shuffled(doc_id: str, choices: list[str], gold: int, seed: int | None) -> tuple[list[str], int]:
    """Options in a per-question order (``seed`` None: original order) and the gold's new index."""
    if not 0 <= gold < len(choices):
        raise DataError(f"doc {doc_id!r}: gold index {gold} out of range for {len(choices)} options")
    if seed is None:
        return list(choices), gold
    order = permutation(doc_id, len(choices), int(seed))
    return [choices[i] for i in order], order.index(gold)


def format_options(choices: list[str], style: str = "{letter}). {text}") -> str:
    return "\n".join(style.replace("{letter}", LETTERS[i]).replace("{text}", str(c)) for i, c in enumerate(choices))


class MultipleChoiceTask(Task):
    """doc: ``{"id", "question", "choices" (shown order), "gold_index", ...}``; the answer is a letter."""

    mbr_kind = "exact"

    def shuffle_seed(self) -> int | None:
        if not self.cfg.get("shuffle_options", True):
            return None
        return int(self.cfg.get("shuffle_seed", 0))

    def prompt_fields(self, doc: Doc) -> dict[str, Any]:
        return {
            "question": doc["question"],
            "options": format_options(doc["choices"], str(self.cfg.get("option_format") or "{letter}). {text}")),
        }

    def prompt(self, doc: Doc) -> Messages:
        return chat_prompt(self.cfg.get("prompt"), self.prompt_fields(doc), self.name)

    def extract(self, text: str, n_options: int = 26) -> str | None:
        return extract_letter(text, n_options, bool(self.cfg.get("letter_fallback", False)))

    def gold(self, doc: Doc) -> str:
        return LETTERS[doc["gold_index"]]

    def grade(self, doc: Doc, text: str) -> dict[str, Any]:
        answer = self.extract(text, len(doc["choices"]))
        return {"answer": answer, "correct": answer is not None and answer == self.gold(doc), "valid": answer is not None}

    def oracle_completion(self, doc: Doc) -> str:
        return f"Checking each option against the question, the correct one is \"{doc['choices'][doc['gold_index']]}\". The answer is ({self.gold(doc)})."
