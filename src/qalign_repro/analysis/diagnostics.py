"""MCMC diagnostics of a stored run: acceptance per chain and overall, mean proposal suffix length, effective
sample size of the reward trace, and a burn-in estimate. Printed after ``run`` and stored in the run's meta."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from qalign_repro.analysis.stats import (
    acceptance_rate,
    changed_acceptance_rate,
    effective_sample_size,
    estimate_burn_in,
    identical_proposals,
)
from qalign_repro.store.storage import RunStore


def run_diagnostics(store: RunStore) -> dict[str, Any]:
    return chain_diagnostics(inst["outputs"] for inst in store.iter_instances())


def chain_diagnostics(chains: Iterable[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """The diagnostics of chains given as their output lists (the API's results have no store)."""
    accepted, unchanged, rewards, suffix, inits = [], [], [], [], []
    alphas: list[list[Any]] = []
    for outs in chains:
        inits.append(outs[0].get("init") if outs else None)
        accepted.append([o["accepted"] for o in outs])
        alphas.append([o.get("alpha") for o in outs])  # absent in runs stored before alpha existed
        ids = [o.get("completion_ids") for o in outs]
        unchanged.append([False] + [a is not None and a == b for a, b in zip(ids[1:], ids[:-1])])
        rewards.append([o["reward"] for o in outs])
        suffix.append([o["tokens_generated"] for o in outs[1:]])
    steps = min((len(a) for a in accepted), default=0)
    if steps == 0:
        return {"steps": 0}
    acc = np.array([a[:steps] for a in accepted], dtype=bool)
    rew = np.array([r[:steps] for r in rewards], dtype=np.float64)
    same = np.array([u[:steps] for u in unchanged], dtype=bool)
    per_chain = acceptance_rate(acc)
    changed = changed_acceptance_rate(acc, same)
    pooled = changed_acceptance_rate(acc[:, 1:].ravel(), same[:, 1:].ravel(), skip_first=False)
    ess = effective_sample_size(rew) if steps >= 4 else np.full(len(rew), np.nan)
    gen = np.array([s[: steps - 1] for s in suffix], dtype=np.float64)
    burn = int(estimate_burn_in(rew))
    # Rao-Blackwellised acceptance: the mean stored alpha, the expectation of the coin flips (less noisy than
    # them); None when any step lacks alpha (runs stored before it existed, methods without one)
    rb_alphas = [x for a in alphas for x in a[1:steps]]
    rb = float(np.mean(rb_alphas)) if rb_alphas and all(x is not None for x in rb_alphas) else None
    return {
        "steps": steps,
        "chains": len(acc),
        "acceptance_overall": float(acc[:, 1:].mean()) if steps > 1 else None,
        "acceptance_rb_overall": rb,
        "acceptance_per_chain": [None if np.isnan(x) else float(x) for x in per_chain],
        # acceptance among proposals that differ from the current completion (what beta controls)
        "identical_proposal_rate": float(identical_proposals(acc, same)[:, 1:].mean()) if steps > 1 else None,
        "acceptance_changed_overall": None if np.isnan(pooled) else float(pooled),
        "acceptance_changed_per_chain": [None if np.isnan(x) else float(x) for x in changed],
        "mean_suffix_tokens": float(gen.mean()) if gen.size else None,
        "reward_ess_per_chain": [None if np.isnan(x) else float(x) for x in ess],
        "reward_ess_mean": float(np.nanmean(ess)) if np.isfinite(ess).any() else None,
        "burn_in_estimate": burn,
        **_start_and_trace(rew, burn, inits),
    }


def _start_and_trace(rew: np.ndarray, burn: int, inits: list[str | None]) -> dict[str, Any]:
    """Where the chains started and how the mean reward moved from there: a warm start (``method.init``) from
    worse completions than the target's shows as a rising trace and a burn-in > 0, which is the only thing a
    warm start changes about an exact chain. The trace is the cross-chain mean reward, thinned to <= 32 states."""
    steps = rew.shape[1]
    at = sorted({int(round(x)) for x in np.linspace(0, steps - 1, min(steps, 32))})
    mean = np.nanmean(rew, axis=0)
    warm = [s for s in inits if s]
    return {
        "warm_started_chains": len(warm),
        "init_sources": sorted({s.split("#")[0] for s in warm}),
        "reward_mean_state0": float(mean[0]),
        "reward_mean_after_burn_in": float(mean[min(burn, steps - 1):].mean()),
        "reward_trace": {"state": at, "mean": [float(mean[k]) for k in at]},
    }


def format_diagnostics(d: dict[str, Any]) -> str:
    if not d.get("steps"):
        return "  no stored steps"
    per = [x for x in d["acceptance_per_chain"] if x is not None]
    lines = [
        f"  chains {d['chains']} × {d['steps']} states",
        f"  acceptance overall {d['acceptance_overall']:.3f}" if d["acceptance_overall"] is not None else
        "  acceptance overall -",
        f"  acceptance overall, Rao-Blackwellised (mean alpha) {d['acceptance_rb_overall']:.3f}"
        if d.get("acceptance_rb_overall") is not None else "",
        f"  acceptance per chain min/median/max {min(per):.2f}/{np.median(per):.2f}/{max(per):.2f}" if per else "",
        (f"  identical proposals {d['identical_proposal_rate']:.3f}; acceptance of the others "
         f"{d['acceptance_changed_overall']:.3f}") if d.get("acceptance_changed_overall") is not None else "",
        f"  mean proposal suffix {d['mean_suffix_tokens']:.1f} tokens" if d["mean_suffix_tokens"] is not None else "",
        f"  reward-trace ESS (mean over chains) {d['reward_ess_mean']:.1f}" if d["reward_ess_mean"] is not None
        else "  reward-trace ESS -",
        f"  burn-in estimate {d['burn_in_estimate']} states",
        (f"  warm start: {d['warm_started_chains']} chains from {', '.join(d['init_sources'])}; mean reward "
         f"{d['reward_mean_state0']:.3f} at state 0, {d['reward_mean_after_burn_in']:.3f} after burn-in")
        if d.get("warm_started_chains") else "",
    ]
    return "\n".join(x for x in lines if x)
