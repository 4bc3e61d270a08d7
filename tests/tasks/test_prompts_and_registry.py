import json
from pathlib import Path

import pytest

from qalign_repro.tasks import TASKS, get_task

SNAPSHOT = json.loads((Path(__file__).resolve().parent / "fixtures" / "prompts.json").read_text(encoding="utf-8"))
BENCHMARKS = ["gsm8k", "gsm_symbolic", "gsm_symbolic_p1", "gsm_symbolic_p2", "math500", "mmlu_redux", "truthfulqa", "ifeval"]


def test_all_benchmarks_are_registered():
    assert set(BENCHMARKS) <= set(TASKS.names())


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_prompt_snapshot(name, cfg_of):
    task = get_task(cfg_of(name))
    doc = next(d for d in task.load_all() if d["id"] == SNAPSHOT[name]["id"])
    assert task.prompt(doc) == SNAPSHOT[name]["messages"]


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_prompt_template_comes_from_config(name, cfg_of):
    field = {"math500": "problem", "ifeval": "prompt"}.get(name, "question")
    task = get_task(cfg_of(name, prompt={"system": "Be brief.", "user": f"Q: {{{field}}}\nA:"}))
    doc = next(d for d in task.load_all() if d["id"] == SNAPSHOT[name]["id"])
    msgs = task.prompt(doc)
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["role"] == "user" and msgs[1]["content"].startswith("Q: ") and msgs[1]["content"].endswith("\nA:")


@pytest.mark.parametrize("name, kind", [("gsm8k", "exact"), ("math500", "exact"), ("mmlu_redux", "exact"),
                                        ("truthfulqa", "exact"), ("ifeval", "rouge"), ("gsm_symbolic_p2", "exact")])
def test_mbr_kind(name, kind, cfg_of):
    assert get_task(cfg_of(name)).mbr_kind == kind


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_unparseable_output_is_invalid_and_wrong(name, cfg_of):
    task = get_task(cfg_of(name))
    doc = next(d for d in task.load_all() if d["id"] == SNAPSHOT[name]["id"])
    grade = task.grade(doc, "" if name == "ifeval" else "I am not sure.")
    assert grade["answer"] is None and grade["correct"] is False and grade["valid"] is False
