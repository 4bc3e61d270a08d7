import collections

import numpy as np
import pytest

from qalign_repro.errors import ConfigError
from qalign_repro.tasks import get_task
from qalign_repro.tasks._mc import extract_letter, permutation, shuffled


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("Reasoning... The answer is (C).", 4, "C"),
        ("the answer is (c)", 4, "C"),
        ("so the answer is c.", 4, "C"),
        ("Answer: **B**", 4, "B"),
        ("The final answer is $\\boxed{D}$", 4, "D"),
        ("I think the answer is A", 4, "A"),
        ("Option A is wrong. The correct option is D.", 4, "D"),
        ("Option B looks tempting, but the answer is (C).", 4, "C"),
        ("Let me reason.\n\n**C) Paris**", 4, "C"),
        ("Reasoning\nB", 4, "B"),
        ("... therefore (B) is correct.", 4, "B"),
        ("the answer is a bit unclear", 4, None),  # lower-case 'a' as an article is not an answer
        ("No letter here at all.", 4, None),
        ("The answer is (E).", 4, None),  # outside the options: invalid
        ("The answer is (E).", 5, "E"),
    ],
)
def test_extract_letter(text, n, expected):
    assert extract_letter(text, n) == expected


def test_letter_fallback_is_opt_in():
    assert extract_letter("I pick B because", 4) is None
    assert extract_letter("I pick B because", 4, letter_fallback=True) == "B"


def test_permutation_is_deterministic_and_depends_on_id_and_seed():
    assert permutation("q1", 4, 0) == permutation("q1", 4, 0)
    perms = {tuple(permutation(f"q{i}", 4, 0)) for i in range(50)}
    assert len(perms) > 10
    assert [permutation(f"q{i}", 4, 1) for i in range(20)] != [permutation(f"q{i}", 4, 0) for i in range(20)]
    choices, gold = shuffled("q7", ["a", "b", "c", "d"], 2, 0)
    assert sorted(choices) == ["a", "b", "c", "d"] and choices[gold] == "c"
    assert shuffled("q7", ["a", "b"], 1, None) == (["a", "b"], 1)


def _sanity(task, docs):
    oracle = np.mean([task.grade(d, task.oracle_completion(d))["correct"] for d in docs])
    perm = np.random.default_rng(0).permutation(len(docs))
    shuffled_acc = np.mean([task.grade(d, task.oracle_completion(docs[p]))["correct"] for d, p in zip(docs, perm)])
    golds = collections.Counter(task.gold(d) for d in docs)
    chance = sum((c / len(docs)) ** 2 for c in golds.values())  # matching letters between random pairs
    guess = np.mean([1 / len(d["choices"]) for d in docs])  # a uniform random guess
    return oracle, shuffled_acc, chance, guess


@pytest.fixture(scope="module")
def mmlu(cfg_of):
    task = get_task(cfg_of("mmlu_redux"))
    return task, task.load_all()


@pytest.fixture(scope="module")
def tqa(cfg_of):
    task = get_task(cfg_of("truthfulqa"))
    return task, task.load_all()


