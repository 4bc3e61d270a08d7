"""Uncertainty and MCMC diagnostics as pure numpy functions.

* ``bootstrap_ci``: percentile bootstrap over prompts. Prompts are the unit of sampling (the benchmark is a
  sample of questions); one resampling matrix is shared by every column, so curves of one run are compared
  on the same resamples, and a fixed seed makes the CI reproducible.
* ``acceptance_rate``, ``effective_sample_size`` (Geyer's initial positive sequence estimator),
  ``geweke_z`` and two burn-in estimators for QAlign chains (see ``estimate_burn_in`` for the choice).
"""

from __future__ import annotations

import numpy as np

_BOOT_BLOCK = 256


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over axis 0 (prompts) of ``values`` ``[prompts, ...]``.

    Returns ``(low, high)`` shaped like ``values.shape[1:]``. Resamples are drawn as multinomial counts so
    every mean is one matrix product (memory O(block · prompts), independent of ``n_boot``). With fewer
    than two prompts, or ``n_boot`` = 0, the interval collapses to the mean.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci={ci} must be in (0, 1)")
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    flat = v.reshape(n, -1)
    mean = flat.mean(axis=0) if n else np.full(flat.shape[1], np.nan)
    if n < 2 or n_boot <= 0:
        return mean.reshape(v.shape[1:]), mean.reshape(v.shape[1:])
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, flat.shape[1]))
    for lo in range(0, n_boot, _BOOT_BLOCK):
        k = min(_BOOT_BLOCK, n_boot - lo)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(np.float64)
        means[lo: lo + k] = counts @ flat / n
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return low.reshape(v.shape[1:]), high.reshape(v.shape[1:])


# -- MCMC diagnostics ------------------------------------------------------------------------------------------
def acceptance_rate(accepted: np.ndarray, skip_first: bool = True) -> np.ndarray:
    """Fraction of accepted proposals per chain (last axis = steps). State 0 is the initial ancestral sample,
    stored as accepted without a proposal, so it is skipped by default."""
    a = np.asarray(accepted, dtype=bool)
    a = a[..., 1:] if skip_first else a
    if a.shape[-1] == 0:
        return np.full(a.shape[:-1], np.nan)
    return a.mean(axis=-1)


def identical_proposals(accepted: np.ndarray, unchanged: np.ndarray) -> np.ndarray:
    """Which steps proposed the current completion itself: accepted (an identical proposal has ratio 1, so it
    is always accepted) and the state did not change. ``unchanged[..., k]``: state k equals state k-1."""
    return np.asarray(accepted, dtype=bool) & np.asarray(unchanged, dtype=bool)


def changed_acceptance_rate(accepted: np.ndarray, unchanged: np.ndarray, skip_first: bool = True) -> np.ndarray:
    """Acceptance per chain over the proposals that differ from the current completion. With a peaked LM most
    suffix proposals reproduce the completion and are accepted at every β; this rate is the part β controls.
    NaN for a chain with no such proposal."""
    a = np.asarray(accepted, dtype=bool)
    same = identical_proposals(a, unchanged)
    if skip_first:
        a, same = a[..., 1:], same[..., 1:]
    n = (~same).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (a & ~same).sum(axis=-1) / np.maximum(n, 1), np.nan)


