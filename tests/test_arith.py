"""The ``arith`` task: disjoint splits, deterministic generation, correct gold answers, GSM8K-style grading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qalign_repro.errors import ConfigError
from qalign_repro.tasks import get_task
from qalign_repro.tasks.arith import DEFAULTS, Arith, generate, problem_key, solution

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "arith.yaml"


@pytest.fixture(scope="module")
def cfg() -> dict:
    return yaml.safe_load(CONF.read_text())


@pytest.fixture(scope="module")
def splits(cfg) -> dict[str, list[dict]]:
    return {
        "train": generate(cfg, "train", 20_000),
        "rm_train": generate(cfg, "rm_train", cfg["sizes"]["rm_train"]),
        "test": generate(cfg, "test", cfg["sizes"]["test"]),
    }


def test_yaml_states_the_code_defaults(cfg):
    # the trainer reads the yaml, runs may construct the task from a partial config: both must agree
    for key, value in DEFAULTS.items():
        assert cfg[key] == value, key


def test_registered_and_loads_configured_split(cfg):
    task = get_task(cfg)
    assert isinstance(task, Arith)
    docs = task.load_all()
    assert len(docs) == cfg["sizes"]["test"] == 500
    assert all(d["id"].startswith("arith-test-") for d in docs)
    rm_docs = get_task({**cfg, "split": "rm_train", "sizes": {"rm_train": 50}}).load_all()
    assert len(rm_docs) == 50 and rm_docs[0]["id"].startswith("arith-rm_train-")
    with pytest.raises(ConfigError, match="split"):
        get_task({**cfg, "split": "validation"})


def test_splits_are_disjoint_even_reworded(splits):
    keys = {name: {problem_key(d) for d in docs} for name, docs in splits.items()}
    texts = {name: {d["question"] for d in docs} for name, docs in splits.items()}
    for name, docs in splits.items():
        assert len(keys[name]) == len(docs), f"{name}: duplicate problems"
        assert len({d["id"] for d in docs}) == len(docs)
    for a, b in [("train", "test"), ("train", "rm_train"), ("rm_train", "test")]:
        assert not keys[a] & keys[b], (a, b)
        assert not texts[a] & texts[b], (a, b)


def test_generation_is_deterministic_and_prefix_stable(cfg, splits):
    assert generate(cfg, "test", 500) == splits["test"]
    # asking for fewer docs gives the same first docs (the trainer's budget never changes the test set)
    assert generate(cfg, "test", 37) == splits["test"][:37]
    other = generate({**cfg, "seed": cfg["seed"] + 1}, "test", 50)
    assert [d["question"] for d in other] != [d["question"] for d in splits["test"][:50]]


def _evaluate_steps(sol: str) -> int:
    """Re-do the chain of thought's arithmetic independently of the generator's bookkeeping."""
    value = None
    for lhs, op, rhs, res in re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", sol):
        left, right, res_i = int(lhs), int(rhs), int(res)
        if value is not None:
            assert left == value, "each step must start from the previous result"
        value = {"+": left + right, "-": left - right, "*": left * right}[op]
        assert value == res_i, sol
    assert value is not None
    return value


def test_gold_solutions_are_right_and_grade_correct(cfg, splits):
    task = get_task(cfg)
    for doc in splits["test"]:
        sol = task.oracle_completion(doc)
        assert sol == solution(doc)
        assert sol.endswith(f"The answer is {doc['answer']}.")
        assert _evaluate_steps(sol) == doc["answer"]
        assert str(doc["start"]) in doc["question"]
        for op, operand, _ in doc["steps"]:
            word = {2: "doubles", 3: "triples"}.get(operand) if op == "mul" else None
            assert (word or str(operand)) in doc["question"]
        assert task.grade(doc, sol) == {"answer": str(doc["answer"]), "correct": True}


def test_difficulty_knobs_are_respected(cfg, splits):
    for doc in splits["train"][:5000]:
        assert len(doc["steps"]) == cfg["num_ops"]
        assert cfg["start_min"] <= doc["start"] <= cfg["start_max"]
        for op, operand, value in doc["steps"]:
            assert 0 <= value <= cfg["max_value"]
            if op == "mul":
                assert 2 <= operand <= cfg["mul_max"]
            else:
                assert cfg["operand_min"] <= operand <= cfg["operand_max"]
    ops = {s[0] for d in splits["train"][:2000] for s in d["steps"]}
    assert ops == {"add", "sub", "mul"}
    easy = generate({**cfg, "num_ops": 2, "ops": ["add"], "operand_max": 5}, "test", 20)
    assert all(len(d["steps"]) == 2 and {s[0] for s in d["steps"]} == {"add"} for d in easy)
    assert all(s[1] <= 5 for d in easy for s in d["steps"])
    # a problem space too small for the requested split size is an error, not an endless loop or repeats
    with pytest.raises(ConfigError, match="distinct"):
        generate({**cfg, "num_ops": 1, "ops": ["add"], "operand_max": 2, "start_max": 3}, "test", 10)
    hard = generate({**cfg, "num_ops": 5}, "test", 40)
    assert all(len(d["steps"]) == 5 for d in hard)
    with pytest.raises(ConfigError, match="ops"):
        Arith({**cfg, "ops": ["div"]})


def test_extraction_and_grading(cfg, splits):
    task = get_task(cfg)
    doc = splits["test"][0]
    gold = doc["answer"]
    assert task.extract("3+4=7. The answer is 7.") == "7"
    assert task.extract("The answer is 1,200.") == "1200"
    assert task.grade(doc, f"1+1=2. The answer is {gold + 1}.")["correct"] is False
    # strict (the default): a truncated chain without its final sentence is unparseable, not "last number"
    assert task.extract(f"12+3=15. 15*2={gold}") is None
    assert task.grade(doc, f"12+3=15. 15*2={gold}") == {"answer": None, "correct": False}
    lenient = Arith({**cfg, "strict": False})
    assert lenient.extract(f"12+3=15. 15*2={gold}") == str(gold)


def test_prompt_and_answer_fit_the_tiny_context(cfg, splits):
    task = get_task(cfg)
    for doc in splits["test"]:
        msgs = task.prompt(doc)
        assert msgs == [{"role": "user", "content": doc["question"]}]
        # character tokenizer: one token per char, plus 3 chat special tokens
        assert len(doc["question"]) + 3 <= 256
        assert len(solution(doc)) + 1 <= 64, "the answer must fit max_new_tokens=64"
