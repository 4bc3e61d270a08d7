"""GSM8K (Cobbe et al. 2021), test split: 1,319 grade-school word problems, graded by final number."""

from __future__ import annotations

from qalign_repro.tasks._gsm import GSM_FIELDS, GSMStyleTask, solution_final_number
from qalign_repro.tasks._source import SourceMixin
from qalign_repro.tasks.base import TASKS, Doc, check_row


@TASKS.register("gsm8k")
class GSM8K(SourceMixin, GSMStyleTask):
    """Bundled ``data/gsm8k/test.jsonl`` (openai/grade-school-math) or hub ``openai/gsm8k`` (config ``main``).

    Doc ids are the 0-based row index in the test split ("0" ... "1318"); both sources have the same order.
    """

    name = "gsm8k"
    bundled_file = ("gsm8k", "test.jsonl")

    def load_all(self) -> list[Doc]:
        docs = []
        rows = self._rows()
        for i, row in enumerate(rows):
            check_row(row, GSM_FIELDS, rows.where(i))
            solution_final_number(row["answer"], rows.where(i))  # no '#### N': caught here, not after generation
            docs.append({"id": str(i), "question": row["question"], "answer": row["answer"]})
        return docs
