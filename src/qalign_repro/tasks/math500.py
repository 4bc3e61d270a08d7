"""MATH-500 (Lightman et al. 2023): 500 MATH test problems; the last ``\\boxed{}`` is compared with math-verify."""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from qalign_repro.tasks._prompt import Messages, chat_prompt
from qalign_repro.tasks._source import SourceMixin
from qalign_repro.tasks.base import TASKS, Doc, Task, check_row

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or of ``\\boxed 5``; else None."""
    matches = list(_BOX.finditer(text))
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and (j == 0 or text[j - 1] != "\\"):
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
            continue  # unbalanced: try an earlier box
        if text[m.start() : m.end()].startswith("\\boxed") and m.end() > m.start() + len("\\boxed"):
            # "\boxed 5" form: the next token up to whitespace or "$"
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0).strip()
    return None


def normalize_latex(ans: str) -> str:
    """Light canonical form for answer equality (majority vote); equivalence itself is math-verify's."""
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ ", "", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def _timeouts() -> dict[str, Any]:
    # math-verify's timeouts use SIGALRM, which only works in the main thread
    if threading.current_thread() is threading.main_thread():
        return {}
    return {"parsing_timeout": None}


@lru_cache(maxsize=65536)
def _parse(expr: str):
    from math_verify import parse

    return parse("$" + expr + "$", **_timeouts())


@lru_cache(maxsize=65536)
def math_equal(answer: str, gold: str) -> bool:
    """math-verify equivalence of two LaTeX answers (gold first: verify is not symmetric)."""
    from math_verify import verify

    if normalize_latex(answer) == normalize_latex(gold):
        return True
    g, a = _parse(gold), _parse(answer)
    if not g or not a:
        return False
    kwargs = {} if threading.current_thread() is threading.main_thread() else {"timeout_seconds": None}
    return bool(verify(g, a, **kwargs))


@TASKS.register("math500")
class MATH500(SourceMixin, Task):
    """Bundled ``data/math500/test.jsonl`` (openai/prm800k) or hub ``HuggingFaceH4/MATH-500``; doc id = ``unique_id``."""

    name = "math500"
    mbr_kind = "exact"
    bundled_file = ("math500", "test.jsonl")

    def load_all(self) -> list[Doc]:
        docs = []
        rows = self._rows()
        for i, row in enumerate(rows):
            check_row(row, {"problem": "text", "solution": "text", "answer": "text", "unique_id": "id"}, rows.where(i))
            docs.append({
                "id": str(row["unique_id"]), "problem": row["problem"], "solution": row["solution"],
                "answer": row["answer"], "subject": row.get("subject"), "level": row.get("level"),
            })
        return docs

    def prompt(self, doc: Doc) -> Messages:
        return chat_prompt(self.cfg.get("prompt"), {"problem": doc["problem"]}, self.name)

    def extract(self, text: str) -> str | None:
        boxed = last_boxed(text)
        return normalize_latex(boxed) if boxed else None

    def gold(self, doc: Doc) -> str:
        return normalize_latex(doc["answer"])

    def same(self, answer: str, gold: str) -> bool:
        return math_equal(answer, gold)

    def grade(self, doc: Doc, text: str) -> dict[str, Any]:
        answer = self.extract(text)
        correct = answer is not None and self.same(answer, self.gold(doc))
        return {"answer": answer, "correct": correct, "valid": answer is not None}

    def oracle_completion(self, doc: Doc) -> str:
        """The reference MATH solution (its final answer is in ``\\boxed{}``)."""
        return doc["solution"]
