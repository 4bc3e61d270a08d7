"""Bad rows are caught when a task loads its docs (one line: file:line, field, what is allowed), and
``dataset.n`` follows one rule everywhere: null = all, 0 or more than the set is an error naming its size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.tasks import get_task

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"

GSM = {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=5\n#### 5"}
MATH = {"problem": "1+1?", "solution": "\\boxed{2}", "answer": "2", "unique_id": "test/a/1.json"}
MMLU = {"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 1, "error_type": "ok", "subject": "anatomy"}
TQA = {"question": "Q?", "mc1_targets": {"true": 1, "false": 0}}
IFE = {"key": 1, "prompt": "Write two lines.", "instruction_id_list": ["length_constraints:number_words"],
       "kwargs": [{"relation": "less than", "num_words": 9}]}
SYM = {"id": 3, "instance": 0, "question": "How many?", "answer": "1+1=2\n#### 2"}


def _jsonl(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# (dataset, a good row, the bad row placed on line 2, the field the message must name, a fragment of "allowed")
BAD_ROWS = [
    ("gsm8k", GSM, {**GSM, "question": None}, "question", "is null; allowed: a non-empty string"),
    ("gsm8k", GSM, {**GSM, "answer": "she has 5 apples"}, "answer", "'#### <number>'"),
    ("gsm8k", GSM, {"question": GSM["question"]}, "answer", "is missing"),
    ("gsm8k", GSM, {**GSM, "question": 7}, "question", "is a int (7); allowed: a non-empty string"),
    ("gsm_symbolic_p2", SYM, {**SYM, "answer": "no final line"}, "answer", "'#### <number>'"),
    ("gsm_symbolic_p2", SYM, {**SYM, "id": "three"}, "id", "allowed: an integer"),
    ("math500", MATH, {**MATH, "answer": ""}, "answer", "is an empty string"),
    ("math500", MATH, {**MATH, "problem": None}, "problem", "is null"),
    ("mmlu_redux", MMLU, {**MMLU, "choices": None}, "choices", "a non-empty list of strings"),
    ("mmlu_redux", MMLU, {**MMLU, "answer": 4}, "answer", "allowed: 0..3"),
    ("mmlu_redux", MMLU, {**MMLU, "question": "  "}, "question", "only whitespace"),
    ("truthfulqa", TQA, {**TQA, "question": None}, "question", "is null"),
    ("truthfulqa", TQA, {**TQA, "mc1_targets": ["a", "b"]}, "mc1_targets", "allowed: an object"),
    ("ifeval", IFE, {**IFE, "prompt": None}, "prompt", "is null"),
    ("ifeval", IFE, {**IFE, "kwargs": []}, "kwargs", "one object (or null) per instruction"),
]


@pytest.mark.parametrize(("name", "good", "bad", "field", "allowed"),
                         [pytest.param(*case, id=f"{case[0]}-{case[3]}-{i}") for i, case in enumerate(BAD_ROWS)])
def test_bad_row_is_one_line_naming_file_line_and_field(cfg_of, tmp_path, name, good, bad, field, allowed):
    path = _jsonl(tmp_path, [good, bad, good])
    task = get_task(cfg_of(name, path=path, n=None, subjects=["anatomy"]) if name == "mmlu_redux"
                    else cfg_of(name, path=path, n=None))
    with pytest.raises(DataError) as exc:
        task.docs()
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:2: field {field!r}"), msg
    assert allowed in msg, msg


@pytest.mark.parametrize("name", ["gsm8k", "gsm_symbolic_p2", "math500", "mmlu_redux", "truthfulqa", "ifeval"])
def test_good_user_file_loads(cfg_of, tmp_path, name):
    good = {"gsm8k": GSM, "gsm_symbolic_p2": SYM, "math500": MATH, "mmlu_redux": MMLU, "truthfulqa": TQA,
            "ifeval": IFE}[name]
    rows = [{**good, "unique_id": f"u{i}", "key": i, "instance": i} for i in range(3)]
    cfg = cfg_of(name, path=_jsonl(tmp_path, rows), n=None)
    if name == "mmlu_redux":
        cfg["subjects"] = ["anatomy"]
    assert len(get_task(cfg).docs()) == 3


def test_hub_row_names_dataset_config_split_and_row(cfg_of, tmp_path):
    hub = {"id": "json", "config": "main", "split": "train", "data_files": _jsonl(tmp_path, [GSM, GSM, {**GSM, "answer": None}]),
           "cache_dir": str(tmp_path / "hf")}
    with pytest.raises(DataError, match=r"hub dataset 'json' \(config 'main', split 'train'\) row 2: field 'answer' is null"):
        get_task(cfg_of("gsm8k", source="hub", hub=hub)).docs()


def test_n_larger_than_the_set_names_its_size(cfg_of):
    with pytest.raises(ConfigError) as exc:
        get_task(cfg_of("math500", n=100000)).docs()
    assert "dataset.n=100000" in str(exc.value) and "has 500 docs" in str(exc.value)
    assert "allowed: an integer 1..500, or null for all 500" in str(exc.value)


@pytest.mark.parametrize("n", [0, -3])
def test_n_zero_or_negative_is_an_error_and_null_is_all(cfg_of, n):
    with pytest.raises(ConfigError, match=rf"dataset.n={n} is invalid .* null for all 817"):
        get_task(cfg_of("truthfulqa", n=n)).docs()
    assert len(get_task(cfg_of("truthfulqa", n=None)).docs()) == 817
    assert len(get_task(cfg_of("truthfulqa", n=817)).docs()) == 817
    assert len(get_task(cfg_of("truthfulqa", n=816)).docs()) == 816


def test_generated_sets_follow_the_same_n_rule(cfg_of, tmp_path):
    with pytest.raises(ConfigError, match="has 5000 docs"):
        get_task(cfg_of("gsm_symbolic", n=5001, cache_dir=str(tmp_path))).docs()
    with pytest.raises(ConfigError, match="has 500 docs"):
        get_task(cfg_of("arith", n=501)).docs()


def test_config_validation_agrees_and_yaml_comments_say_null_is_all():
    from qalign_repro.config import positive_int

    with pytest.raises(ConfigError, match="dataset.n=0 is invalid"):
        positive_int(0, "dataset.n")
    for path in sorted(CONF.glob("*.yaml")):
        line = next(ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("n:"))
        assert re.search(r"null = (all|the whole split)", line), (path.name, line)
        assert "0 = all" not in line, (path.name, line)
