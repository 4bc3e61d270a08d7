"""``dataset.source=hub`` goes through ``datasets.load_dataset``; here on local files only (no network)."""

import json

import pytest

from qalign_repro.errors import DataError
from qalign_repro.tasks import get_task


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _hub(cfg_of, name, tmp_path, data_files, config=None, **extra):
    hub = {"id": "json", "config": config, "split": "train", "data_files": data_files, "cache_dir": str(tmp_path / "hf")}
    return get_task(cfg_of(name, source="hub", hub=hub, **extra))


def test_gsm8k_hub(cfg_of, tmp_path):
    files = _write(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"},
                                                {"question": "2+2?", "answer": "#### 4"}])
    task = _hub(cfg_of, "gsm8k", tmp_path, files, config="main")
    docs = task.load_all()
    assert [(d["id"], task.gold(d)) for d in docs] == [("0", "2"), ("1", "4")]
    assert task.data_source() == {"source": "hub", "id": "json", "config": "main", "split": "train", "revision": None}


def test_math500_hub(cfg_of, tmp_path):
    rows = [{"problem": "p", "solution": "so \\boxed{\\frac12}", "answer": "\\frac{1}{2}", "subject": "Algebra",
             "level": 1, "unique_id": "test/algebra/1.json"}]
    task = _hub(cfg_of, "math500", tmp_path, _write(tmp_path / "m.jsonl", rows))
    (doc,) = task.load_all()
    assert doc["id"] == "test/algebra/1.json" and task.grade(doc, doc["solution"])["correct"]


def test_mmlu_redux_hub_loads_one_config_per_subject(cfg_of, tmp_path):
    for subject, q in (("anatomy", "Which bone?"), ("virology", "Which virus?")):
        _write(tmp_path / f"{subject}.jsonl", [
            {"question": q, "choices": ["a", "b", "c", "d"], "answer": 2, "error_type": "ok", "source": "",
             "correct_answer": None, "potential_reason": ""},
            {"question": q + "?", "choices": ["a", "b", "c", "d"], "answer": 0, "error_type": "Wrong Groundtruth",
             "source": "", "correct_answer": "1", "potential_reason": ""},
        ])
    task = _hub(cfg_of, "mmlu_redux", tmp_path, str(tmp_path / "{config}.jsonl"), subjects=["anatomy", "virology"])
    docs = task.load_all()
    assert [d["id"] for d in docs] == ["anatomy/0", "virology/0"]  # the wrong-groundtruth rows are filtered out
    assert all(d["choices"][d["gold_index"]] == "c" for d in docs)


def test_truthfulqa_hub_schema(cfg_of, tmp_path):
    rows = [{"question": "Q?", "mc1_targets": {"choices": ["true one", "false 1", "false 2"], "labels": [1, 0, 0]},
             "mc2_targets": {"choices": ["true one"], "labels": [1]}}]
    task = _hub(cfg_of, "truthfulqa", tmp_path, _write(tmp_path / "t.jsonl", rows), config="multiple_choice")
    (doc,) = task.load_all()
    assert doc["choices"][doc["gold_index"]] == "true one" and sorted(doc["choices"]) == ["false 1", "false 2", "true one"]


def test_ifeval_hub_drops_null_kwargs(cfg_of, tmp_path):
    rows = [{"key": 7, "prompt": "Answer without commas.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{"num_words": None, "relation": None}]}]
    task = _hub(cfg_of, "ifeval", tmp_path, _write(tmp_path / "i.jsonl", rows))
    (doc,) = task.load_all()
    assert doc["id"] == "7" and doc["kwargs"] == [{}]
    assert task.grade(doc, "Fine answer here.")["correct"] is True


def test_gsm_symbolic_hub(cfg_of, tmp_path):
    rows = [{"id": 3, "instance": 1, "question": "q", "answer": "a\n#### 12", "original_id": 9}]
    task = _hub(cfg_of, "gsm_symbolic_p1", tmp_path, _write(tmp_path / "g.jsonl", rows), config="p1")
    (doc,) = task.load_all()
    assert doc["id"] == "3-1" and task.gold(doc) == "12"
    assert task.data_source()["config"] == "p1"


def test_unreachable_hub_is_one_line_data_error(cfg_of, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    task = get_task(cfg_of("gsm8k", source="hub", hub={"id": str(empty), "config": None, "split": "test",
                                                        "cache_dir": str(tmp_path / "hf")}))
    with pytest.raises(DataError) as err:
        task.load_all()
    msg = str(err.value)
    assert "\n" not in msg and "could not load hub dataset" in msg and "dataset.source=bundled" in msg
