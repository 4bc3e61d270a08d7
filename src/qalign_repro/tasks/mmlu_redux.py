"""MMLU-Redux 2.0 (Gema et al. 2024): 57 MMLU subjects x 100 re-annotated questions; answer = option letter.

Only questions whose annotator label (``error_type``, normalised: stripped, lower case, spaces -> "_") is in
``dataset.error_types`` (default ``[ok]``: the annotators found question and ground truth correct) are used;
options are shuffled per question (``shuffle_seed``) so the gold letter is spread over A-D.
"""

from __future__ import annotations

from typing import Any

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.tasks._mc import MultipleChoiceTask, shuffled
from qalign_repro.tasks._source import SourceMixin, hub_rows, source_of
from qalign_repro.tasks.base import TASKS, Doc, Rows, check_row

SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)

#: the 30 subjects of MMLU-Redux v1, which the authors' runs used (goncalorafaria/qalign, qalign/utils/data.py)
PAPER_SUBJECTS = (
    "anatomy", "business_ethics", "clinical_knowledge", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_medicine", "college_physics", "econometrics", "electrical_engineering",
    "formal_logic", "global_facts", "high_school_chemistry", "high_school_mathematics", "high_school_physics",
    "high_school_statistics", "human_aging", "logical_fallacies", "machine_learning", "miscellaneous", "philosophy",
    "professional_accounting", "public_relations", "virology", "conceptual_physics", "high_school_us_history",
    "astronomy", "high_school_geography", "high_school_macroeconomics", "professional_law",
)

ERROR_TYPES = ("ok", "bad_question_clarity", "bad_options_clarity", "no_correct_answer", "multiple_correct_answers",
               "wrong_groundtruth", "expert")


def normalize_error_type(raw: Any) -> str:
    return str(raw or "").strip().lower().replace(" ", "_")


@TASKS.register("mmlu_redux")
class MMLURedux(SourceMixin, MultipleChoiceTask):
    """Bundled ``data/mmlu_redux/mmlu_redux.jsonl`` or hub ``edinburgh-dlab/mmlu-redux-2.0`` (one config per subject).

    Doc id: ``<subject>/<row index within the subject>`` (stable whatever the filter).
    """

    name = "mmlu_redux"
    bundled_file = ("mmlu_redux", "mmlu_redux.jsonl")

    def subjects(self) -> list[str]:
        chosen = self.cfg.get("subjects")
        if chosen is None or chosen == "all":
            return list(SUBJECTS)
        if chosen == "paper":
            return list(PAPER_SUBJECTS)
        if isinstance(chosen, str):
            chosen = [chosen]
        unknown = [s for s in chosen if s not in SUBJECTS]
        if unknown or not chosen:
            raise ConfigError(f"dataset.subjects has unknown subject(s) {unknown}; allowed: null/'all', 'paper', or names from {', '.join(SUBJECTS)}")
        return list(chosen)

    def error_types(self) -> list[str] | None:
        kept = self.cfg.get("error_types", ["ok"])
        if kept is None:
            return None
        kept = [normalize_error_type(k) for k in ([kept] if isinstance(kept, str) else kept)]
        unknown = [k for k in kept if k not in ERROR_TYPES]
        if unknown:
            raise ConfigError(f"dataset.error_types has unknown label(s) {unknown}; allowed: null (keep all) or {', '.join(ERROR_TYPES)}")
        return kept

    def _raw_rows(self, subjects: list[str]) -> Rows:
        if source_of(self.cfg) == "hub":
            rows = Rows()
            for subject in subjects:
                part = hub_rows(self.cfg, config=subject)
                rows.extend_from(Rows(({**r, "subject": subject} for r in part), part.locations))
            return rows
        return self._rows()

    def load_all(self) -> list[Doc]:
        subjects = self.subjects()
        wanted = set(subjects)
        kept = self.error_types()
        seed = self.shuffle_seed()
        counters: dict[str, int] = {}
        docs = []
        rows = self._raw_rows(subjects)
        for i, row in enumerate(rows):
            where = rows.where(i)
            check_row(row, {"question": "text", "choices": "texts", "answer": "int", "subject": "text"}, where)
            if "error_type" not in row:
                raise DataError(f"{where}: field 'error_type' is missing; allowed: an annotator label ({', '.join(ERROR_TYPES)})")
            if not 0 <= row["answer"] < len(row["choices"]):
                raise DataError(f"{where}: field 'answer' is {row['answer']} but there are {len(row['choices'])} "
                                f"choices; allowed: 0..{len(row['choices']) - 1}")
            subject = row["subject"]
            index = counters.get(subject, 0)
            counters[subject] = index + 1
            if subject not in wanted:
                continue
            label = normalize_error_type(row["error_type"])
            if label not in ERROR_TYPES:
                raise DataError(f"{where} ({subject}): unknown error_type {row['error_type']!r}; known: {', '.join(ERROR_TYPES)}")
            if kept is not None and label not in kept:
                continue
            doc_id = f"{subject}/{index}"
            choices, gold = shuffled(doc_id, [str(c) for c in row["choices"]], int(row["answer"]), seed)
            docs.append({
                "id": doc_id, "subject": subject, "question": row["question"], "choices": choices,
                "gold_index": gold, "error_type": label,
            })
        return docs

    def prompt_fields(self, doc: Doc) -> dict[str, Any]:
        return {**super().prompt_fields(doc), "subject": doc["subject"].replace("_", " ")}
