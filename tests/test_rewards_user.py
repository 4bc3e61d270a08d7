"""Rewards a user writes (reward=python) and weighted mixes (reward=mix): all four stages, exact weighted sums,
honest FLOPs (a Python part costs 0), and one-line errors for bad targets and bad values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from _helpers import TOY

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.methods.base import NonFiniteRewardError
from qalign_repro.rm.mix import MixReward, build_reward
from qalign_repro.rm.python import PythonReward
from qalign_repro.rm.toy import ToyReward
from qalign_repro.store.storage import RunStore, list_runs

STEPS, PROMPTS = 4, 3
MIX = ("reward.components=[{reward: toy, weight: 2.0}, "
       "{reward: {kind: python, name: len, target: '_user_rewards:by_len'}, weight: -1.5}]")
MSGS = [[{"role": "user", "content": "q"}]] * 3
TEXTS = ["a", "abba", "bbbbbb"]


def _cfg(root, *extra: str):
    from qalign_repro.cli import compose_config

    return compose_config([*TOY, f"output_root={root}", f"dataset.n={PROMPTS}", f"steps={STEPS}", "beta=1.0",
                           "method=qalign", *extra])


def _four_stages(root, *extra: str) -> tuple[RunStore, pd.DataFrame]:
    from qalign_repro.stages.evaluate import evaluate_run
    from qalign_repro.stages.plot import plot
    from qalign_repro.stages.predict import predict
    from qalign_repro.stages.run import execute

    store = execute(_cfg(root, *extra))
    evaluate_run(str(root), store.name)
    table = predict(_cfg(root, "runs=all", *extra))
    paths = plot(_cfg(root, "runs=all", *extra))
    assert any(p.name == "table1.md" for p in paths) and all(p.stat().st_size > 0 for p in paths)
    return RunStore(root, store.name, readonly=True), table


def test_python_reward_through_all_four_stages(tmp_path):
    store, table = _four_stages(tmp_path, "reward=python", "reward.target=_user_rewards:by_len")
    assert store.meta["reward"]["kind"] == "python" and store.meta["reward"]["n_params"] == 0
    outs = [o for inst in store.iter_instances() for o in inst["outputs"]]
    assert len(outs) == STEPS * PROMPTS
    for o in outs:
        assert o["reward"] == 0.25 * len(o["text"]) and o["tokens_scored"] == 0
    # FLOPs: the Python reward is charged nothing, and the table says so
    assert (table["tokens_rm"] == 0).all() and (table["flops_rm"] == 0).all()
    assert (table["flops"] == table["flops_policy"]).all() and (table["flops_policy"] > 0).all()
    assert set(table["reward_model"]) == {"python:_user_rewards:by_len (0 FLOPs)"}


def test_mix_through_all_four_stages_with_honest_flops(tmp_path):
    store, table = _four_stages(tmp_path, "reward=mix", MIX)
    meta = store.meta["reward"]
    assert meta["kind"] == "mix" and meta["n_params"] == 1  # the toy RM's parameters only
    assert [(c["kind"], c["weight"], c["n_params"]) for c in meta["components"]] == [
        ("model", 2.0, 1), ("python", -1.5, 0)]
    toy = ToyReward({})
    for inst in store.iter_instances():
        for o in inst["outputs"]:
            assert o["reward"] == 2.0 * toy.value(o["text"]) + -1.5 * (0.25 * len(o["text"]))
            if o["accepted"]:  # the stored text is the scored proposal: what the toy RM read, python adds 0
                assert o["tokens_scored"] == len(o["text"]) + 1
    qalign = table[table["rule"] == "qalign"].sort_values("n")
    assert (qalign["flops_rm"] == 2.0 * 1 * qalign["tokens_rm"]).all() and (qalign["tokens_rm"] > 0).all()
    assert set(table["reward_model"]) == {"mix(2×toy + -1.5×len [python, 0 FLOPs])"}
    equal = (tmp_path / "tables" / "default" / "equal_flops.md").read_text()
    assert "Rewards and their FLOPs: mix(2×toy + -1.5×len [python, 0 FLOPs])" in equal


def test_mix_equals_the_weighted_sum_of_its_components_exactly():
    toy, length, b = ToyReward({"seed": 3}), PythonReward({"target": "_user_rewards:by_len"}), \
        PythonReward({"target": "_user_rewards:count_b"})
    weights = [0.7, -0.013, 3.1]
    mix = MixReward(list(zip([toy, length, b], weights)))
    got = mix.score(MSGS, TEXTS)
    parts = [r.score(MSGS, TEXTS).rewards for r in (toy, length, b)]
    want = np.zeros(3)
    for w, p in zip(weights, parts):
        want += w * p
    assert got.rewards.tolist() == want.tolist()  # bitwise: same float64 operations in the same order
    assert not np.allclose(got.rewards, parts[0])  # every component counts
    assert got.tokens == toy.score(MSGS, TEXTS).tokens


def test_mix_scales_tokens_of_model_components_by_their_size():
    small, big = ToyReward({}), ToyReward({"seed": 1})
    small.n_params, big.n_params = 10, 40
    mix = MixReward([(small, 1.0), (big, 1.0), (PythonReward({"target": "_user_rewards:by_len"}), 1.0)])
    assert mix.n_params == 40
    # 2·40·tokens must equal 2·10·t_small + 2·40·t_big
    assert mix.score(MSGS, TEXTS).tokens == [round((len(t) + 1) * (10 / 40 + 1)) for t in TEXTS]


def test_batched_target_gives_the_same_rewards():
    one = PythonReward({"target": "_user_rewards:by_len"}).score(MSGS, TEXTS).rewards
    many = PythonReward({"target": "_user_rewards:by_len_batched", "batched": True}).score(MSGS, TEXTS).rewards
    assert one.tolist() == many.tolist() == [0.25, 1.0, 1.5]
    with pytest.raises(DataError, match="returned 1 values for 3 completions"):
        PythonReward({"target": "_user_rewards:short_batch", "batched": True}).score(MSGS, TEXTS)


def test_python_api_load_reward_builds_python_and_mix():
    from qalign_repro.api import load_reward

    r = load_reward("python", target="_user_rewards:count_b")
    assert r.n_params == 0 and r.score(MSGS, TEXTS).rewards.tolist() == [0.0, 2.0, 6.0]
    mix = load_reward({"kind": "mix", "name": "m", "components": [
        {"reward": "toy", "weight": 1.0},
        {"reward": {"kind": "python", "target": "qalign_repro.rm.builtin:length_penalty"}, "weight": 0.5}]})
    toy = ToyReward({})
    assert mix.score(MSGS, TEXTS).rewards.tolist() == [toy.value(t) + 0.5 * -len(t) for t in TEXTS]


def test_shipped_mix_on_the_hf_backend_is_the_tiny_rm_plus_the_length_penalty():
    """The default backend (hf) loads the shipped tiny RM for the mix's model part; the mix adds 0.01 × length."""
    from qalign_repro.cli import compose_config
    from qalign_repro.rm.mix import build_reward

    cfg = compose_config(["reward=mix"])
    from qalign_repro.rm.hf import HFReward

    mix = build_reward(dict(cfg.reward), {"device": "cpu"}, HFReward)
    rm = mix.components[0].reward
    texts = ["5+3=8. The answer is 8.", "The answer is 12."]
    msgs = [[{"role": "user", "content": "Tom has 5 apples and gets 3 more. How many?"}]] * 2
    alone = rm.score(msgs, texts)
    got = mix.score(msgs, texts)
    assert got.rewards.tolist() == (1.0 * alone.rewards + 0.01 * np.array([-len(t) for t in texts])).tolist()
    assert got.tokens == alone.tokens and mix.n_params == rm.n_params > 10_000
    assert mix.describe()["components"][1] == {"kind": "python", "name": "length_penalty", "n_params": 0,
                                               "flops": 0, "target": "qalign_repro.rm.builtin:length_penalty",
                                               "weight": 0.01}
    mix.close()


