"""The Task interface: doc -> chat prompt -> extracted answer -> grade.

A task is one module here plus one ``conf/dataset/<name>.yaml``. Tasks are pure Python (no model code), so
evaluate/predict can import them without loading torch.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.registry import Registry

TASKS: Registry[type[Task]] = Registry("dataset", "qalign_repro.tasks")

Doc = dict[str, Any]
Messages = list[dict[str, str]]


def bundled_data_path(*parts: str) -> Path:
    """Path of a data file shipped inside the package (``qalign_repro/data/...``)."""
    return Path(str(resources.files("qalign_repro").joinpath("data", *parts)))


class Rows(list):
    """Rows of one source plus where each came from (``file:line`` or a hub row), so that a bad value found
    while a task builds its docs is reported where the user can fix it, not as a row index of some list."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), where: Iterable[str] = ()):
        super().__init__(rows)
        self.locations: list[str] = list(where)

    def where(self, i: int) -> str:
        return self.locations[i] if i < len(self.locations) else f"row {i}"

    def extend_from(self, other: Rows) -> None:
        self.extend(other)
        self.locations.extend(other.where(i) for i in range(len(other)))


def read_jsonl(path: str | Path) -> Rows:
    """Read a JSONL file; a bad line is reported with file and line number (and ``Rows.where`` keeps them)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; allowed: a JSONL file")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    rows = Rows()
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
            rows.locations.append(f"{path}:{lineno}")
    if not rows:
        raise DataError(f"data file {str(path)!r} is empty")
    return rows


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: field kinds of ``check_row``: (test, what is allowed, in the words of the error message)
FIELD_KINDS: dict[str, tuple[Any, str]] = {
    "text": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "int": (_is_int, "an integer"),
    "id": (lambda v: _is_int(v) or (isinstance(v, str) and bool(v.strip())), "an integer or a non-empty string"),
    "texts": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
              "a non-empty list of strings"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "mapping": (lambda v: isinstance(v, dict), "an object"),
}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "an empty string" if not value else "only whitespace"
    if isinstance(value, (list, dict)) and not value:
        return f"an empty {'list' if isinstance(value, list) else 'object'}"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"a {type(value).__name__} ({text[:40] + '...' if len(text) > 40 else text})"


def check_row(row: Mapping[str, Any], spec: Mapping[str, str], where: str) -> None:
    """Every field of ``spec`` (name -> a ``FIELD_KINDS`` kind) present and of its kind, checked when the docs
    load: a null question would otherwise become the prompt "...: None" and only crash the grader hours later.
    The error is one line naming the row (``file:line``), the field and what is allowed."""
    for name, kind in spec.items():
        test, allowed = FIELD_KINDS[kind]
        if name not in row:
            raise DataError(f"{where}: field {name!r} is missing; allowed: {allowed}")
        if not test(row[name]):
            raise DataError(f"{where}: field {name!r} is {_describe(row[name])}; allowed: {allowed}")


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
        """The docs this run uses: a seeded random subset of ``n`` docs, all of them when ``n`` is null.

        ``n`` larger than the set is an error naming the set's size (a typo such as ``n=100000`` must not
        launch the full set), and so is ``n <= 0`` (null, not 0, means "all": one rule for docs and configs).
        """
        docs = self.load_all()
        ids = [d["id"] for d in docs]
        if len(set(ids)) != len(ids):
            raise DataError(f"task {self.name!r}: doc ids are not unique")
        n = self.cfg.get("n")
        if n is None:
            return docs
        if not _is_int(n) or n < 1 or n > len(docs):
            raise ConfigError(f"dataset.n={n!r} is invalid for {self.name!r}, which has {len(docs)} docs; "
                              f"allowed: an integer 1..{len(docs)}, or null for all {len(docs)}")
        if n == len(docs):
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
