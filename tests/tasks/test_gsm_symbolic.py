import collections
import json
import random
from fractions import Fraction

import numpy as np
import pytest

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.tasks import get_task
from qalign_repro.tasks._gsm_symbolic_templates import (
    ANSWER_FORMULA_EXCEPTIONS,
    NAMED_LISTS,
    UnsafeExpression,
    check_instance,
    compile_expr,
    draw,
    fmt,
    instantiate,
    number_word,
    parse_shown_number,
    parse_template,
    question_slots,
    safe_eval,
)
from qalign_repro.tasks.base import bundled_data_path
from qalign_repro.tasks.gsm_symbolic import load_templates


@pytest.fixture(scope="module")
def p2_templates():
    return load_templates("p2")


@pytest.fixture(scope="module")
def p2_rows():
    with open(bundled_data_path("gsm_symbolic", "GSM_p2.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_template_files_parse():
    counts = {v: len(load_templates(v)) for v in ("main", "p1", "p2")}
    assert counts == {"main": 100, "p1": 100, "p2": 50}  # SOURCE.md: 100 / 100 / 50 templates
    tpl = load_templates("main")[5]
    assert tpl.slot_vars == ["name", "drink", "m", "n", "x"]
    assert [line.targets for line in tpl.init] == [["name"], ["drink"], ["m"], ["n"], ["x"]]
    assert [c.source for c in tpl.conditions] == ["divides(x, m+n)"]
    assert tpl.answer_source == "((m*x)//(m+n))"


def test_every_official_p2_row_satisfies_its_template(p2_templates, p2_rows):
    """Values recovered from each of the 2,500 official P2 instances satisfy the template's #conditions, lie in
    their #init domains, and reproduce the instance's #### number (solution expression and #answer formula)."""
    assert len(p2_rows) == 2500
    failures, formula_off = [], collections.Counter()
    fields = domain = 0
    for row in p2_rows:
        res = check_instance(p2_templates[row["id"]], row["question"], row["answer"])
        if not res.ok:
            failures.append((row["id"], row["instance"], res.reason))
        elif not res.answer_formula_ok:
            formula_off[("p2", row["id"])] += 1
        fields += res.fields_checked
        domain += res.domain_checked
    assert failures == []
    # the only template whose #answer formula disagrees with Apple's own solutions (all of its 50 rows)
    assert dict(formula_off) == {key: 50 for key in ANSWER_FORMULA_EXCEPTIONS if key[0] == "p2"} == {("p2", 26): 50}
    assert domain > 15000  # every recovered value was checked against its #init domain (measured 16,850)
    assert fields > 30000  # solution {expression} fields re-evaluated and compared with the text (measured 31,229)


def test_named_lists_cover_every_value_in_apples_p2_rows(p2_templates, p2_rows):
    """Apple's lists are not published; ours must at least hold every value Apple's P2 instances drew from them."""
    missing = collections.defaultdict(set)
    for row in p2_rows:
        tpl = p2_templates[row["id"]]
        shown = question_slots(tpl, row["question"])
        for line in tpl.init:
            lists = [n for n in line.reads if n in NAMED_LISTS]
            if len(lists) != 1:
                continue
            texts = {(v[0] if isinstance(v, tuple) else fmt(v)).lower() for v in NAMED_LISTS[lists[0]]}
            for target in line.targets:
                if target in shown and shown[target].lower() not in texts:
                    missing[lists[0]].add(shown[target])
    assert dict(missing) == {}


def test_check_instance_rejects_a_tampered_row(p2_templates, p2_rows):
    row = p2_rows[0]
    assert check_instance(p2_templates[0], row["question"], row["answer"]).ok
    bad_answer = row["answer"].rsplit("####", 1)[0] + "#### 33"
    assert not check_instance(p2_templates[0], row["question"], bad_answer).ok
    bad_value = row["question"].replace("32-foot", "33-foot", 1)  # x=33 breaks divides(x * 12, ...)
    res = check_instance(p2_templates[0], bad_value, row["answer"])
    assert not res.ok and "condition" in res.reason


def test_generated_p2_instances_pass_the_same_check(p2_templates):
    """Instances drawn from the P2 templates satisfy the same conditions and answer formulas as Apple's rows."""
    for tid, tpl in p2_templates.items():
        for inst in instantiate(tpl, 1, seed=123):
            res = check_instance(tpl, inst["question"], inst["answer"])
            assert res.ok, (tid, res.reason, inst["question"])
            assert res.answer_formula_ok or ("p2", tid) in ANSWER_FORMULA_EXCEPTIONS
            assert res.fields_matched == res.fields_checked


@pytest.mark.parametrize("variant, ids", [("main", [0, 5, 17, 40, 77]), ("p1", [3, 11, 29, 64, 98])])
def test_generated_main_and_p1_instances_are_consistent(variant, ids):
    templates = load_templates(variant)
    for tid in ids:
        tpl = templates[tid]
        for inst in instantiate(tpl, 2, seed=7):
            res = check_instance(tpl, inst["question"], inst["answer"])
            assert res.ok, (variant, tid, res.reason)
            assert "{" not in inst["question"] and "<<" not in inst["answer"]
            assert inst["answer"].strip().splitlines()[-1].startswith("####")


def test_instantiation_is_seeded_and_distinct(p2_templates):
    tpl = p2_templates[3]
    a, b = instantiate(tpl, 5, seed=0), instantiate(tpl, 5, seed=0)
    assert [x["question"] for x in a] == [x["question"] for x in b]
    assert len({x["question"] for x in a}) == 5
    assert [x["question"] for x in instantiate(tpl, 5, seed=1)] != [x["question"] for x in a]


def test_impossible_template_is_a_data_error(p2_templates):
    row = {"id_shuffled": 999, "id_orig": 0, "question_annotated": "{x,3} apples\n#init:\n- $x = range(1, 5)\n#conditions:\n- x > 10\n#answer: x",
           "answer_annotated": "#### {x}"}
    with pytest.raises(DataError, match="template 999: no valid instance"):
        draw(parse_template(row, "p2"), random.Random(0), budget=2000)


@pytest.mark.parametrize(
    "source",
    ["__import__('os').system('true')", "().__class__.__bases__", "open('/etc/passwd')", "(lambda: 1)()",
     "[x for x in range(3)]", "_secret", "np.load('x')", "2 ** 10 ** 10"],
)
def test_template_code_is_restricted(source):
    with pytest.raises(UnsafeExpression):
        compile_expr(source)


def test_no_builtins_in_template_namespace():
    code, _ = compile_expr("abs")  # a name, not a call: compiles, but there are no builtins to find
    with pytest.raises(NameError):
        safe_eval(code, {})
    with pytest.raises(UnsafeExpression, match="call of len"):
        compile_expr("len([1])")


@pytest.mark.parametrize(
    "text, value",
    [("1,200", 1200), ("3.5", 3.5), ("1/3", Fraction(1, 3)), ("thirty five", 35), ("forty-two", 42), ("twice", 2),
     ("nine times", 9), ("one-third", Fraction(1, 3)), ("two-sixths", Fraction(1, 3)), ("a quarter", Fraction(1, 4)),
     ("half", Fraction(1, 2)), ("Benny", None)],
)
def test_parse_shown_number(text, value):
    assert parse_shown_number(text) == value


def test_number_word():
    assert [number_word(n) for n in (4, 14, 35, 100, 121)] == ["four", "fourteen", "thirty five", "one hundred", "one hundred twenty one"]


class TestTask:
    def test_p2_bundled_loads_apples_rows(self, cfg_of):
        task = get_task(cfg_of("gsm_symbolic_p2"))
        docs = task.load_all()
        assert len(docs) == 2500 and len({d["id"] for d in docs}) == 2500
        assert docs[0]["id"] == "0-0" and task.gold(docs[0]) == "32.5"
        assert task.data_source()["sha256"] == "f7d6701619f824f4fedd0a914b1cfbc0fd31f61617887aa7fe318d018dda3f29"

    def test_gold_sanity_p2(self, cfg_of):
        task = get_task(cfg_of("gsm_symbolic_p2"))
        docs = task.load_all()
        assert np.mean([task.grade(d, task.oracle_completion(d))["correct"] for d in docs]) >= 0.99  # measured 1.000
        perm = np.random.default_rng(0).permutation(len(docs))
        shuffled = np.mean([task.grade(d, task.oracle_completion(docs[p]))["correct"] for d, p in zip(docs, perm)])
        assert shuffled <= 0.05  # measured 0.006

    def test_bundled_main_is_a_config_error(self, cfg_of):
        with pytest.raises(ConfigError, match="main instances are not shipped .*allowed: generated"):
            get_task(cfg_of("gsm_symbolic", source="bundled")).load_all()

    def test_generated_docs_subset_is_lazy_seeded_and_cached(self, cfg_of, tmp_path):
        cfg = cfg_of("gsm_symbolic", n=6, cache_dir=str(tmp_path))
        task = get_task(cfg)
        docs = task.docs()
        assert len(docs) == 6 and all("-" in d["id"] for d in docs)
        made = sorted(p.name for p in tmp_path.rglob("*.jsonl"))
        assert made == sorted({f"{int(d['id'].split('-')[0]):04d}.jsonl" for d in docs})  # only the needed templates
        again = get_task(cfg).docs()
        assert [(d["id"], d["question"]) for d in again] == [(d["id"], d["question"]) for d in docs]
        for d in docs:
            assert task.grade(d, task.oracle_completion(d))["correct"]
        assert task.data_source()["source"] == "generated"
        other = get_task(cfg_of("gsm_symbolic", n=6, cache=False, generation_seed=1)).docs()
        assert [d["id"] for d in other] == [d["id"] for d in docs]  # same subset ...
        assert [d["question"] for d in other] != [d["question"] for d in docs]  # ... other instances

    def test_prompt(self, cfg_of):
        task = get_task(cfg_of("gsm_symbolic_p2"))
        doc = task.load_all()[0]
        assert task.prompt(doc) == [{"role": "user", "content": "Solve the following grade school math problem step-by-step: " + doc["question"]}]