def test_shipped_mix_yaml_builds_its_model_part_with_the_backend_class():
    from qalign_repro.cli import compose_config
    from qalign_repro.stages.run import build_backends

    _, reward = build_backends(compose_config([*TOY, "reward=mix"]))
    assert [type(c.reward).__name__ for c in reward.components] == ["ToyReward", "PythonReward"]
    assert [c.weight for c in reward.components] == [1.0, 0.01]


@pytest.mark.parametrize("target, says", [
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' cannot be imported"),
    ("_user_rewards:missing", "has no attribute 'missing'"),
    ("_user_rewards:NOT_CALLABLE", "is a float, not callable"),
    ("_user_rewards", "is not of the form"),
])
def test_bad_target_is_one_line_config_error_before_any_run_folder(tmp_path, target, says):
    from qalign_repro.stages.run import execute

    with pytest.raises(ConfigError, match=says) as info:
        execute(_cfg(tmp_path, "reward=python", f"reward.target={target}"))
    assert "\n" not in str(info.value)
    assert list_runs(tmp_path) == []


def test_unset_target_and_bad_mix_entries_are_config_errors():
    from qalign_repro.cli import compose_config

    with pytest.raises(ConfigError, match="reward.target must be set"):
        compose_config([*TOY, "reward=python"])
    for spec, says in (({"reward": "nope", "weight": 1.0}, "reward='nope' is not a reward config"),
                       ({"reward": "toy"}, "is invalid; allowed: {reward:"),
                       ({"reward": "toy", "weight": "x"}, "weight='x' of 'toy' is not a number")):
        with pytest.raises(ConfigError, match=says):
            build_reward({"kind": "mix", "components": [spec]}, {}, ToyReward)
    with pytest.raises(ConfigError, match="reward.kind='rule' is not a known reward kind"):
        build_reward({"kind": "rule"}, {}, ToyReward)


