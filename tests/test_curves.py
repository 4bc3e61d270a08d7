"""``analysis/curves.py``: the budget-curve maths on hand-made arrays (no store)."""

from __future__ import annotations

import numpy as np
import pytest

from qalign_repro.analysis import curves
from qalign_repro.analysis import selection as sel
from qalign_repro.errors import DataError


def _data(codes, score, reward) -> curves.RunData:
    codes = np.asarray(codes, dtype=np.int32)
    zeros = np.zeros(codes.shape, dtype=np.int64)
    return curves.RunData(codes, np.asarray(score, float), np.asarray(reward, float), np.ones(codes.shape, bool),
                          {k: zeros for k in ("tokens_generated", "tokens_prefilled", "tokens_cached",
                                              "tokens_scored")})


def test_a_chain_rule_keeps_the_stored_order_and_skips_the_burn_in():
    # one prompt; answer 0 (correct) at positions 0, 1; answer 1 (wrong) at 2, 3, 4
    data = _data([[0, 0, 1, 1, 1]], [[1, 1, 0, 0, 0]], [[0, 0, 0, 0, 5]])
    bud = [1, 2, 3, 5]
    orders = np.array([[[4, 3, 2, 1, 0]]])  # one random order: the stored one reversed
    rules = [sel.RULES[r] for r in ("qalign", "mv", "bon")]
    res = curves.evaluate_rules(data, rules, bud, orders, burn_in=1, beta=1.0, rouge=False)
    # qalign ignores the order: states 1.. only, NaN where n <= burn_in
    assert np.isnan(res["qalign"]["score"][0, 0])
    np.testing.assert_array_equal(res["qalign"]["score"][0, 1:], [1.0, 1.0, 0.0])  # n=3: tie 0/1, earliest wins
    # mv follows the reversed order: the first samples are the wrong answer
    np.testing.assert_array_equal(res["mv"]["score"][0], [0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(res["bon"]["reward"][0], [5.0, 5.0, 5.0, 5.0])
    cv = curves.curve(res["qalign"], bud, n_boot=0, ci=0.95, seed=0)
    assert list(cv["n"]) == [2, 3, 5] and list(cv["accuracy"]) == [1.0, 1.0, 0.0]


def test_mean_cost_averages_prompts_and_orders():
    costs = np.array([[1, 2, 3], [10, 20, 30]])
    np.testing.assert_allclose(curves.mean_cost(costs, [1, 3], None), [5.5, 33.0])
    orders = np.array([[[2, 1, 0], [0, 1, 2]]])
    np.testing.assert_allclose(curves.mean_cost(costs, [1], orders), [(3 + 10) / 2])


def test_shards_that_are_not_a_round_robin_split_are_refused():
    np.testing.assert_array_equal(curves.original_positions([2, 2]), [0, 2, 1, 3])
    with pytest.raises(DataError, match=r"shard sizes \[1, 3\] are not a round-robin split"):
        curves.original_positions([1, 3])
