import numpy as np
import pytest

from qalign_repro.errors import ConfigError
from qalign_repro.tasks import get_task
from qalign_repro.tasks._numbers import extract_final_number


@pytest.fixture(scope="module")
def task(cfg_of):
    return get_task(cfg_of("gsm8k"))


@pytest.fixture(scope="module")
def docs(task):
    return task.load_all()


def test_loads_all_1319_rows_with_unique_ids(docs):
    assert len(docs) == 1319  # SOURCE.md: test.jsonl 1319 rows
    assert len({d["id"] for d in docs}) == 1319
    assert docs[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.")


def test_subset_is_seeded_random_not_first_rows(task, cfg_of):
    first = [d["id"] for d in task.docs()]
    assert len(first) == 16 and first == [d["id"] for d in get_task(cfg_of("gsm8k")).docs()]
    assert first != [str(i) for i in range(16)]
    other = [d["id"] for d in get_task(cfg_of("gsm8k", subset_seed=1)).docs()]
    assert other != first


def test_gold_from_solution(task, docs):
    assert task.gold(docs[0]) == "18"
    assert all(task.gold(d) is not None for d in docs)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes $1,000. in total", "1000"),
        ("The answer is $1,000.", "1000"),
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("so the final answer is 182 * 2 = 364.\n#### 364", "364"),  # the #### line wins
        ("The answer is 18.0 dollars", "18"),
        ("\\boxed{42}", "42"),
        ("first 12 then 15 apples", "15"),
        ("no number at all", None),
    ],
)
def test_final_number_extraction(task, text, expected):
    assert task.extract(text) == expected


def test_strict_extract_has_no_last_number_fallback(cfg_of):
    strict = get_task(cfg_of("gsm8k", strict_extract=True))
    assert strict.extract("first 12 then 15 apples") is None
    assert strict.extract("The answer is 15.") == "15"
    assert extract_final_number("first 12 then 15 apples") == "15"


def test_grade_dict_and_invalid(task, docs):
    doc = docs[0]
    assert task.grade(doc, "16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is $18.") == {"answer": "18", "correct": True, "valid": True}
    assert task.grade(doc, "The answer is 17.")["correct"] is False
    assert task.grade(doc, "I don't know.") == {"answer": None, "correct": False, "valid": False}


def test_gold_sanity(task, docs):
    oracle = np.mean([task.grade(d, task.oracle_completion(d))["correct"] for d in docs])
    assert oracle >= 0.99  # measured: 1.000
    perm = np.random.default_rng(0).permutation(len(docs))
    shuffled = np.mean([task.grade(d, task.oracle_completion(docs[p]))["correct"] for d, p in zip(docs, perm)])
    assert shuffled <= 0.05  # measured: ~0.01 (coincidentally equal answers)


def test_prompt_is_the_authors_zero_shot_prompt(task, docs):
    msgs = task.prompt(docs[0])
    assert msgs == [{"role": "user", "content": "Solve the following grade school math problem step-by-step: " + docs[0]["question"]}]


def test_bad_source_is_one_line_config_error(cfg_of):
    with pytest.raises(ConfigError, match=r"dataset.source='web' is invalid .*allowed: bundled, hub"):
        get_task(cfg_of("gsm8k", source="web")).load_all()


def test_bundled_copy_holds_only_the_test_split(cfg_of):
    with pytest.raises(ConfigError, match=r"dataset.split='train' is not bundled for 'gsm8k' \(only 'test'\).*dataset.source=hub"):
        get_task(cfg_of("gsm8k", split="train")).load_all()


def test_data_source_records_file_and_hash(task):
    src = task.data_source()
    assert src["source"] == "bundled" and src["path"].endswith("gsm8k/test.jsonl")
    assert src["sha256"] == "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
