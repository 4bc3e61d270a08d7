"""The Task interface: doc -> chat prompt -> extracted answer -> grade.

A task is one module here plus one ``conf/dataset/<name>.yaml``. Tasks are pure Python (no model code), so
evaluate/predict can import them without loading torch.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qalign_repro.errors import DataError
from qalign_repro.registry import Registry

TASKS: Registry[type[Task]] = Registry("dataset", "qalign_repro.tasks")

Doc = dict[str, Any]
Messages = list[dict[str, str]]


def bundled_data_path(*parts: str) -> Path:
    """Path of a data file shipped inside the package (``qalign_repro/data/...``)."""
    return Path(str(resources.files("qalign_repro").joinpath("data", *parts)))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line is reported with file and line number."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; allowed: a JSONL file")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text; allowed: UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(row).__name__} where an object was expected")
            rows.append(row)
    if not rows:
        raise DataError(f"data file {str(path)!r} is empty")
    return rows


def require_fields(row: Mapping[str, Any], fields: list[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; required: {fields}")


class Task(ABC):
    """One benchmark.

    ``cfg`` is the resolved ``dataset`` config group (a mapping): ``name``, ``n``, ``subset_seed``,
    ``source`` (bundled|hub), ``path`` (optional override of the data file), ``prompt`` (template) and task
    specific keys.
    """

    name: str = ""
    #: how MBR compares outputs: "exact" (answer equality -> MV) or "rouge" (open-ended text)
    mbr_kind: str = "exact"

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        self.cfg: dict[str, Any] = dict(cfg or {})

    # -- data -------------------------------------------------------------------------------------------
    @abstractmethod
    def load_all(self) -> list[Doc]:
        """Every doc of the configured split, each with a unique string ``id``."""

    def docs(self) -> list[Doc]:
        """The docs this run uses: a seeded random subset of ``n`` (all when ``n`` is null or <= 0)."""
        docs = self.load_all()
        ids = [d["id"] for d in docs]
        if len(set(ids)) != len(ids):
            raise DataError(f"task {self.name!r}: doc ids are not unique")
        n = self.cfg.get("n")
        if n is None or int(n) <= 0 or int(n) >= len(docs):
            return docs
        rng = np.random.default_rng(int(self.cfg.get("subset_seed", 0)))
        pick = np.sort(rng.choice(len(docs), size=int(n), replace=False))
        return [docs[i] for i in pick]

    # -- prompting ----------------------------------------------------------------------------------------
    @abstractmethod
    def prompt(self, doc: Doc) -> Messages:
        """Chat messages for the doc (the backend applies the model's chat template)."""

    # -- grading ------------------------------------------------------------------------------------------
    @abstractmethod
    def extract(self, text: str) -> str | None:
        """The final answer in canonical form, or None when the output is unparseable."""

    @abstractmethod
    def gold(self, doc: Doc) -> str:
        """The reference answer in the same canonical form ``extract`` returns."""

    def grade(self, doc: Doc, text: str) -> dict[str, Any]:
        """``{"correct": bool, "answer": str | None}`` plus task-specific fields."""
        answer = self.extract(text)
        return {"answer": answer, "correct": answer is not None and self.same(answer, self.gold(doc))}

    def same(self, answer: str, gold: str) -> bool:
        return answer == gold

    def data_source(self) -> dict[str, Any]:
        """What the docs were read from (file + checksum, hub id, generator settings), for the run's meta."""
        return {"source": str(self.cfg.get("source", "bundled"))}

    def oracle_completion(self, doc: Doc) -> str:
        """A completion in the prompt's answer format that carries the gold answer (gold-sanity checks)."""
        return f"The answer is {self.gold(doc)}."


def get_task(cfg: Mapping[str, Any]) -> Task:
    return TASKS.get(str(cfg["name"]))(cfg)
