"""``evaluate.rescore``: a second RM scores every stored output into the eval ``reward:<name>``, which
``predict.reward`` selects with (BoN under another RM) while accuracy still comes from the grades; rerunning
scores only what is missing, and bad values stop in one line before anything is graded."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from _helpers import TOY, run_module

from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError, DataError
from qalign_repro.rm.toy import ToyReward
from qalign_repro.stages.evaluate import evaluate_run, plan_rescore, rescore_run
from qalign_repro.stages.run import execute
from qalign_repro.store import rescores
from qalign_repro.store.storage import RunStore

SECOND = "evaluate.rescore={name: toy2, seed: 1, scale: 3.0}"


def _overrides(root, *extra: str) -> list[str]:
    return [*TOY, f"output_root={root}", "method=ancestral", "dataset.n=6", "steps=8", *extra]


def _run(root, *extra: str) -> str:
    store = execute(compose_config(_overrides(root, *extra)))
    name = store.name
    store.close()
    return name


def _hash_grades(root, name: str) -> None:
    """Toy outputs never parse as arithmetic: each distinct text is "correct" by a hash of its content and its
    answer is the text, so BoN accuracy depends on which output BoN picks."""
    store = RunStore(root, name)
    try:
        grades = []
        for inst in store.iter_instances():
            texts = [o["text"] for o in inst["outputs"]]
            grades.append({"id": inst["input"]["id"], "answer": [t or None for t in texts], "metrics": {},
                           "correct": [hashlib.sha256(t.encode()).digest()[0] % 2 == 0 for t in texts]})
        store.write_eval("grades", grades)
    finally:
        store.close()


def _texts(root, name: str) -> list[list[str]]:
    store = RunStore(root, name, readonly=True)
    try:
        return [[o["text"] for o in inst["outputs"]] for inst in store.iter_instances()]
    finally:
        store.close()


def _eval(root, name: str, key: str) -> list[dict]:
    store = RunStore(root, name, readonly=True)
    try:
        return store.read_eval(key)
    finally:
        store.close()


def test_rescore_via_cli_is_the_second_rms_scores_and_a_rerun_does_nothing(tmp_path):
    name = _run(tmp_path)
    first = run_module("evaluate", *_overrides(tmp_path, SECOND))
    assert "rescored 48 outputs with toy2 -> eval 'reward:toy2'" in first.stdout
    second_rm = ToyReward({"seed": 1, "scale": 3.0})
    entries = _eval(tmp_path, name, "reward:toy2")
    assert [e["reward"] for e in entries] == [[second_rm.value(t) for t in ts] for ts in _texts(tmp_path, name)]
    store = RunStore(tmp_path, name, readonly=True)
    assert store.meta[rescores.META_KEY]["reward:toy2"]["reward"] == {"name": "toy2", "seed": 1, "scale": 3.0}
    assert store.has_eval("grades")
    store.close()
    again = run_module("evaluate", *_overrides(tmp_path, SECOND))
    assert "already rescored with toy2" in again.stdout and "nothing to do" in again.stdout
    assert _eval(tmp_path, name, "reward:toy2") == entries


def test_predict_selects_with_the_rescored_rewards_and_says_so(tmp_path):
    from qalign_repro.stages.predict import PredictOptions, predict_runs

    name = _run(tmp_path)
    _hash_grades(tmp_path, name)
    rescore_run(str(tmp_path), name, plan_rescore(compose_config(_overrides(tmp_path, SECOND))))
    own, _ = predict_runs(tmp_path, [name], PredictOptions(bootstrap=0))
    other, _ = predict_runs(tmp_path, [name], PredictOptions(bootstrap=0, reward="reward:toy2"))

    store = RunStore(tmp_path, name, readonly=True)
    stored = np.array([[o["reward"] for o in inst["outputs"]] for inst in store.iter_instances()])
    correct = np.array([g["correct"] for g in store.read_eval("grades")], dtype=float)
    store.close()
    second = rescores.read_rescored(RunStore(tmp_path, name, readonly=True), "reward:toy2", 8)
    picks_own, picks_other = stored.argmax(axis=1), second.argmax(axis=1)
    assert (picks_own != picks_other).any()  # the second RM prefers other outputs

    def row(table, rule):
        return table[(table["rule"] == rule) & (table["n"] == 8)].iloc[0]

    rows = np.arange(len(correct))
    assert row(own, "bon")["accuracy"] == pytest.approx(correct[rows, picks_own].mean())
    assert row(other, "bon")["accuracy"] == pytest.approx(correct[rows, picks_other].mean())
    assert row(other, "bon")["mean_reward_selected"] == pytest.approx(second.max(axis=1).mean())
    assert row(other, "mv")["accuracy"] == row(own, "mv")["accuracy"]  # no reward in a plain vote
    assert set(other.loc[other["rule"].isin(["bon", "wmv"]), "selection_reward"]) == {"reward:toy2"}
    assert "selection_reward" not in own.columns  # the default table keeps its columns


def test_rescore_resumes_extended_runs_and_interrupted_rescores(tmp_path):
    small = _run(tmp_path, "steps=4")
    rescore = plan_rescore(compose_config(_overrides(tmp_path, SECOND)))
    rescore_run(str(tmp_path), small, rescore)
    assert [len(e["reward"]) for e in _eval(tmp_path, small, "reward:toy2")] == [4] * 6
    assert _run(tmp_path, "steps=8") == small  # the same run, extended
    calls: list[int] = []
    rm = rescore.reward()
    score = rm.score
    rm.score = lambda prompts, texts: calls.append(len(texts)) or score(prompts, texts)
    full = rescore_run(str(tmp_path), small, rescore)
    second_rm = ToyReward({"seed": 1, "scale": 3.0})
    assert [e["reward"] for e in full] == [[second_rm.value(t) for t in ts] for ts in _texts(tmp_path, small)]
    texts = _texts(tmp_path, small)
    assert sum(calls) == sum(len(set(ts[4:])) for ts in texts)  # only the new outputs (each distinct text once)

    store = RunStore(tmp_path, small)  # an interrupted rescore: the committed part holds fewer outputs
    store.write_eval("reward:toy2", [{**e, "reward": e["reward"][:3], "tokens": e["tokens"][:3]} if i % 2 else
                                     {"id": e["id"], "reward": [], "tokens": []} for i, e in enumerate(full)])
    store.close()
    calls.clear()
    assert rescore_run(str(tmp_path), small, rescore) == full
    assert sum(calls) == sum(len(set(ts[3:] if i % 2 else ts)) for i, ts in enumerate(texts))  # the rest only

    changed = plan_rescore(compose_config(_overrides(tmp_path, "evaluate.rescore={name: toy2, seed: 2}")))
    redone = rescore_run(str(tmp_path), small, changed)  # same name, another RM: scored again from scratch
    assert redone[0]["reward"][0] == ToyReward({"seed": 2}).value(_texts(tmp_path, small)[0][0]) != full[0]["reward"][0]


def test_bad_rescore_and_reward_values_are_one_line_before_any_work(tmp_path, capsys):
    name = _run(tmp_path)
    for value, message in (("evaluate.rescore=nope", "evaluate.rescore='nope' names no reward config; allowed: "),
                           ("evaluate.rescore=task_bt_rm", "leaves path unset"),
                           ("evaluate.rescore={from: tiny, path: /no/such/rm}", "/no/such/rm is not a folder")):
        proc = run_module("evaluate", *_overrides(tmp_path, value), check=False)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    store = RunStore(tmp_path, name, readonly=True)
    assert not store.has_eval("grades")  # refused before grading
    store.close()
    with pytest.raises(ConfigError, match="allowed: null, a conf/reward name"):
        plan_rescore(compose_config(_overrides(tmp_path, "evaluate.rescore=true")))
    from qalign_repro.stages.predict import PredictOptions, predict_runs

    with pytest.raises(ConfigError, match=r"predict.reward='toy2' is invalid; allowed: null or a rescore eval"):
        PredictOptions.from_config(compose_config(_overrides(tmp_path, "predict.reward=toy2")))
    evaluate_run(str(tmp_path), name)
    with pytest.raises(DataError, match="none of the selected runs could be predicted"):
        predict_runs(tmp_path, [name], PredictOptions(bootstrap=0, reward="reward:toy9"))
    assert "has no rescore eval 'reward:toy9'; allowed: none yet" in capsys.readouterr().err


@pytest.mark.slow
def test_rescoring_with_the_runs_own_rm_reproduces_its_rewards_on_the_shipped_models(tmp_path):
    """Through the real HF reward backend: the tiny RM's rescore equals what the run stored (up to float32
    batching), so a second RM's rewards are comparable with the run's own."""
    over = ["progress=false", f"output_root={tmp_path}", "method=ancestral", "dataset.n=3", "steps=4",
            "max_new_tokens=32", "evaluate.rescore=tiny"]
    name = execute(compose_config(over)).name
    entries = rescore_run(str(tmp_path), name, plan_rescore(compose_config(over)))
    store = RunStore(tmp_path, name, readonly=True)
    stored = [[o["reward"] for o in inst["outputs"]] for inst in store.iter_instances()]
    store.close()
    np.testing.assert_allclose([e["reward"] for e in entries], stored, atol=1e-4)


def test_rescored_tables_go_beside_the_run_rms_tables_not_over_them(tmp_path):
    name = _run(tmp_path)
    run_module("evaluate", *_overrides(tmp_path, SECOND))
    run_module("predict", *_overrides(tmp_path, "predict.bootstrap=0"))
    (own_table,) = (tmp_path / "predictions").glob("*/predictions.csv")  # one experiment's table
    before = own_table.read_bytes()
    run_module("predict", *_overrides(tmp_path, "predict.bootstrap=0", "predict.reward=reward:toy2"))
    rescored = own_table.parent / "reward-toy2" / "predictions.csv"
    assert own_table.read_bytes() == before
    assert "selection_reward" in rescored.read_text().splitlines()[0]
    assert (tmp_path / "runs" / name / "predictions.csv").is_file()
    assert (tmp_path / "runs" / name / "predictions-reward-toy2.csv").is_file()
