import numpy as np
import pytest

from qalign_repro.tasks import get_task
from qalign_repro.tasks.math500 import last_boxed, math_equal


@pytest.fixture(scope="module")
def task(cfg_of):
    return get_task(cfg_of("math500"))


@pytest.fixture(scope="module")
def docs(task):
    return task.load_all()


def test_loads_500_problems(docs):
    assert len(docs) == 500  # SOURCE.md: 500 rows, 500 distinct unique_id
    assert len({d["id"] for d in docs}) == 500
    levels = np.bincount([d["level"] for d in docs], minlength=6)[1:]
    assert levels.tolist() == [43, 90, 105, 128, 134]


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"first \boxed{1} then \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # last box, nested braces
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})"),
        (r"The answer is \boxed 5$.", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{unbalanced", None),
        ("The answer is 5.", None),  # the prompt asks for \boxed{}: no box = invalid
    ],
)
def test_extract_last_boxed(task, text, expected):
    assert task.extract(text) == expected


def test_last_boxed_keeps_escaped_braces():
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"


@pytest.mark.parametrize(
    "answer, gold, same",
    [
        ("0.5", r"\frac{1}{2}", True),
        (r"\dfrac{1}{2}", r"\frac12", True),
        (r"\tfrac{3}{4}", "0.75", True),
        ("[2, 5)", "[2,5)", True),
        ("(2,5]", "[2,5)", False),  # interval ends matter
        (r"(-\infty, 1) \cup (2, \infty)", r"(-\infty,1)\cup(2,\infty)", True),
        (r"\frac{1}{3}", "0.33", False),
        ("x = 3", "3", True),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", True),
        ("1,000", "1000", True),
        (r"10\%", "10", True),
        ("2", "3", False),
    ],
)
def test_math_verify_equivalence(answer, gold, same):
    assert math_equal(answer, gold) is same


def test_grade_dict(task, docs):
    doc = next(d for d in docs if d["answer"] == r"\frac{1}{2}") if any(d["answer"] == r"\frac{1}{2}" for d in docs) else docs[0]
    g = task.grade(doc, f"... so the result is $\\boxed{{{doc['answer']}}}$")
    assert g == {"answer": task.extract(f"\\boxed{{{doc['answer']}}}"), "correct": True, "valid": True}
    assert task.grade(doc, "no box here") == {"answer": None, "correct": False, "valid": False}


def test_gold_sanity(task, docs):
    oracle = np.mean([task.grade(d, task.oracle_completion(d))["correct"] for d in docs])
    assert oracle >= 0.99  # measured: 1.000 (reference solutions' last \boxed{} vs the answer field)
    perm = np.random.default_rng(0).permutation(len(docs))[:200]  # math-verify is slow: 200 pairs
    shuffled = np.mean([task.grade(docs[i], docs[p]["solution"])["correct"] for i, p in zip(range(200), perm)])
    assert shuffled <= 0.02  # measured: 0.000 on these 200 (0.002 on all 500)


def test_prompt_is_the_authors_prompt(task, docs):
    content = task.prompt(docs[0])[0]["content"]
    assert content.startswith("Solve the following math problem step-by-step: " + docs[0]["problem"])
    assert content.endswith("\n\nPresent the answer in LaTex format: \\boxed{Your answer}")
