"""GSM-Symbolic (Mirzadeh et al. 2024): GSM8K questions turned into templates; variants main, P1 (one extra
clause) and P2 (two extra clauses). 50 instances per template; graded like GSM8K (final number).

``dataset.source``:

- ``bundled``: Apple's released instances shipped in the package — only P2 (``GSM_p2.jsonl``, 2,500 rows);
- ``generated``: instances drawn offline from the bundled templates (``_gsm_symbolic_templates``), seeded by
  ``generation_seed``, ``instances_per_template`` per template; cached on disk (``cache_dir``);
- ``hub``: ``apple/GSM-Symbolic`` with config main / p1 / p2 through ``datasets``.

Doc id: ``<template id>-<instance>`` for every source. Licenses: Apple's instances are CC BY-NC-ND 4.0, the
templates are under the Apple Sample Code License (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from qalign_repro.errors import ConfigError
from qalign_repro.tasks._gsm import GSMStyleTask, solution_final_number
from qalign_repro.tasks._gsm_symbolic_templates import Template, instantiate, parse_template
from qalign_repro.tasks._source import (
    SourceMixin,
    bundled_path,
    check_bundled_split,
    file_sha256,
    hub_rows,
    hub_settings,
    source_of,
)
from qalign_repro.tasks.base import TASKS, Doc, Task, bundled_data_path, check_row, read_jsonl

#: bump when the instantiator changes what it draws, so disk caches of older draws are not reused
GENERATOR_VERSION = 1
TEMPLATE_FILES = {"main": "templates_symbolic.jsonl", "p1": "templates_p1.jsonl", "p2": "templates_p2.jsonl"}
OFFICIAL_FILES = {"p2": "GSM_p2.jsonl"}
SOURCES = ("bundled", "generated", "hub")


@lru_cache(maxsize=8)
def load_templates(variant: str, path: str | None = None) -> dict[int, Template]:
    """The variant's templates by template id (``id_shuffled``)."""
    file = Path(path) if path else bundled_data_path("gsm_symbolic", TEMPLATE_FILES[variant])
    tag = "p1" if variant == "p1" else "p2" if variant == "p2" else "symbolic"
    templates = {}
    rows = read_jsonl(file)
    for i, row in enumerate(rows):
        check_row(row, {"id_shuffled": "int", "id_orig": "int", "question_annotated": "text",
                        "answer_annotated": "text"}, rows.where(i))
        tpl = parse_template(row, tag)
        templates[tpl.template_id] = tpl
    return templates


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qalign_repro"


class _Placeholders(Task):
    """Only ids: lets ``GSMSymbolic.docs`` reuse ``Task.docs``'s subset rule without generating every doc."""

    def __init__(self, cfg: dict[str, Any], ids: list[str], name: str):
        super().__init__(cfg)
        self._ids, self.name = ids, name

    def load_all(self) -> list[Doc]:
        return [{"id": i} for i in self._ids]

    def prompt(self, doc: Doc) -> list[dict[str, str]]:  # pragma: no cover - never called
        raise NotImplementedError

    def extract(self, text: str) -> str | None:  # pragma: no cover
        raise NotImplementedError

    def gold(self, doc: Doc) -> str:  # pragma: no cover
        raise NotImplementedError


