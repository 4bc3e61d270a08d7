"""``python -m qalign_repro.evaluate``: grade every stored output of the selected runs.

Writes the expkit eval ``grades`` (one entry per instance: answers, correctness per output and any extra task
metrics). Pure function of the stored outputs, so rerunning gives the same eval; a run that gained steps
since its last evaluation is graded again, a fully graded one is skipped.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from qalign_repro.cli import entry_point, select_runs
from qalign_repro.storage import RunStore
from qalign_repro.tasks import get_task


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
    with store.lock():
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
    for name in select_runs(cfg):
        evaluate_run(cfg.output_root, name)


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.evaluate import main as _main

    _main()
