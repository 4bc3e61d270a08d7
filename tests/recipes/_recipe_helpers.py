"""Shared helpers of the recipe / sharding tests: toy runs made in-process (fast, no torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from qalign_repro.cli import compose_config
from qalign_repro.store.storage import RunStore

TOY = ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false"]


def toy_overrides(root: Path, *extra: str, n: int = 7, steps: int = 4, method: str = "qalign") -> list[str]:
    return [*TOY, f"output_root={root}", f"dataset.n={n}", f"steps={steps}", f"method={method}", *extra]


def make_toy_run(root: Path, *extra: str, **kw: Any) -> str:
    from qalign_repro.stages.run import execute

    store = execute(compose_config(toy_overrides(root, *extra, **kw)))
    name = store.name
    store.close()
    return name


def instances(root: Path, name: str) -> list[dict]:
    store = RunStore(root, name, readonly=True)
    try:
        return list(store.iter_instances())
    finally:
        store.close()


def comparable(inst: dict) -> tuple:
    """What must be identical between a sharded and an unsharded run: prompt and every stored output."""
    return inst["input"]["id"], tuple(inst["input"]["prompt_ids"]), tuple(
        (tuple(o["completion_ids"]), o["reward"], o["accepted"], o["tokens_generated"], o["tokens_scored"])
        for o in inst["outputs"])


def hash_grades(root: Path, name: str) -> None:
    """A deterministic stand-in for the evaluate stage (toy outputs never parse as arithmetic answers): each
    distinct text is "correct" by a hash of its content and answers are the text itself, so accuracies and
    bootstrap CIs are non-trivial and identical texts get identical grades in every run."""
    store = RunStore(root, name)
    try:
        grades = []
        for inst in store.iter_instances():
            texts = [o["text"] for o in inst["outputs"]]
            correct = [hashlib.sha256(t.encode()).digest()[0] % 2 == 0 for t in texts]
            grades.append({"id": inst["input"]["id"], "answer": [t or None for t in texts], "correct": correct,
                           "metrics": {}})
        store.write_eval("grades", grades)
    finally:
        store.close()
