"""Budget curves: accuracy (and cost, invalid rate, selected reward) vs. the number n of outputs, as pure numpy.

The predict stage reads a run into the compact arrays of ``RunData`` and assembles the table; everything between
is here, over arrays only (no store, no config), so it can be tested and benchmarked on synthetic pools:

* ``evaluate_rules``: every selection rule at every budget, averaged over random orders of each prompt's pool
  (``random_orders``) where the rule allows it; a rule that follows a chain keeps the stored order and skips
  the burn-in (``selection.Rule``).
* ``mbr_choices``: the MBR-type choices of one prompt, made while the stage streams the texts (memory: one
  ``[samples, samples]`` utility matrix at a time).
* ``curve``: accuracy with a bootstrap CI over prompts (never over chains), invalid rate, selected reward.
* ``mean_cost`` / ``budget_tokens``: the mean cost (tokens) of the first n outputs.
* ``concat`` / ``reorder`` / ``original_positions``: pooling the shards of a run back into one prompt order.
* ``acceptance`` / ``chain_summary``: a chain run's acceptance with its CI, ESS and burn-in estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qalign_repro.analysis import flops as fl
from qalign_repro.analysis import selection as sel
from qalign_repro.analysis import stats
from qalign_repro.errors import DataError


@dataclass
class RunData:
    """Compact per-output arrays of one run. ``codes``, ``score``, ``reward`` and ``tokens`` are pooled per
    prompt, ``[prompts, chains * samples]`` (``selection.pool_chains``); ``accepted`` and ``chain_reward`` stay
    per chain, ``[prompts * chains, samples]``, because acceptance, ESS and burn-in are properties of a chain."""

    codes: np.ndarray
    score: np.ndarray
    reward: np.ndarray
    accepted: np.ndarray
    tokens: dict[str, np.ndarray]
    #: MBR-type rule -> chosen indices ``[orders, prompts, budgets]`` (computed while streaming)
    mbr_index: dict[str, np.ndarray] = field(default_factory=dict)
    chain_reward: np.ndarray | None = None
    chains: int = 1

    def __post_init__(self) -> None:
        if self.chain_reward is None:
            self.chain_reward = self.reward

    @property
    def chain_rewards(self) -> np.ndarray:
        """``chain_reward``, typed as set (``__post_init__`` fills it)."""
        assert self.chain_reward is not None
        return self.chain_reward


def random_orders(n_orders: int, n_prompts: int, n: int, seed: int) -> np.ndarray | None:
    """Random orders of each prompt's pool ``[orders, prompts, n]`` (None = stored order only). Seeded per
    order, so R=4 reuses the first orders of R=8."""
    if n_orders <= 0:
        return None
    base = np.broadcast_to(np.arange(n, dtype=np.int64), (n_prompts, n))
    return np.stack([np.random.default_rng([seed, r]).permuted(base, axis=1) for r in range(n_orders)])


def mbr_choices(utility: np.ndarray, reward: np.ndarray, rules: Sequence[sel.Rule], bud: Sequence[int],
                orders: np.ndarray | None, p: int, burn_in: int, beta: float) -> dict[str, np.ndarray]:
    """MBR-type choices of prompt ``p`` for every order and budget, as indices in stored order: a chain rule
    over the states after ``burn_in`` in stored order, a weighted rule with softmax(r/β) weights over each
    budget's window, the others unweighted."""
    out: dict[str, np.ndarray] = {}
    perms = [None] if orders is None else [orders[o, p] for o in range(len(orders))]
    for rule in rules:
        res = np.zeros((len(perms), len(bud)), dtype=np.int64)
        for o, perm in enumerate(perms):
            if rule.follows_chain and o > 0:  # chains keep their order: every "order" is the stored one
                res[o] = res[0]
                continue
            if rule.follows_chain or perm is None:
                u, rw, back = utility, reward, np.arange(len(reward))
            else:
                u, rw, back = utility[np.ix_(perm, perm)], reward[perm], perm
            if rule.follows_chain:
                idx = sel.mbr_all_budgets(u, bud, start=burn_in)
                res[o] = np.where(idx >= 0, idx, burn_in)
            elif not rule.weighted:
                res[o] = back[sel.mbr_all_budgets(u, bud)]
            else:
                for b, n in enumerate(bud):
                    w = sel.vote_weights(rw[None, :], n, beta)[0]
                    res[o, b] = back[sel.mbr(u, n, weights=w)]
        out[rule.name] = res
    return out