class TestMMLURedux:
    @pytest.fixture
    def task(self, mmlu):
        return mmlu[0]

    @pytest.fixture
    def docs(self, mmlu):
        return mmlu[1]

    def test_counts_match_source(self, cfg_of, docs):
        assert len(docs) == 5330  # SOURCE.md: 5,700 rows, 5,330 with error_type_norm "ok"
        assert len(get_task(cfg_of("mmlu_redux", error_types=None)).load_all()) == 5700
        by_subject = collections.Counter(d["subject"] for d in docs)
        assert len(by_subject) == 57 and max(by_subject.values()) <= 100
        assert {d["error_type"] for d in docs} == {"ok"}
        paper = get_task(cfg_of("mmlu_redux", subjects="paper")).load_all()
        assert len({d["subject"] for d in paper}) == 30

    def test_subject_list_and_error_filter_are_config(self, cfg_of):
        two = get_task(cfg_of("mmlu_redux", subjects=["anatomy", "virology"], error_types=["wrong_groundtruth"])).load_all()
        assert {d["subject"] for d in two} <= {"anatomy", "virology"}
        assert all(d["error_type"] == "wrong_groundtruth" for d in two) and two
        with pytest.raises(ConfigError, match="unknown subject"):
            get_task(cfg_of("mmlu_redux", subjects=["astrology"])).load_all()
        with pytest.raises(ConfigError, match="unknown label"):
            get_task(cfg_of("mmlu_redux", error_types=["fine"])).load_all()

    def test_options_shuffled_per_question(self, cfg_of, docs):
        golds = collections.Counter(d["gold_index"] for d in docs)
        assert all(1200 < golds[i] < 1480 for i in range(4))
        plain = {d["id"]: d for d in get_task(cfg_of("mmlu_redux", shuffle_options=False)).load_all()}
        moved = sum(d["choices"] != plain[d["id"]]["choices"] for d in docs)
        assert moved > 0.6 * len(docs)
        for d in docs[:200]:  # same options, gold follows its text
            p = plain[d["id"]]
            assert sorted(d["choices"]) == sorted(p["choices"])
            assert d["choices"][d["gold_index"]] == p["choices"][p["gold_index"]]

    def test_gold_sanity(self, task, docs):
        oracle, shuffled_acc, chance, guess = _sanity(task, docs)
        assert oracle >= 0.99  # measured: 1.000
        assert abs(shuffled_acc - chance) < 0.03 and abs(chance - 0.25) < 0.01  # measured: 0.252 vs 0.250

    def test_prompt_lists_lettered_options(self, task, docs):
        content = task.prompt(docs[0])[0]["content"]
        assert content.startswith("Choose the correct answer to the following multiple-choice question about abstract algebra.")
        for i, choice in enumerate(docs[0]["choices"]):
            assert f"\n{'ABCD'[i]}). {choice}\n" in content
        assert "finish your answer with the letter corresponding to the correct option" in content


class TestTruthfulQA:
    @pytest.fixture
    def task(self, tqa):
        return tqa[0]

    @pytest.fixture
    def docs(self, tqa):
        return tqa[1]

    def test_counts_match_source(self, docs):
        assert len(docs) == 817  # SOURCE.md: mc_task.jsonl 817 rows
        sizes = collections.Counter(len(d["choices"]) for d in docs)
        assert sizes[4] == 208 and sizes[2] == 40 and max(sizes) == 13

    def test_gold_is_not_always_a(self, cfg_of, docs):
        golds = collections.Counter(d["gold_index"] for d in docs)
        assert golds[0] < 0.3 * len(docs) and len(golds) >= 8
        unshuffled = get_task(cfg_of("truthfulqa", shuffle_options=False)).load_all()
        assert {d["gold_index"] for d in unshuffled} == {0}  # the source (and the authors' code) put it first

    def test_gold_sanity(self, task, docs):
        oracle, shuffled_acc, chance, guess = _sanity(task, docs)
        assert oracle >= 0.99  # measured: 1.000
        assert abs(shuffled_acc - chance) < 0.03  # measured: 0.185 vs 0.180
        assert shuffled_acc < 0.3

    def test_grade_tricky_outputs(self, task, docs):
        doc = docs[0]
        gold = task.gold(doc)
        assert task.grade(doc, f"The answer is ({gold}).")["correct"]
        assert task.grade(doc, f"the answer is ({gold.lower()})")["correct"]
        wrong = "ABCD".replace(gold, "")[0]
        assert task.grade(doc, f"The answer is ({wrong}).") == {"answer": wrong, "correct": False, "valid": True}
        assert task.grade(doc, "I cannot tell.") == {"answer": None, "correct": False, "valid": False}
