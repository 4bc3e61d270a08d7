"""TruthfulQA multiple choice, MC1 (Lin et al. 2022): 817 questions, exactly one true option; answer = letter.

The source lists the true option first; options are shuffled per question (``shuffle_seed``) so the gold is not
always "A" (the authors' code kept the source order, so every gold there is "A").
"""

from __future__ import annotations

from typing import Any

from qalign_repro.errors import DataError
from qalign_repro.tasks._mc import MultipleChoiceTask, shuffled
from qalign_repro.tasks._source import SourceMixin
from qalign_repro.tasks.base import TASKS, Doc, check_row


def mc1_options(targets: Any, where: str) -> tuple[list[str], int]:
    """(choices, gold index) from either ``{choice: 0|1}`` (sylinrl mc_task.json) or ``{choices, labels}`` (HF)."""
    if isinstance(targets, dict) and "choices" in targets and "labels" in targets:
        choices, labels = list(targets["choices"]), [int(x) for x in targets["labels"]]
    elif isinstance(targets, dict):
        choices, labels = list(targets), [int(v) for v in targets.values()]
    else:
        raise DataError(f"{where}: mc1_targets is {type(targets).__name__}; expected a mapping")
    if len(choices) != len(labels) or labels.count(1) != 1:
        raise DataError(f"{where}: mc1_targets must have exactly one true option; got labels {labels}")
    return [str(c) for c in choices], labels.index(1)


@TASKS.register("truthfulqa")
class TruthfulQA(SourceMixin, MultipleChoiceTask):
    """Bundled ``data/truthfulqa/mc_task.jsonl`` or hub ``truthfulqa/truthful_qa`` (``multiple_choice``, validation).

    Doc id: the 0-based row index (both sources keep mc_task.json's order).
    """

    name = "truthfulqa"
    bundled_file = ("truthfulqa", "mc_task.jsonl")
    bundled_split = "validation"

    def load_all(self) -> list[Doc]:
        seed = self.shuffle_seed()
        docs = []
        rows = self._rows()
        for i, row in enumerate(rows):
            check_row(row, {"question": "text", "mc1_targets": "mapping"}, rows.where(i))
            choices, gold = mc1_options(row["mc1_targets"], rows.where(i))
            choices, gold = shuffled(str(i), choices, gold, seed)
            docs.append({"id": str(i), "question": row["question"], "choices": choices, "gold_index": gold})
        return docs
