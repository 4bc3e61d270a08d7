"""``python -m qalign_repro.evaluate``: grade every stored output of the selected runs.

Writes the expkit eval ``grades`` (one entry per instance: answers, correctness per output and any extra task
metrics). Pure function of the stored outputs, so rerunning gives the same eval; a run that gained steps
since its last evaluation is graded again, a fully graded one is skipped.
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig

from qalign_repro.cli import entry_point, select_runs
from qalign_repro.errors import StorageError
from qalign_repro.store.storage import RunStore, list_runs
from qalign_repro.tasks import get_task


class RunDeleted(StorageError):
    """The run's store went away after evaluate selected it (deleted, or replaced by a new run of that name)."""


def _db_inode(store: RunStore) -> int | None:
    try:
        return store.storage.path(store.name).stat().st_ino
    except FileNotFoundError:
        return None


def _still_there(store: RunStore, inode: int | None) -> None:
    """Raise RunDeleted when the store opened as ``inode`` is gone. SQLite keeps reading a deleted file through
    its open handle, so without this check a deleted run read as "already evaluated", and taking the lock
    re-created its folder (with only the lock file, which is removed again here)."""
    if inode is not None and _db_inode(store) == inode:
        return
    lock = store.lock().path
    lock.unlink(missing_ok=True)
    try:
        lock.parent.rmdir()
    except OSError:  # not empty: a new run of that name is being created there
        pass
    raise RunDeleted(f"run {store.name!r} was deleted while evaluate ran ({lock.parent} is gone); nothing was graded "
                     "for it")


def grade_instance(task: Any, instance: dict[str, Any]) -> dict[str, Any]:
    doc = instance["input"]["doc"]
    answers, correct, metrics = [], [], {}
    cache: dict[str, dict[str, Any]] = {}
    for out in instance["outputs"]:
        text = out["text"]
        if text not in cache:  # QAlign repeats states: grade each distinct text once
            cache[text] = task.grade(doc, text)
        g = cache[text]
        answers.append(g.get("answer"))
        correct.append(bool(g.get("correct")))
        for key, value in g.items():
            if key not in ("answer", "correct") and isinstance(value, (bool, int, float)):
                metrics.setdefault(key, []).append(float(value))
    return {"id": instance["input"]["id"], "answer": answers, "correct": correct, "metrics": metrics}


def evaluate_run(root: str, name: str) -> list[dict[str, Any]]:
    store = RunStore(root, name)
    inode = _db_inode(store)
    with store.lock():
        _still_there(store, inode)
        store.verify()  # a damaged store is named as such, not reported through whatever value it garbled
        done = store.steps_done()
        if store.has_eval("grades"):
            grades = store.read_eval("grades")
            if len(grades) == store.n_instances() and all(len(g["correct"]) == done for g in grades):
                print(f"run {name}: already evaluated ({done} outputs per prompt); nothing to do")
                return grades
        task = get_task(store.meta["config"]["dataset"])
        grades = [grade_instance(task, inst) for inst in store.iter_instances()]
        store.write_eval("grades", grades)
    n_out = sum(len(g["correct"]) for g in grades)
    acc = sum(sum(g["correct"]) for g in grades) / max(n_out, 1)
    print(f"run {name}: graded {n_out} outputs of {len(grades)} prompts; mean per-output accuracy {acc:.3f}")
    return grades


@entry_point
def main(cfg: DictConfig) -> None:
    """Grade the selected runs' outputs and store them as the ``grades`` eval."""
    names = select_runs(cfg)
    gone = []
    for name in names:
        try:
            if name not in list_runs(cfg.output_root):  # deleted since select_runs listed it
                raise RunDeleted(f"run {name!r} was deleted while evaluate ran; nothing was graded for it")
            evaluate_run(cfg.output_root, name)
        except RunDeleted as exc:
            print(f"warning: {exc}; skipped", file=sys.stderr)
            gone.append(name)
    if gone and len(gone) == len(names):
        raise StorageError(f"every selected run ({', '.join(gone)}) was deleted while evaluate ran; nothing to grade")


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.stages.evaluate import main as _main

    _main()