class GSMSymbolic(SourceMixin, GSMStyleTask):
    variant = "main"
    sources = SOURCES

    # -- configuration ------------------------------------------------------------------------------------
    def _source(self) -> str:
        return source_of(self.cfg, SOURCES)

    def _per_template(self) -> int:
        n = self.cfg.get("instances_per_template", 50)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"dataset.instances_per_template={n!r} is invalid; allowed: an integer >= 1")
        return n

    def _seed(self) -> int:
        seed = self.cfg.get("generation_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"dataset.generation_seed={seed!r} is invalid; allowed: an integer >= 0")
        return seed

    def _templates_path(self) -> Path:
        override = self.cfg.get("templates_path")
        return Path(str(override)) if override else bundled_data_path("gsm_symbolic", TEMPLATE_FILES[self.variant])

    def templates(self) -> dict[int, Template]:
        return load_templates(self.variant, str(self._templates_path()))

    # -- provenance ---------------------------------------------------------------------------------------
    def data_source(self) -> dict[str, Any]:
        source = self._source()
        if source == "hub":
            hub = hub_settings(self.cfg)
            return {"source": "hub", **{k: hub.get(k) for k in ("id", "config", "revision")},
                    "split": hub.get("split") or self.cfg.get("split")}
        check_bundled_split(self.cfg, "test")
        if source == "bundled":
            path = self._official_path()
            return {"source": "bundled", "path": str(path), "sha256": file_sha256(path)}
        path = self._templates_path()
        return {"source": "generated", "variant": self.variant, "templates": str(path),
                "templates_sha256": file_sha256(path), "generation_seed": self._seed(),
                "instances_per_template": self._per_template(), "generator_version": GENERATOR_VERSION}

    def _official_path(self) -> Path:
        if self.variant not in OFFICIAL_FILES:
            raise ConfigError(
                f"dataset.source=bundled: Apple's GSM-Symbolic {self.variant} instances are not shipped (only P2 is); "
                "allowed: generated (drawn from the bundled templates) or hub"
            )
        return bundled_path(self.cfg, "gsm_symbolic", OFFICIAL_FILES[self.variant])

    # -- docs ---------------------------------------------------------------------------------------------
    @staticmethod
    def _doc(row: dict[str, Any], where: str) -> Doc:
        check_row(row, {"id": "int", "instance": "int", "question": "text", "answer": "text"}, where)
        doc = {"id": f"{int(row['id'])}-{int(row['instance'])}", "template_id": int(row["id"]),
               "instance": int(row["instance"]), "question": row["question"], "answer": row["answer"],
               "original_id": row.get("original_id")}
        doc["gold"] = solution_final_number(doc["answer"], where)
        return doc

    def load_all(self) -> list[Doc]:
        source = self._source()
        if source == "hub":
            rows = hub_rows(self.cfg)
            return [self._doc(r, rows.where(i)) for i, r in enumerate(rows)]
        check_bundled_split(self.cfg, "test")
        if source == "bundled":
            rows = read_jsonl(self._official_path())
            return [self._doc(r, rows.where(i)) for i, r in enumerate(rows)]
        templates = self.templates()
        return [d for tid in sorted(templates) for d in self.generated(tid)]

    def docs(self) -> list[Doc]:
        """As ``Task.docs``; for generated instances only the templates of the chosen subset are drawn."""
        if self._source() != "generated":
            return super().docs()
        check_bundled_split(self.cfg, "test")
        per = self._per_template()
        ids = [f"{tid}-{i}" for tid in sorted(self.templates()) for i in range(per)]
        chosen = [d["id"] for d in Task.docs(_Placeholders(self.cfg, ids, self.name))]
        by_template: dict[int, list[Doc]] = {}
        for doc_id in chosen:
            tid = int(doc_id.split("-")[0])
            if tid not in by_template:
                by_template[tid] = self.generated(tid)
        return [by_template[int(i.split("-")[0])][int(i.split("-")[1])] for i in chosen]

    def generated(self, template_id: int) -> list[Doc]:
        """The generated instances of one template (from the disk cache when present)."""
        tpl = self.templates()[template_id]
        per, seed = self._per_template(), self._seed()
        cache = self._cache_file(template_id, per, seed)
        rows = None
        if cache is not None and cache.is_file():
            try:
                rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, json.JSONDecodeError):
                rows = None
            if rows is not None and len(rows) != per:
                rows = None
        if rows is None:
            rows = [{"id": template_id, "instance": i, "question": inst["question"], "answer": inst["answer"],
                     "original_id": tpl.original_id}
                    for i, inst in enumerate(instantiate(tpl, per, seed))]
            if cache is not None:
                _atomic_write(cache, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return [self._doc(r, f"{self.name} generated {template_id}-{r['instance']}") for r in rows]

    def _cache_file(self, template_id: int, per: int, seed: int) -> Path | None:
        if not self.cfg.get("cache", True):
            return None
        root = Path(str(self.cfg["cache_dir"])) if self.cfg.get("cache_dir") else _default_cache_dir()
        tag = file_sha256(self._templates_path())[:12]
        return (root / f"gsm_symbolic-v{GENERATOR_VERSION}" / f"{self.variant}-{tag}" / f"seed{seed}-n{per}"
                / f"{template_id:04d}.jsonl")


def _atomic_write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


@TASKS.register("gsm_symbolic")
class GSMSymbolicMain(GSMSymbolic):
    name = "gsm_symbolic"
    variant = "main"


@TASKS.register("gsm_symbolic_p1")
class GSMSymbolicP1(GSMSymbolic):
    name = "gsm_symbolic_p1"
    variant = "p1"


@TASKS.register("gsm_symbolic_p2")
class GSMSymbolicP2(GSMSymbolic):
    name = "gsm_symbolic_p2"
    variant = "p2"