@pytest.mark.parametrize("target, error, says", [
    ("_user_rewards:nan_reward", NonFiniteRewardError, "reward '_user_rewards:nan_reward' returned nan"),
    ("_user_rewards:word_reward", DataError, "reward '_user_rewards:word_reward' returned 'high' \\(str\\)"),
])
def test_bad_values_stop_the_step_and_store_nothing(tmp_path, target, error, says):
    from qalign_repro.stages.run import execute

    for reward in (["reward=python", f"reward.target={target}"],
                   ["reward=mix", f"reward.components=[{{reward: toy, weight: 1.0}}, "
                    f"{{reward: {{kind: python, target: '{target}'}}, weight: 0.0}}]"]):
        root = tmp_path / reward[0].split("=")[1]
        with pytest.raises(error, match=says) as info:
            execute(_cfg(root, *reward))
        assert "\n" not in str(info.value) and "nothing was stored" in str(info.value)
        (name,) = list_runs(root)
        store = RunStore(root, name, readonly=True)
        assert all(inst["outputs"] == [] for inst in store.iter_instances())


def test_verifier_builtin_grades_by_the_tasks_gold():
    from qalign_repro.api import load_task
    from qalign_repro.rm.builtin import length_penalty, verifier

    task = load_task("arith", n=3)
    verify = verifier("arith")
    for doc in task.docs():
        msgs = task.prompt(doc)
        assert verify(msgs, task.oracle_completion(doc)) == 1.0
        wrong = f"The answer is {int(task.gold(doc)) + 1}."
        assert verify(msgs, wrong) == 0.0
    with pytest.raises(DataError, match="is not a doc of arith"):
        verify([{"role": "user", "content": "What is love?"}], "The answer is 1.")
    assert length_penalty(MSGS[0], "abc") == -3.0 and math.isfinite(length_penalty(MSGS[0], ""))
