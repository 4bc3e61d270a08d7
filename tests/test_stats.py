"""Bootstrap CIs and MCMC diagnostics."""

from __future__ import annotations

import numpy as np

from qalign_repro.analysis import stats


def test_bootstrap_ci_is_seeded_and_contains_mean():
    rng = np.random.default_rng(0)
    v = (rng.random((200, 3)) < [0.2, 0.5, 0.9]).astype(float)
    lo1, hi1 = stats.bootstrap_ci(v, 500, 0.95, seed=7)
    lo2, hi2 = stats.bootstrap_ci(v, 500, 0.95, seed=7)
    np.testing.assert_array_equal(lo1, lo2)
    np.testing.assert_array_equal(hi1, hi2)
    assert np.all(lo1 <= v.mean(0)) and np.all(v.mean(0) <= hi1)


def test_bootstrap_ci_width_shrinks_with_more_prompts():
    rng = np.random.default_rng(1)
    widths = []
    for n in (25, 100, 400, 1600):
        v = (rng.random(n) < 0.6).astype(float)
        lo, hi = stats.bootstrap_ci(v, 1000, 0.95, seed=0)
        widths.append(float(hi - lo))
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # ~1/sqrt(n): 64x prompts -> ~8x narrower


def test_bootstrap_ci_coverage_sanity():
    """95% intervals of a Bernoulli(0.3) mean over 150 prompts cover the truth in ~95% of datasets."""
    rng = np.random.default_rng(2)
    trials, p = 300, 0.3
    v = (rng.random((150, trials)) < p).astype(float)  # columns = independent datasets
    lo, hi = stats.bootstrap_ci(v, 1000, 0.95, seed=3)
    coverage = np.mean((lo <= p) & (p <= hi))
    assert 0.9 <= coverage <= 0.99, coverage


def test_bootstrap_ci_degenerate_inputs():
    lo, hi = stats.bootstrap_ci(np.array([[1.0, 0.0]]), 100)
    assert lo.tolist() == hi.tolist() == [1.0, 0.0]
    lo, hi = stats.bootstrap_ci(np.ones((10, 2)), 100)
    assert lo.tolist() == hi.tolist() == [1.0, 1.0]


def test_acceptance_rate_skips_initial_state():
    acc = np.array([[True, False, True, True, False], [True, False, False, False, False]])
    np.testing.assert_allclose(stats.acceptance_rate(acc), [0.5, 0.0])
    np.testing.assert_allclose(stats.acceptance_rate(acc, skip_first=False), [0.6, 0.2])


def test_ess_iid_ar1_and_constant():
    rng = np.random.default_rng(0)
    ess_iid = stats.effective_sample_size(rng.normal(size=(3, 4000)))
    assert np.all((ess_iid > 3000) & (ess_iid < 5000))
    phi, n = 0.9, 40000
    x, e = np.zeros(n), rng.normal(size=n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    expected = n * (1 - phi) / (1 + phi)  # integrated autocorrelation time (1+phi)/(1-phi)
    assert abs(stats.effective_sample_size(x) / expected - 1) < 0.25
    assert np.isnan(stats.effective_sample_size(np.full(50, 0.1)))


def test_burn_in_estimators_find_the_drift():
    rng = np.random.default_rng(4)
    drift = np.concatenate([np.linspace(-3.0, 0.0, 60), rng.normal(0, 0.05, 540)])
    b = stats.burn_in_first_crossing(drift)
    assert 50 <= b <= 70
    chains = drift[None, :] + rng.normal(0, 1.0, (64, 600))
    assert 40 <= stats.estimate_burn_in(chains) <= 80
    stationary = rng.normal(size=600)
    assert stats.burn_in_first_crossing(stationary) < 10
    assert stats.burn_in_geweke(stationary) == 0
    assert abs(float(stats.geweke_z(stationary))) < 3
    assert stats.burn_in_geweke(drift) > 0
