"""Selection rules on hand-made cases: ties, invalid answers, single samples, MBR medoids, ROUGE parity."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from qalign_repro.analysis import selection as sel


def codes_of(*rows):
    return sel.encode_answer_matrix(rows)


def test_encode_answers_first_occurrence_and_invalid():
    assert sel.encode_answers(["7", None, "3", "7", "3", None]).tolist() == [0, -1, 1, 0, 1, -1]
    assert sel.encode_answers([["a"], ["a"], None]).tolist() == [0, 0, -1]  # unhashable answers


def test_budgets_axis():
    assert sel.budgets(16) == [1, 2, 4, 8, 16]
    assert sel.budgets(24, [3, 100]) == [1, 2, 3, 4, 8, 16, 24]
    assert sel.budgets(1) == [1]


def test_majority_vote_counts_and_ties():
    codes = codes_of(
        ["1", "2", "2", "1", "3"],  # tie 2-2 between "1" and "2": "1" occurs first -> sample 0
        ["5", "4", "4", "5", "4"],  # "4" wins 3-2 -> its first occurrence, sample 1
        [None, "9", None, "8", "8"],  # "8" wins; invalid never votes
    )
    s = sel.majority_vote(codes, 5)
    assert s.index.tolist() == [0, 1, 3]
    assert s.valid.all()
    # budget 3: row 0 -> "2" has two votes (samples 1,2)
    assert sel.majority_vote(codes, 3).index.tolist() == [1, 1, 1]


def test_majority_vote_all_invalid_is_wrong():
    codes = codes_of([None, None, None], ["1", None, "1"])
    correct = np.array([[True, True, True], [True, False, True]])
    s = sel.majority_vote(codes, 3)
    assert s.valid.tolist() == [False, True]
    assert s.correct(correct).tolist() == [0, 1]  # the all-invalid prompt counts as wrong
    all_invalid = codes_of([None], [None])
    assert not sel.majority_vote(all_invalid, 1).valid.any()


def test_single_sample_rules():
    codes = codes_of(["3"], [None])
    rewards = np.array([[0.5], [2.0]])
    assert sel.majority_vote(codes, 1).index.tolist() == [0, 0]
    assert sel.weighted_majority_vote(codes, rewards, 1, beta=1.0).valid.tolist() == [True, False]
    bon = sel.best_of_n(rewards, 1, codes)
    assert bon.index.tolist() == [0, 0] and bon.valid.tolist() == [True, False]


def test_weighted_majority_vote_follows_weights_and_beta():
    codes = codes_of(["a", "b", "b", "b"])
    rewards = np.array([[5.0, 0.0, 0.0, 0.0]])
    # beta=1: weight of "a" = e^5 dominates three e^0
    assert sel.weighted_majority_vote(codes, rewards, 4, beta=1.0).index.tolist() == [0]
    # beta large: weights ~uniform -> MV
    assert sel.weighted_majority_vote(codes, rewards, 4, beta=1e6).index.tolist() == [1]
    # huge reward gaps do not overflow
    big = np.array([[1e6, 0.0, 0.0, 0.0]])
    assert sel.weighted_majority_vote(codes, big, 4, beta=0.01).index.tolist() == [0]


def test_weighted_majority_vote_tie_goes_to_first_occurrence():
    codes = codes_of(["x", "y", "y", "x"])
    rewards = np.array([[0.3, 0.1, 0.3, 0.1]])  # equal weight sums, different summation orders
    assert sel.weighted_majority_vote(codes, rewards, 4, beta=0.7).index.tolist() == [0]


def test_weighted_vote_ignores_invalid_high_reward():
    codes = codes_of([None, "b", "c"])
    rewards = np.array([[100.0, 1.0, 0.0]])
    s = sel.weighted_majority_vote(codes, rewards, 3, beta=1.0)
    assert s.index.tolist() == [1] and s.valid.all()


def test_best_of_n_ties_nan_and_invalid():
    rewards = np.array([[1.0, 3.0, 3.0], [np.nan, 0.0, -1.0], [2.0, 1.0, 0.0]])
    codes = codes_of(["a", "b", "c"], ["a", "b", "c"], [None, "b", "c"])
    s = sel.best_of_n(rewards, 3, codes)
    assert s.index.tolist() == [1, 1, 0]  # earliest max; NaN never wins
    assert s.valid.tolist() == [True, True, False]  # BoN may pick an answerless sample
    assert sel.best_of_n(rewards, 1).index.tolist() == [0, 0, 0]


def test_qalign_uses_states_after_burn_in():
    codes = codes_of(["w", "w", "w", "r", "r"])
    assert sel.qalign(codes, 5, burn_in=0).index.tolist() == [0]
    assert sel.qalign(codes, 5, burn_in=2).index.tolist() == [3]  # window w, r, r
    with pytest.raises(ValueError):
        sel.qalign(codes, 2, burn_in=2)


def test_selection_vectorised_equals_per_prompt_loop():
    from collections import Counter

    rng = np.random.default_rng(3)
    answers = [[None if rng.random() < 0.2 else str(rng.integers(0, 4)) for _ in range(32)] for _ in range(50)]
    codes = sel.encode_answer_matrix(answers)
    for n in (1, 5, 32):
        got = sel.majority_vote(codes, n)
        for p, row in enumerate(answers):
            c = Counter(a for a in row[:n] if a is not None)
            if not c:
                assert not got.valid[p]
                continue
            top = max(c.values())
            winner = next(a for a in row[:n] if a is not None and c[a] == top)
            assert row[got.index[p]] == winner


def test_mbr_picks_the_medoid():
    texts = [
        "the cat sat on the mat",
        "a dog ran in the park",
        "the cat sat on a mat",
        "the cat lay on the mat",
        "stock prices fell sharply today",
    ]
    u = sel.rouge_utility(texts, "rouge1")
    assert sel.mbr(u, 5) == 0  # the sentence closest to the other cat sentences
    assert sel.mbr_all_budgets(u, [1, 2, 5]).tolist() == [0, 0, 0]
    # weights can move the choice: all mass on the dog sentence
    w = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    assert sel.mbr(u, 5, weights=w) == 1
    # stacked prompts and windows
    stack = np.stack([u, u[::-1, ::-1]])
    assert sel.mbr(stack, 5).tolist() == [0, 4]
    assert sel.mbr_all_budgets(u, [2, 5], start=1).tolist() == [1, 2]


def test_mbr_all_budgets_matches_single_budget():
    rng = np.random.default_rng(0)
    u = rng.random((3, 20, 20))
    u = (u + u.transpose(0, 2, 1)) / 2
    allb = sel.mbr_all_budgets(u, [1, 3, 7, 20], start=0)
    for b, n in enumerate([1, 3, 7, 20]):
        assert allb[:, b].tolist() == sel.mbr(u, n).tolist()


@pytest.mark.parametrize("metric,dense_df", [("rouge1", 0), ("rouge1", 3), ("rouge1", 10**9), ("rougeL", 64)])
def test_rouge_utility_equals_rouge_score(metric, dense_df, monkeypatch):
    """Exact parity with rouge-score, whether overlaps come from the matrix product, the pair lists or both."""
    monkeypatch.setattr(sel, "_DENSE_DF", dense_df)
    monkeypatch.setattr(sel, "_PAIR_BLOCK", 50)  # several pair blocks
    rng = random.Random(1)
    words = "the a cat dog sat on mat ran fast big small red blue tree İstanbul naïve x_y 42".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 140))) for _ in range(14)]
    texts += ["", "The cat!", "the cat", "the cat", "?!"]
    scorer = rouge_scorer.RougeScorer([metric])
    ref = np.array([[scorer.score(a, b)[metric].fmeasure for b in texts] for a in texts])
    np.testing.assert_allclose(sel.rouge_utility(texts, metric), ref, atol=1e-12)


def test_rouge_utility_rejects_unknown_metric():
    with pytest.raises(ValueError, match="rouge1"):
        sel.rouge_utility(["a"], "bleu")


def test_pool_chains_interleaves_chain_by_chain():
    # 2 prompts x 3 chains, 2 steps: value = 100*prompt + 10*chain + step
    v = np.array([[100 * p + 10 * j + s for s in range(2)] for p in range(2) for j in range(3)])
    pooled = sel.pool_chains(v, 3)
    assert pooled.tolist() == [[0, 10, 20, 1, 11, 21], [100, 110, 120, 101, 111, 121]]
    assert sel.pool_chains(v, 1) is v or np.array_equal(sel.pool_chains(v, 1), v)
    # burn-in b per chain = the first b*K pooled positions
    assert set(pooled[0, 1 * 3:] % 10) == {1}
    texts = np.array([[f"{p}{j}{s}" for s in range(2)] for p in range(2) for j in range(3)], dtype=object)
    assert sel.pool_chains(texts, 3)[1].tolist() == ["100", "110", "120", "101", "111", "121"]
    with pytest.raises(ValueError, match="groups of 4"):
        sel.pool_chains(v, 4)
    with pytest.raises(ValueError, match="chains=0"):
        sel.pool_chains(v, 0)