def evaluate_rules(data: RunData, rules: Sequence[sel.Rule], bud: Sequence[int], orders: np.ndarray | None,
                   burn_in: int, beta: float, rouge: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per rule name: per-prompt ``score``, ``invalid`` and ``reward`` of the selection, each ``[prompts,
    budgets]`` (averaged over orders), with NaN where a budget is undefined (n <= burn_in for a chain rule)."""
    n_prompts = data.codes.shape[0]
    rows = np.arange(n_prompts)[:, None]
    results: dict[str, dict[str, np.ndarray]] = {}
    for rule in rules:
        use_orders = orders if (orders is not None and not rule.follows_chain) else None
        perms = [None] if use_orders is None else list(use_orders)
        acc = {k: np.zeros((n_prompts, len(bud))) for k in ("score", "invalid", "reward")}
        for o, perm in enumerate(perms):
            if perm is None:
                codes, reward, back = data.codes, data.reward, None
            else:
                codes, reward, back = data.codes[rows, perm], data.reward[rows, perm], perm
            for b, n in enumerate(bud):
                if rule.follows_chain and n <= burn_in:
                    for k in acc:
                        acc[k][:, b] = np.nan
                    continue
                if rule.over_utilities(rouge):
                    chosen = data.mbr_index[rule.name]
                    index = chosen[min(o, len(chosen) - 1), :, b]
                    valid = np.ones(n_prompts, dtype=bool)
                else:
                    assert rule.exact is not None, rule.name
                    s = rule.exact(codes, reward, n, burn_in, beta)
                    index = s.index if back is None else back[np.arange(n_prompts), s.index]
                    valid = s.valid
                picked = data.score[np.arange(n_prompts), index]
                acc["score"][:, b] += np.where(valid, picked, 0.0)
                acc["invalid"][:, b] += (~valid) | (data.codes[np.arange(n_prompts), index] < 0)
                acc["reward"][:, b] += data.reward[np.arange(n_prompts), index]
        results[rule.name] = {k: v / len(perms) for k, v in acc.items()}
    return results


def curve(res: Mapping[str, np.ndarray], bud: Sequence[int], n_boot: int, ci: float, seed: int
          ) -> dict[str, np.ndarray]:
    """One rule's curve from its ``evaluate_rules`` result: the defined budgets (``ok``, ``n``), accuracy with a
    percentile bootstrap CI over prompts, invalid rate and mean reward of the selected outputs."""
    score = res["score"]
    ok = ~np.isnan(score[0]) if len(score) else np.ones(len(bud), dtype=bool)
    low, high = stats.bootstrap_ci(score[:, ok], n_boot, ci, seed)
    return {"ok": ok, "n": np.asarray(bud)[ok], "accuracy": score[:, ok].mean(axis=0), "ci_low": low,
            "ci_high": high, "invalid_rate": res["invalid"][:, ok].mean(axis=0),
            "mean_reward_selected": res["reward"][:, ok].mean(axis=0)}


def mean_cost(costs: np.ndarray, bud: Sequence[int], orders: np.ndarray | None) -> np.ndarray:
    """Mean over prompts (and orders) of the cost of the first n outputs, for every budget."""
    at = list(bud)
    if orders is None:
        return fl.cumulative_at(costs, at).mean(axis=0)
    rows = np.arange(costs.shape[0])[:, None]
    return np.mean([fl.cumulative_at(costs[rows, perm], at).mean(axis=0) for perm in orders], axis=0)


def budget_tokens(tokens: Mapping[str, np.ndarray], bud: Sequence[int], orders: np.ndarray | None,
                  count_prefix_cache: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean policy, cached and RM tokens of the first n outputs at every budget (``flops.policy_tokens``: a
    prefix-cache hit is free unless ``count_prefix_cache``)."""
    pol = fl.policy_tokens(tokens["tokens_prefilled"], tokens["tokens_generated"], tokens["tokens_cached"],
                           count_prefix_cache)
    return (mean_cost(pol, bud, orders), mean_cost(tokens["tokens_cached"], bud, orders),
            mean_cost(tokens["tokens_scored"], bud, orders))


def concat(parts: list[RunData]) -> RunData:
    """The shards' arrays one after the other (prompt order: ``original_positions``)."""
    if len(parts) == 1:
        return parts[0]
    cat = lambda xs, axis=0: np.concatenate(xs, axis=axis)  # noqa: E731
    return RunData(
        cat([d.codes for d in parts]), cat([d.score for d in parts]), cat([d.reward for d in parts]),
        cat([d.accepted for d in parts]), {k: cat([d.tokens[k] for d in parts]) for k in parts[0].tokens},
        {r: cat([d.mbr_index[r] for d in parts], axis=1) for r in parts[0].mbr_index},
        chain_reward=cat([d.chain_rewards for d in parts]), chains=parts[0].chains,
    )


def original_positions(sizes: Sequence[int]) -> np.ndarray:
    """Position in the unsharded run of every prompt of the concatenated shards: shard s holds prompts
    ``s, s + k, s + 2k, ...`` of k shards (the round-robin split of ``run.shard_docs``)."""
    k = len(sizes)
    pos = np.concatenate([np.arange(m) * k + s for s, m in enumerate(sizes)]) if k else np.zeros(0, int)
    if not np.array_equal(np.sort(pos), np.arange(len(pos))):
        raise DataError(f"shard sizes {list(sizes)} are not a round-robin split of one run's prompts")
    return pos.astype(np.int64)


def reorder(data: RunData, order: np.ndarray) -> RunData:
    """Prompts in ``order``; the per-chain arrays move with their prompt."""
    k = data.chains
    chain_order = (np.asarray(order)[:, None] * k + np.arange(k)).ravel()
    return RunData(data.codes[order], data.score[order], data.reward[order], data.accepted[chain_order],
                   {key: v[order] for key, v in data.tokens.items()},
                   {r: v[:, order] for r, v in data.mbr_index.items()},
                   chain_reward=data.chain_rewards[chain_order], chains=k)


def acceptance(data: RunData, diags: Sequence[Mapping[str, Any]], n_boot: int, ci: float, seed: int
               ) -> tuple[dict[str, float], float]:
    """Chain acceptance with a bootstrap CI over prompts (a prompt = the mean of its chains), and the acceptance
    of changed proposals from the stored diagnostics of the run (``diags``: one per shard, pooled from their
    counts; NaN when a shard has none: telling identical proposals apart needs the completions, which predict
    does not read)."""
    per_chain = stats.acceptance_rate(data.accepted)
    per_prompt = np.nanmean(per_chain.reshape(-1, data.chains), axis=1) if per_chain.size else per_chain
    finite = per_prompt[np.isfinite(per_prompt)]
    cols: dict[str, float] = {}
    if finite.size:
        low, high = stats.bootstrap_ci(finite, n_boot, ci, seed)
        cols = {"acceptance": float(finite.mean()), "acceptance_low": float(low), "acceptance_high": float(high)}
    if len(diags) == 1:
        c = diags[0].get("acceptance_changed_overall")
        return cols, float(c) if isinstance(c, (int, float)) else math.nan
    # shards: pool the counts behind each shard's rate (identical proposals are always accepted)
    changed = accepted_changed = 0.0
    for d in diags:
        vals = [d.get(k) for k in ("acceptance_overall", "identical_proposal_rate", "chains", "steps")]
        nums = [v for v in vals if isinstance(v, (int, float))]
        if len(nums) < len(vals):
            return cols, math.nan
        acc, same, n_chains, steps = nums
        total = n_chains * (steps - 1)
        changed += total * (1 - same)
        accepted_changed += total * (acc - same)
    return cols, accepted_changed / changed if changed > 0 else math.nan


def chain_summary(data: RunData) -> dict[str, float | int]:
    """Acceptance rate, median ESS of the reward trace and the burn-in estimate, over every chain of a run."""
    ess = stats.effective_sample_size(data.chain_rewards)
    return {"acceptance_rate": float(np.nanmean(stats.acceptance_rate(data.accepted))),
            "ess_reward_median": float(np.nanmedian(ess)) if np.isfinite(ess).any() else math.nan,
            "burn_in_estimate": stats.estimate_burn_in(data.chain_rewards)}
