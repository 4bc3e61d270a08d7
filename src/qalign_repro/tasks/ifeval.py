"""IFEval (Zhou et al. 2023): 541 prompts with verifiable instructions, checked by lm-eval's port of Google's
official instruction checkers (``lm_eval.tasks.ifeval``).

``grade`` returns the four standard metrics: prompt-level and instruction-level accuracy, strict and loose;
``correct`` is prompt-level loose (the paper's Table 1 metric). There is no reference answer, so final-answer
selection is MBR with ROUGE (``mbr_kind = "rouge"``); ``answer`` is the stripped response (None when empty).

Grading is deterministic: ``langdetect`` (used by the language checks) is seeded, and so is Python's ``random``
around each check (a checker given an invalid argument, e.g. the letter "#" in prompts 1122 and 1129, draws a
replacement at random, as in Google's code).

lm-eval's module looks up NLTK's ``punkt_tab`` on import and tries to download it when missing. The English
tables ship in ``qalign_repro/data/nltk_data`` and are put first on ``nltk.data.path`` before that import, so no
download is ever attempted.
"""

from __future__ import annotations

import random
from functools import lru_cache
from types import ModuleType
from typing import Any

from qalign_repro.errors import DataError
from qalign_repro.tasks._prompt import Messages, chat_prompt
from qalign_repro.tasks._source import SourceMixin
from qalign_repro.tasks.base import TASKS, Doc, Task, bundled_data_path, check_row

METRICS = ("prompt_level_strict", "inst_level_strict", "prompt_level_loose", "inst_level_loose")


def nltk_data_dir() -> str:
    return str(bundled_data_path("nltk_data"))


@lru_cache(maxsize=1)
def ifeval_utils() -> ModuleType:
    """``lm_eval.tasks.ifeval.utils``, imported with the bundled punkt tables on NLTK's path (no download)."""
    import nltk

    path = nltk_data_dir()
    if path not in nltk.data.path:
        nltk.data.path.insert(0, path)
    nltk.data.find("tokenizers/punkt_tab/english/")  # fails loudly here rather than trying the network
    import langdetect

    # the language checks call langdetect, which samples at random unless seeded: same text, same grade
    langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import utils

    return utils


def _clean_kwargs(kwargs: list[Any]) -> list[dict[str, Any]]:
    # the HF copy stores every checker's argument for every instruction (None where unused)
    return [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]


@TASKS.register("ifeval")
class IFEval(SourceMixin, Task):
    """Bundled ``data/ifeval/input_data.jsonl`` (google-research) or hub ``google/IFEval``; doc id = ``key``."""

    name = "ifeval"
    mbr_kind = "rouge"
    bundled_file = ("ifeval", "input_data.jsonl")
    bundled_split = "train"

    def load_all(self) -> list[Doc]:
        docs = []
        rows = self._rows()
        for i, row in enumerate(rows):
            where = rows.where(i)
            check_row(row, {"key": "int", "prompt": "text", "instruction_id_list": "texts", "kwargs": "list"}, where)
            if len(row["kwargs"]) != len(row["instruction_id_list"]) or not all(
                    kw is None or isinstance(kw, dict) for kw in row["kwargs"]):
                raise DataError(f"{where}: field 'kwargs' does not match 'instruction_id_list' "
                                f"({len(row['instruction_id_list'])} instructions); allowed: one object (or null) "
                                "per instruction")
            docs.append({
                "id": str(row["key"]), "key": int(row["key"]), "prompt": row["prompt"],
                "instruction_id_list": list(row["instruction_id_list"]), "kwargs": _clean_kwargs(row["kwargs"]),
            })
        return docs

    def prompt(self, doc: Doc) -> Messages:
        return chat_prompt(self.cfg.get("prompt") or {"user": "{prompt}"}, {"prompt": doc["prompt"]}, self.name)

    def extract(self, text: str) -> str | None:
        text = text.strip()
        return text or None

    def gold(self, doc: Doc) -> str:
        """IFEval has no reference answer; grading checks the instructions instead (see ``grade``)."""
        return ""

    def grade(self, doc: Doc, text: str) -> dict[str, Any]:
        answer = self.extract(text)
        if answer is None:
            n = len(doc["instruction_id_list"])
            return {"answer": None, "correct": False, "valid": False, "prompt_level_strict": False,
                    "prompt_level_loose": False, "inst_level_strict": [False] * n, "inst_level_loose": [False] * n}
        utils = ifeval_utils()
        inp = utils.InputExample(key=doc["key"], instruction_id_list=doc["instruction_id_list"],
                                 prompt=doc["prompt"], kwargs=doc["kwargs"])
        state = random.getstate()
        try:  # a few IFEval kwargs are invalid (letter "#"), and the checker then draws one at random: seed it
            random.seed(f"ifeval:{doc['key']}")
            strict = utils.test_instruction_following_strict(inp, text)
            random.seed(f"ifeval:{doc['key']}")
            loose = utils.test_instruction_following_loose(inp, text)
        finally:
            random.setstate(state)
        return {
            "answer": answer,
            "correct": bool(loose.follow_all_instructions),
            "valid": True,
            "prompt_level_strict": bool(strict.follow_all_instructions),
            "prompt_level_loose": bool(loose.follow_all_instructions),
            "inst_level_strict": [bool(x) for x in strict.follow_instruction_list],
            "inst_level_loose": [bool(x) for x in loose.follow_instruction_list],
        }

    @staticmethod
    def metrics(grades: list[dict[str, Any]]) -> dict[str, float]:
        """The four IFEval accuracies over graded outputs (instruction level pools all instructions)."""
        out: dict[str, float] = {}
        for m in METRICS:
            if m.startswith("prompt"):
                vals = [bool(g[m]) for g in grades]
            else:
                vals = [bool(x) for g in grades for x in g[m]]
            out[m] = sum(vals) / len(vals) if vals else float("nan")
        return out

    def oracle_completion(self, doc: Doc) -> str:
        raise NotImplementedError(
            "IFEval has no reference responses; its sanity check replays GPT-4 responses with Google's official "
            "per-prompt results (tests/tasks/test_ifeval.py)"
        )