def autocorrelation(trace: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation rho_0..rho_{N-1} of each trace (last axis) via FFT; NaN for a constant
    trace (no variance, autocorrelation undefined)."""
    x = np.asarray(trace, dtype=np.float64)
    n = x.shape[-1]
    scale = np.abs(x).max(axis=-1, keepdims=True) if n else np.zeros(x.shape[:-1] + (1,))
    x = x - x.mean(axis=-1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(x, n=size, axis=-1)
    acov = np.fft.irfft(f * np.conj(f), n=size, axis=-1)[..., :n]
    var = acov[..., :1]
    constant = var <= n * (1e-12 * scale) ** 2  # rounding noise of a constant trace is not variance
    return np.where(constant, np.nan, acov / np.where(constant, 1.0, var))


def effective_sample_size(trace: np.ndarray) -> np.ndarray:
    """ESS = N / tau with Geyer's initial positive sequence estimator (Geyer 1992): tau = -1 + 2·sum_k G_k,
    G_k = rho_2k + rho_2k+1, summed while G_k > 0. Chosen because it needs no tuning (no window) and is
    consistent for reversible chains such as Metropolis-Hastings. Works on ``[..., N]``; NaN for a constant
    trace; capped at N·log10(N) (strongly antithetic chains can exceed N only mildly)."""
    rho = autocorrelation(trace)
    n = rho.shape[-1]
    pairs = n // 2
    g = rho[..., : 2 * pairs].reshape(rho.shape[:-1] + (pairs, 2)).sum(axis=-1)
    positive = np.cumprod(g > 0, axis=-1).astype(bool)  # initial run of positive pair sums
    tau = -1.0 + 2.0 * np.where(positive, g, 0.0).sum(axis=-1)
    tau = np.where(np.isnan(rho[..., 0]), np.nan, tau)
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = n / np.maximum(tau, 1.0 / max(np.log10(max(n, 10)), 1.0))
    return ess


def geweke_z(trace: np.ndarray, first: float = 0.1, last: float = 0.5) -> np.ndarray:
    """Geweke's z-score: (mean of the first ``first`` fraction − mean of the last ``last`` fraction) over
    the standard error, each segment's variance of the mean estimated as var / ESS (instead of a spectral
    density at zero, with the same estimator as ``effective_sample_size``)."""
    x = np.asarray(trace, dtype=np.float64)
    n = x.shape[-1]
    a, b = x[..., : max(int(first * n), 2)], x[..., n - max(int(last * n), 2):]

    def var_mean(seg: np.ndarray) -> np.ndarray:
        ess = effective_sample_size(seg)
        return np.where(np.isnan(ess), 0.0, seg.var(axis=-1, ddof=1) / np.where(np.isnan(ess), 1.0, ess))

    se = np.sqrt(var_mean(a) + var_mean(b))
    diff = a.mean(axis=-1) - b.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf))


def burn_in_geweke(trace: np.ndarray, candidates: int = 20, threshold: float = 2.0) -> int:
    """Smallest burn-in b (on a grid of ``candidates`` points over the first half) after which the rest of
    the 1-D trace passes Geweke's test (|z| < ``threshold``); half the trace when none does."""
    x = np.asarray(trace, dtype=np.float64)
    n = len(x)
    for b in np.unique(np.linspace(0, n // 2, candidates).astype(int)):
        if n - b < 8 or abs(float(geweke_z(x[b:]))) < threshold:
            return int(b)
    return n // 2


def burn_in_first_crossing(trace: np.ndarray) -> int:
    """First step at which the 1-D trace reaches its stationary level, the mean of its second half.

    The reward trace of a QAlign chain starts at an ancestral sample and drifts towards the higher mean
    reward of the target; the first crossing of the late-chain mean marks the end of that drift. Apply it to
    the cross-prompt mean trace, which averages per-chain noise away. Returns half the trace when it never
    crosses."""
    x = np.asarray(trace, dtype=np.float64)
    n = len(x)
    if n < 2:
        return 0
    level = x[n // 2:].mean()
    side = np.sign(x[0] - level)
    if side == 0:
        return 0
    crossed = np.flatnonzero(np.sign(x - level) != side)
    return int(crossed[0]) if len(crossed) and crossed[0] <= n // 2 else n // 2


def estimate_burn_in(rewards: np.ndarray) -> int:
    """Burn-in of a set of chains ``[prompts, steps]`` as used by ``predict.burn_in=auto``: the first crossing
    (``burn_in_first_crossing``) of the cross-prompt mean reward trace. Chosen over Geweke because it is a
    property of the averaged drift that selection rules feel, it has no threshold to tune, and it is stable
    for the short chains of the embedded experiments where per-chain Geweke tests have little power."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] == 0:
        return 0
    mean_trace = np.nanmean(np.where(np.isfinite(r), r, np.nan), axis=0)
    mean_trace = np.where(np.isnan(mean_trace), np.nanmean(mean_trace) if np.isfinite(mean_trace).any() else 0.0,
                          mean_trace)
    return burn_in_first_crossing(mean_trace)
