"""``python -m qalign_repro.predict``: accuracy vs. inference budget for every selected run, in one tidy table.

For each run the stage streams the stored instances once (memory: a few compact ``[prompts, samples]`` arrays
plus one ``[samples, samples]`` utility matrix at a time for MBR), applies the selection rules that fit the
run's method at every budget n (1, 2, 4, ... up to the run size, plus ``predict.budgets``), and reports
accuracy with a bootstrap CI over prompts, tokens and FLOPs measured from stored token counts, the invalid
rate and the mean reward of the selected outputs.

Rules per run (``predict.rules: null``):
    qalign run      -> ``qalign`` (MV over chain states after ``burn_in``; MBR-ROUGE over states when the task's
                       ``mbr_kind`` is "rouge")
    other runs      -> ``mv``, ``wmv``, ``bon`` (``mbr``, ``wmbr``, ``bon`` for rouge tasks)
An explicit ``predict.rules`` list applies to every run ("qalign" only to qalign runs).
``predict.resample_orders=R`` averages the rules on non-chain runs over R seeded random orders of each
prompt's pool instead of the stored "first n" (column ``order``: ``first`` or ``randomR``); chains keep their
order. The shards of a sharded run (``shards.group_runs``) are pooled into one run in the original prompt
order, so they give the numbers of the unsharded run.

Series: runs whose stored configs differ in any value that changes the data or its scoring (``run_identity``:
β, model, RM, method options, max_new_tokens, temperature, seed, dataset options, backend) are separate series;
``variant`` holds the differing values and ``label`` = method name + variant ("QAlign β=0.005"), so a sweep
never merges into one line. Shards of one run share one identity.

K chains per prompt (``meta["chains"] = K``; instance ``p*K + j`` is chain j of prompt p): budget n counts
outputs of all chains, taken chain by chain (pooled position ``t = k*K + j``, ``selection.pool_chains``), so
n runs up to ``K * steps``; burn-in drops each chain's first ``burn_in`` states (the first ``burn_in * K``
pooled positions); CIs resample prompts, never chains; FLOPs count exactly the states used. Acceptance, ESS and
the burn-in estimate are per chain.

RM cost: a reward-free rule (``mv``, ``mbr``) on an ancestral run is charged no RM FLOPs; every other
combination is (QAlign, CARDS and SSS call the RM while generating).

Outputs (rerunning gives byte-identical files):
    <output_root>/predictions/<experiment_name>/predictions.{csv,md}   all selected runs
    <output_root>/predictions/<experiment_name>/diagnostics.{csv,md}   QAlign chain diagnostics
    <output_root>/runs/<run>/predictions.csv                            that run's rows
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qalign_repro.analysis import flops as fl
from qalign_repro.analysis import selection as sel
from qalign_repro.analysis import stats
from qalign_repro.errors import ConfigError, DataError
from qalign_repro.store.storage import RunStore

RULES = ("mv", "wmv", "bon", "qalign", "mbr", "wmbr")
#: rules that need pairwise utilities of the texts
MBR_RULES = ("mbr", "wmbr")
#: rules that read rewards (and so pay for the RM) even on independent samples
RM_RULES = ("wmv", "bon", "wmbr", "qalign")
#: paper names: MBR over base-model samples is still called MV (paper §4.2), its weighted form WMV
FAMILY = {"mv": "MV", "mbr": "MV", "wmv": "WMV", "wmbr": "WMV", "bon": "BoN", "qalign": "QAlign"}
COLUMNS = [
    "experiment", "dataset", "run", "method", "model", "reward_model", "rule", "family", "label", "variant",
    "order", "n", "n_prompts", "chains", "burn_in", "beta", "selection_beta", "metric", "prefix_cache",
    "tokens_policy", "tokens_cached", "tokens_rm", "flops_policy", "flops_rm", "flops",
    "accuracy", "ci_low", "ci_high", "ci_level", "invalid_rate", "mean_reward_selected",
    "acceptance", "acceptance_low", "acceptance_high", "acceptance_changed", "sweep_key",
]
DIAG_COLUMNS = ["experiment", "dataset", "run", "label", "model", "beta", "n_prompts", "chains", "steps",
                "acceptance_rate", "acceptance_changed", "ess_reward_median", "burn_in_estimate", "burn_in_used"]
FLOAT_FORMAT = "%.10g"


@dataclass(frozen=True)
class PredictOptions:
    """The ``predict:`` and ``flops:`` config sections, validated."""

    budgets: tuple[int, ...] = ()
    burn_in: int | str = 0
    bootstrap: int = 1000
    ci: float = 0.95
    wmv_beta: float | None = None
    resample_orders: int = 0
    rules: tuple[str, ...] | None = None
    mbr_metric: str = "rouge1"
    metric: str | None = None
    seed: int = 0
    count_prefix_cache: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PredictOptions:
        p = dict(cfg.get("predict") or {})
        f = dict(cfg.get("flops") or {})

        def int_at_least(key: str, lo: int, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"predict.{key}={value!r} is invalid; allowed: an integer >= {lo}")
            return value

        budgets = p.get("budgets") or ()
        if isinstance(budgets, int):
            budgets = (budgets,)
        budgets = tuple(int_at_least("budgets", 1, b) for b in budgets)
        burn_in = p.get("burn_in", 0)
        if burn_in is None:
            burn_in = 0
        if burn_in != "auto" and (isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0):
            raise ConfigError(f"predict.burn_in={burn_in!r} is invalid; allowed: an integer >= 0 or auto")
        ci = p.get("ci", 0.95)
        if isinstance(ci, bool) or not isinstance(ci, (int, float)) or not 0 < ci < 1:
            raise ConfigError(f"predict.ci={ci!r} is invalid; allowed: a number in (0, 1)")
        wmv_beta = p.get("wmv_beta")
        if wmv_beta is not None and (isinstance(wmv_beta, bool) or not isinstance(wmv_beta, (int, float))
                                     or not math.isfinite(wmv_beta) or wmv_beta <= 0):
            raise ConfigError(f"predict.wmv_beta={wmv_beta!r} is invalid; allowed: null or a number > 0")
        rules = p.get("rules")
        if rules is not None:
            rules = (rules,) if isinstance(rules, str) else tuple(str(r) for r in rules)
            bad = [r for r in rules if r not in RULES]
            if bad or not rules:
                raise ConfigError(f"predict.rules={list(rules)} has unknown rule(s) {bad}; allowed: {', '.join(RULES)}")
        metric = p.get("mbr_metric", "rouge1")
        if metric not in sel.ROUGE_METRICS:
            raise ConfigError(f"predict.mbr_metric={metric!r} is invalid; allowed: {', '.join(sel.ROUGE_METRICS)}")
        return cls(
            budgets=budgets, burn_in=burn_in,
            bootstrap=int_at_least("bootstrap", 0, p.get("bootstrap", 1000)), ci=float(ci),
            wmv_beta=None if wmv_beta is None else float(wmv_beta),
            resample_orders=int_at_least("resample_orders", 0, p.get("resample_orders", 0) or 0),
            rules=rules, mbr_metric=metric, metric=p.get("metric"),
            seed=int_at_least("seed", 0, p.get("seed", 0)),
            count_prefix_cache=bool(f.get("count_prefix_cache", False)),
        )


def default_rules(method: str, mbr_kind: str) -> tuple[str, ...]:
    if method == "qalign":
        return ("qalign",)
    return ("mbr", "wmbr", "bon") if mbr_kind == "rouge" else ("mv", "wmv", "bon")


def rules_for(method: str, mbr_kind: str, opts: PredictOptions) -> tuple[str, ...]:
    if opts.rules is None:
        return default_rules(method, mbr_kind)
    return tuple(r for r in opts.rules if r != "qalign" or method == "qalign")


# -- reading one run ------------------------------------------------------------------------------------------
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


def _grade_scores(g: Mapping[str, Any], metric: str | None, n: int, where: str) -> np.ndarray:
    if metric in (None, "correct"):
        vals = g.get("correct")
    else:
        vals = (g.get("metrics") or {}).get(metric)
        if vals is None:
            raise DataError(f"{where}: grades have no metric {metric!r}; "
                            f"available: correct, {', '.join(sorted(g.get('metrics') or {})) or 'none'}")
    if vals is None or len(vals) < n:
        raise DataError(f"{where}: grades cover {0 if vals is None else len(vals)} outputs, expected {n}; "
                        "rerun the evaluate stage")
    return np.asarray(vals[:n], dtype=np.float64)


def _orders(n_orders: int, n_prompts: int, n: int, seed: int) -> np.ndarray | None:
    """Random orders of each prompt's pool ``[orders, prompts, n]`` (None = stored order only). Seeded per
    order, so R=4 reuses the first orders of R=8."""
    if n_orders <= 0:
        return None
    base = np.broadcast_to(np.arange(n, dtype=np.int64), (n_prompts, n))
    return np.stack([np.random.default_rng([seed, r]).permuted(base, axis=1) for r in range(n_orders)])


#: per-output fields the stage reads (``text`` only for MBR)
OUTPUT_FIELDS = ("reward", "accepted", *fl.TOKEN_FIELDS)


def iter_output_fields(store: RunStore, n: int, fields: Sequence[str]
                       ) -> Iterator[tuple[Any, dict[str, list[Any]]]]:
    """Per instance, in order: ``(doc id, {field: [value of each of the first n outputs]})``.

    Why not ``iter_instances``: decoding every output's JSON (mostly ``completion_ids``) is most of the
    stage's time. On the SQLite store the fields are projected in SQL (``json_extract`` over the table layout
    documented in ``storage.py``) and streamed row by row, ~5x less CPU; any other storage falls back to the
    public streaming API."""
    from qalign_repro.store.storage import SQLiteStorage

    path = store.storage.path(store.name) if isinstance(store.storage, SQLiteStorage) else None
    if path is None or not path.is_file():
        for inst in store.iter_instances():
            outs = inst["outputs"][:n]
            yield inst["input"].get("id"), {f: [o.get(f) for o in outs] for f in fields}
        return
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    try:
        ids = conn.execute("SELECT idx, json_extract(input, '$.id') FROM instances ORDER BY idx").fetchall()
        cols = ", ".join(f"json_extract(value, '$.{f}')" for f in fields)
        rows = conn.execute(f"SELECT idx, {cols} FROM outputs WHERE step < ? ORDER BY idx, step", (n,))
        by_idx = itertools.groupby(rows, key=lambda r: r[0])
        current = next(by_idx, None)
        for idx, doc_id in ids:
            values: list[tuple] = []
            if current is not None and current[0] == idx:
                values = list(current[1])
                current = next(by_idx, None)
            yield doc_id, {f: [r[k + 1] for r in values] for k, f in enumerate(fields)}
    finally:
        conn.close()


def run_chains(meta: Mapping[str, Any], name: str) -> int:
    """Chains per prompt of a run: ``meta["chains"]``, else the stored config's ``method.chains``, else 1."""
    k = meta.get("chains")
    if k is None:
        k = _cfg_get(meta, "method", "chains")
    if k is None:
        return 1
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"run {name!r} has chains={k!r} in its meta; allowed: an integer >= 1")
    return k


def _chain_layout(store: RunStore, chains: int) -> list[tuple[Any, Any]]:
    """``(doc id, chain)`` of every instance, in order (only read when a run has several chains)."""
    from qalign_repro.store.storage import SQLiteStorage

    path = store.storage.path(store.name) if isinstance(store.storage, SQLiteStorage) else None
    if path is not None and path.is_file():
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        try:
            return conn.execute("SELECT json_extract(input, '$.id'), json_extract(input, '$.chain') "
                                "FROM instances ORDER BY idx").fetchall()
        finally:
            conn.close()
    return [(i.get("id"), i.get("chain")) for i in store.inputs()]


def check_chain_layout(layout: Sequence[tuple[Any, Any]], chains: int, name: str) -> None:
    """The pooling assumes instance ``p*K + j`` is chain j of prompt p; refuse anything else, naming it."""
    if len(layout) % chains:
        raise DataError(f"run {name!r} has {len(layout)} instances, not a multiple of its {chains} chains")
    for i, (doc_id, chain) in enumerate(layout):
        first = layout[i - i % chains][0]
        if chain != i % chains or doc_id != first:
            raise DataError(f"run {name!r}: instance {i} is chain {chain!r} of doc {doc_id!r}; expected chain "
                            f"{i % chains} of doc {first!r} (instances ordered prompt-major, {chains} per prompt)")


def read_run(store: RunStore, n: int, opts: PredictOptions, rules: Sequence[str], bud: Sequence[int],
             orders: np.ndarray | None, burn_in: int, beta: float, rouge: bool, chains: int = 1) -> RunData:
    """Stream the instances once, keeping compact arrays and (for rouge tasks) the MBR choices.

    ``n`` is the number of states per chain; ``bud``, ``orders`` and ``burn_in`` (already ``burn_in * chains``)
    refer to the pooled axis of ``chains * n`` outputs per prompt."""
    name = store.name
    if not store.has_eval("grades"):
        raise DataError(f"run {name!r} has no 'grades' eval; run `python -m qalign_repro.evaluate` first")
    grades = store.read_eval("grades")
    rewards_eval = store.read_eval("reward") if store.has_eval("reward") else None
    n_prompts = store.n_instances()
    if len(grades) != n_prompts:
        raise DataError(f"run {name!r}: grades cover {len(grades)} prompts, the store has {n_prompts}; "
                        "rerun the evaluate stage")
    if chains > 1:
        check_chain_layout(_chain_layout(store, chains), chains, name)
    score = np.zeros((n_prompts, n))
    reward = np.zeros((n_prompts, n))
    accepted = np.zeros((n_prompts, n), dtype=bool)
    tokens = {k: np.zeros((n_prompts, n), dtype=np.int64) for k in fl.TOKEN_FIELDS}
    mbr_rules = [r for r in rules if r in MBR_RULES or (r == "qalign" and rouge)]
    n_ord = 1 if orders is None else len(orders)
    mbr_index = {r: np.zeros((n_ord, n_prompts // chains, len(bud)), dtype=np.int64) for r in mbr_rules}
    fields = OUTPUT_FIELDS + (("text",) if mbr_rules else ())
    # answers (and texts) of the current prompt's chains: a prompt's answer codes must be shared by its chains
    group: list[tuple[list[Any], list[str]]] = []
    pooled_codes = np.full((n_prompts // chains, chains * n), sel.INVALID, dtype=np.int32)
    flat = sel.pool_chains(np.arange(chains * n).reshape(chains, n), chains)[0]  # pooled t -> j*n + s
    for p, (doc_id, out) in enumerate(iter_output_fields(store, n, fields)):
        g = grades[p]
        where = f"run {name!r}, prompt {p}"
        if g.get("id") != doc_id:
            raise DataError(f"{where}: grades id {g.get('id')!r} does not match instance id {doc_id!r}; "
                            "rerun the evaluate stage")
        if len(out["reward"]) < n:
            raise DataError(f"{where}: {len(out['reward'])} outputs stored, expected {n}")
        score[p] = _grade_scores(g, opts.metric, n, where)
        if rewards_eval is not None:
            reward[p] = np.asarray(rewards_eval[p]["reward"][:n], dtype=np.float64)
        else:
            reward[p] = [math.nan if v is None else v for v in out["reward"]]
        accepted[p] = [True if v is None else bool(v) for v in out["accepted"]]
        for k in fl.TOKEN_FIELDS:
            tokens[k][p] = [v or 0 for v in out[k]]
        group.append((list(g["answer"][:n]), [t or "" for t in out["text"]] if mbr_rules else []))
        if len(group) < chains:
            continue
        q = p // chains
        answers = [a for ans, _ in group for a in ans]
        pooled_codes[q] = sel.encode_answers([answers[i] for i in flat])
        if mbr_rules:
            texts = [t for _, tx in group for t in tx]
            pooled_reward = sel.pool_chains(reward[p + 1 - chains: p + 1], chains)[0]
            utility = sel.rouge_utility([texts[i] for i in flat], opts.mbr_metric)
            for r, idx in _mbr_choices(utility, pooled_reward, mbr_rules, bud, orders, q, burn_in, beta).items():
                mbr_index[r][:, q] = idx
        group = []
    pool = lambda a: sel.pool_chains(a, chains)  # noqa: E731
    return RunData(pooled_codes, pool(score), pool(reward), accepted, {k: pool(v) for k, v in tokens.items()},
                   mbr_index, chain_reward=reward, chains=chains)


def _mbr_choices(utility: np.ndarray, reward: np.ndarray, rules: Sequence[str], bud: Sequence[int],
                 orders: np.ndarray | None, p: int, burn_in: int, beta: float) -> dict[str, np.ndarray]:
    """MBR-type choices of one prompt for every order and budget, as indices in stored order."""
    out: dict[str, np.ndarray] = {}
    perms = [None] if orders is None else [orders[o, p] for o in range(len(orders))]
    for r in rules:
        res = np.zeros((len(perms), len(bud)), dtype=np.int64)
        for o, perm in enumerate(perms):
            if r == "qalign" and o > 0:  # chains keep their order: every "order" is the stored one
                res[o] = res[0]
                continue
            if r == "qalign" or perm is None:
                u, rw, back = utility, reward, np.arange(len(reward))
            else:
                u, rw, back = utility[np.ix_(perm, perm)], reward[perm], perm
            if r == "mbr":
                res[o] = back[sel.mbr_all_budgets(u, bud)]
            elif r == "qalign":
                idx = sel.mbr_all_budgets(u, bud, start=burn_in)
                res[o] = np.where(idx >= 0, idx, burn_in)
            else:  # wmbr: weights softmax(r/beta) over each budget's window
                for b, n in enumerate(bud):
                    w = sel.vote_weights(rw[None, :], n, beta)[0]
                    res[o, b] = back[sel.mbr(u, n, weights=w)]
        out[r] = res
    return out


# -- rules, costs and one run's rows ---------------------------------------------------------------------------
def _select(rule: str, codes: np.ndarray, reward: np.ndarray, n: int, burn_in: int, beta: float
            ) -> sel.Selection:
    if rule == "mv":
        return sel.majority_vote(codes, n)
    if rule == "wmv":
        return sel.weighted_majority_vote(codes, reward, n, beta)
    if rule == "bon":
        return sel.best_of_n(reward, n, codes)
    if rule == "qalign":
        return sel.qalign(codes, n, burn_in)
    raise ValueError(rule)


def evaluate_rules(data: RunData, rules: Sequence[str], bud: Sequence[int], orders: np.ndarray | None,
                   burn_in: int, beta: float, rouge: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per rule: per-prompt ``score``, ``invalid`` and ``reward`` of the selection, each ``[prompts, budgets]``
    (averaged over orders), with NaN where a budget is undefined (n <= burn_in for QAlign)."""
    n_prompts = data.codes.shape[0]
    rows = np.arange(n_prompts)[:, None]
    results: dict[str, dict[str, np.ndarray]] = {}
    for rule in rules:
        use_orders = orders if (orders is not None and rule != "qalign") else None
        perms = [None] if use_orders is None else list(use_orders)
        acc = {k: np.zeros((n_prompts, len(bud))) for k in ("score", "invalid", "reward")}
        for o, perm in enumerate(perms):
            if perm is None:
                codes, reward, back = data.codes, data.reward, None
            else:
                codes, reward, back = data.codes[rows, perm], data.reward[rows, perm], perm
            for b, n in enumerate(bud):
                if rule == "qalign" and n <= burn_in:
                    for k in acc:
                        acc[k][:, b] = np.nan
                    continue
                if rule in MBR_RULES or (rule == "qalign" and rouge):
                    index = data.mbr_index[rule][min(o, len(data.mbr_index[rule]) - 1), :, b]
                    valid = np.ones(n_prompts, dtype=bool)
                else:
                    s = _select(rule, codes, reward, n, burn_in, beta)
                    index = s.index if back is None else back[np.arange(n_prompts), s.index]
                    valid = s.valid
                picked = data.score[np.arange(n_prompts), index]
                acc["score"][:, b] += np.where(valid, picked, 0.0)
                acc["invalid"][:, b] += (~valid) | (data.codes[np.arange(n_prompts), index] < 0)
                acc["reward"][:, b] += data.reward[np.arange(n_prompts), index]
        results[rule] = {k: v / len(perms) for k, v in acc.items()}
    return results


def _mean_cum(costs: np.ndarray, bud: Sequence[int], orders: np.ndarray | None) -> np.ndarray:
    """Mean over prompts (and orders) of the cost of the first n outputs, for every budget."""
    if orders is None:
        return fl.cumulative_at(costs, bud).mean(axis=0)
    rows = np.arange(costs.shape[0])[:, None]
    return np.mean([fl.cumulative_at(costs[rows, perm], bud).mean(axis=0) for perm in orders], axis=0)


def resolve_burn_in(opts: PredictOptions, method: str, reward_trace: np.ndarray | None) -> int:
    if method != "qalign":
        return 0
    if opts.burn_in == "auto":
        return stats.estimate_burn_in(reward_trace) if reward_trace is not None else 0
    return int(opts.burn_in)


def _reward_trace(store: RunStore, n: int) -> np.ndarray:
    """Rewards only, for ``burn_in=auto`` before the MBR pass needs it (one extra streaming pass)."""
    if store.has_eval("reward"):
        return np.array([r["reward"][:n] for r in store.read_eval("reward")], dtype=np.float64)
    return np.array([[math.nan if v is None else v for v in out["reward"]]
                     for _, out in iter_output_fields(store, n, ("reward",))], dtype=np.float64)


def _run_beta(meta: Mapping[str, Any], name: str) -> float:
    """The run's beta (a calibrated ``beta=auto`` run stores the number in meta once it has one)."""
    beta = _numeric_beta(meta)
    if not math.isnan(beta):
        return beta
    raise DataError(f"run {name!r} has no numeric beta in its meta (beta={meta.get('beta')!r}); "
                    "set predict.wmv_beta")


def _concat(parts: list[RunData]) -> RunData:
    if len(parts) == 1:
        return parts[0]
    cat = lambda xs, axis=0: np.concatenate(xs, axis=axis)  # noqa: E731
    return RunData(
        cat([d.codes for d in parts]), cat([d.score for d in parts]), cat([d.reward for d in parts]),
        cat([d.accepted for d in parts]), {k: cat([d.tokens[k] for d in parts]) for k in parts[0].tokens},
        {r: cat([d.mbr_index[r] for d in parts], axis=1) for r in parts[0].mbr_index},
        chain_reward=cat([d.chain_reward for d in parts]), chains=parts[0].chains,
    )


def _original_positions(sizes: Sequence[int]) -> np.ndarray:
    """Position in the unsharded run of every prompt of the concatenated shards: shard s holds prompts
    ``s, s + k, s + 2k, ...`` of k shards (the round-robin split of ``run.shard_docs``)."""
    k = len(sizes)
    pos = np.concatenate([np.arange(m) * k + s for s, m in enumerate(sizes)]) if k else np.zeros(0, int)
    if not np.array_equal(np.sort(pos), np.arange(len(pos))):
        raise DataError(f"shard sizes {list(sizes)} are not a round-robin split of one run's prompts")
    return pos.astype(np.int64)


def _reorder(data: RunData, order: np.ndarray) -> RunData:
    """Prompts in ``order``; the per-chain arrays move with their prompt."""
    k = data.chains
    chain_order = (np.asarray(order)[:, None] * k + np.arange(k)).ravel()
    return RunData(data.codes[order], data.score[order], data.reward[order], data.accepted[chain_order],
                   {key: v[order] for key, v in data.tokens.items()},
                   {r: v[:, order] for r, v in data.mbr_index.items()},
                   chain_reward=data.chain_reward[chain_order], chains=k)


def predict_run(root: str | os.PathLike, names: str | Sequence[str], opts: PredictOptions,
                name: str | None = None) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """Rows of the prediction table for one run, and its chain diagnostics (QAlign runs) or None.

    ``names`` may list the shards of one sharded run, sorted by shard index (``shards.group_runs``): their
    prompts are pooled in the original prompt order, so every number - CIs and random orders included - equals
    the unsharded run's; the table calls the run ``name`` (default: the group)."""
    from qalign_repro.store.shards import check_group, shard_info

    names = [names] if isinstance(names, str) else list(names)
    stores = [RunStore(root, n, readonly=True) for n in names]
    try:
        metas = [st.meta for st in stores]
        meta = metas[0]
        if len(names) > 1 or shard_info(names[0], meta).count > 1:
            # all shards present, one config (raises ShardError naming what is wrong)
            check_group(root, shard_info(names[0], meta).group, names, require_done=False)
        if name is None:
            name = names[0] if len(names) == 1 else shard_info(names[0], meta).group
        method = str(meta.get("method") or _cfg_get(meta, "method", "name") or "unknown")
        dataset = str(meta.get("dataset") or _cfg_get(meta, "dataset", "name") or "unknown")
        for other, m in zip(names[1:], metas[1:]):
            if (m.get("method"), m.get("dataset")) != (meta.get("method"), meta.get("dataset")):
                raise DataError(f"shards {names[0]!r} and {other!r} of run {name!r} differ in method or dataset")
        mbr_kind = str(meta.get("mbr_kind") or "exact")
        rouge = mbr_kind == "rouge"
        for shard, m in zip(names, metas):
            if m.get("status") != "done":
                print(f"warning: run {shard!r} is not finished (status {m.get('status')!r}); "
                      "predicting from the steps stored so far", file=sys.stderr)
        k_chains = run_chains(meta, name)
        for other, m in zip(names[1:], metas[1:]):
            if run_chains(m, other) != k_chains:
                raise DataError(f"shards {names[0]!r} and {other!r} of run {name!r} differ in chains per prompt")
        n = min(st.steps_done() for st in stores)
        if n < 1:
            print(f"warning: run {name!r} has no stored outputs; skipped", file=sys.stderr)
            return pd.DataFrame(columns=COLUMNS), None
        n_total = k_chains * n  # outputs per prompt, all chains pooled
        rules = rules_for(method, mbr_kind, opts)
        bud = sel.budgets(n_total, opts.budgets)
        dropped = sorted(b for b in opts.budgets if b > n_total)
        if dropped:
            print(f"warning: run {name!r} has {n_total} outputs per prompt; budgets {dropped} skipped",
                  file=sys.stderr)
        beta = opts.wmv_beta if opts.wmv_beta is not None else _run_beta(meta, name)
        sizes = []
        for st in stores:
            size = st.n_instances()
            if size % k_chains:
                raise DataError(f"run {st.name!r} has {size} instances, not a multiple of its {k_chains} chains")
            sizes.append(size // k_chains)
        orders = None
        if opts.resample_orders > 0 and method != "qalign":
            orders = _orders(opts.resample_orders, sum(sizes), n_total, opts.seed)
        pre_trace = None
        if method == "qalign" and opts.burn_in == "auto" and rouge:  # a mean over prompts: order-free
            pre_trace = np.concatenate([_reward_trace(st, n) for st in stores])
        burn_in = resolve_burn_in(opts, method, pre_trace)
        if method == "qalign" and burn_in >= n:
            raise ConfigError(f"predict.burn_in={burn_in} leaves no chain state in run {name!r} ({n} states)")
        positions = _original_positions(sizes)
        parts, offset = [], 0
        for st, size in zip(stores, sizes):
            part_orders = None if orders is None else orders[:, positions[offset: offset + size]]
            parts.append(read_run(st, n, opts, rules, bud, part_orders, burn_in * k_chains, beta, rouge,
                                  k_chains))
            offset += size
        data = _concat(parts)
        if len(parts) > 1:
            data = _reorder(data, np.argsort(positions, kind="stable"))
        if method == "qalign" and opts.burn_in == "auto" and pre_trace is None:
            burn_in = resolve_burn_in(opts, method, data.chain_reward)
        results = evaluate_rules(data, rules, bud, orders, burn_in * k_chains, beta, rouge)
        n_params = fl.n_params_of(meta, "model")
        n_params_rm = fl.n_params_of(meta, "reward")
        pol = fl.policy_tokens(data.tokens["tokens_prefilled"], data.tokens["tokens_generated"],
                               data.tokens["tokens_cached"], opts.count_prefix_cache)
        tok_policy = _mean_cum(pol, bud, orders)
        tok_cached = _mean_cum(data.tokens["tokens_cached"], bud, orders)
        tok_rm = _mean_cum(data.tokens["tokens_scored"], bud, orders)
        tok_policy_first = _mean_cum(pol, bud, None)
        tok_cached_first = _mean_cum(data.tokens["tokens_cached"], bud, None)
        tok_rm_first = _mean_cum(data.tokens["tokens_scored"], bud, None)
        order_name = "first" if orders is None else f"random{len(orders)}"
        run_beta = _numeric_beta(meta)
        model = str((meta.get("model") or {}).get("name") or _cfg_get(meta, "model", "name") or "?")
        acc_cols, acc_changed = _acceptance(data, metas, sizes, opts) if method == "qalign" else ({}, math.nan)
        frames = []
        for rule in rules:
            res = results[rule]
            first = rule == "qalign" or orders is None
            tp, tc, tr = ((tok_policy_first, tok_cached_first, tok_rm_first) if first
                          else (tok_policy, tok_cached, tok_rm))
            if method == "ancestral" and rule not in RM_RULES:
                tr = np.zeros_like(tr)  # plain sampling + a reward-free rule never runs the RM
            ok = ~np.isnan(res["score"][0]) if len(res["score"]) else np.ones(len(bud), dtype=bool)
            low, high = stats.bootstrap_ci(res["score"][:, ok], opts.bootstrap, opts.ci, opts.seed)
            frame = pd.DataFrame({
                "experiment": str(meta.get("experiment_name", "")), "dataset": dataset, "run": name,
                "method": method, "model": model,
                "reward_model": fl.reward_label(meta),  # python / mix parts say "0 FLOPs" (flops.py)
                "rule": rule, "family": FAMILY[rule], "label": series_label(method, rule), "variant": "",
                "order": "first" if first else order_name,
                "n": np.asarray(bud)[ok], "n_prompts": data.codes.shape[0], "chains": k_chains,
                "burn_in": burn_in if rule == "qalign" else 0, "beta": run_beta,
                "selection_beta": beta if rule in ("wmv", "wmbr") else math.nan,
                "metric": opts.metric or "correct", "prefix_cache": opts.count_prefix_cache,
                "tokens_policy": tp[ok], "tokens_cached": tc[ok], "tokens_rm": tr[ok],
                "flops_policy": fl.forward_flops(n_params, tp[ok]),
                "flops_rm": fl.forward_flops(n_params_rm, tr[ok]),
                "accuracy": res["score"][:, ok].mean(axis=0), "ci_low": low, "ci_high": high,
                "ci_level": opts.ci if opts.bootstrap > 0 else math.nan,
                "invalid_rate": res["invalid"][:, ok].mean(axis=0),
                "mean_reward_selected": res["reward"][:, ok].mean(axis=0),
                "acceptance": acc_cols.get("acceptance", math.nan),
                "acceptance_low": acc_cols.get("acceptance_low", math.nan),
                "acceptance_high": acc_cols.get("acceptance_high", math.nan),
                "acceptance_changed": acc_changed, "sweep_key": "",
            })
            frame["flops"] = frame["flops_policy"] + frame["flops_rm"]
            frames.append(frame[COLUMNS])
        diag = None
        if method == "qalign":
            ess = stats.effective_sample_size(data.chain_reward)
            diag = {
                "experiment": str(meta.get("experiment_name", "")), "dataset": dataset, "run": name,
                "label": series_label(method, "qalign"), "model": model, "beta": run_beta,
                "n_prompts": data.codes.shape[0], "chains": k_chains, "steps": n,
                "acceptance_rate": float(np.nanmean(stats.acceptance_rate(data.accepted))),
                "acceptance_changed": acc_changed,
                "ess_reward_median": float(np.nanmedian(ess)) if np.isfinite(ess).any() else math.nan,
                "burn_in_estimate": stats.estimate_burn_in(data.chain_reward), "burn_in_used": burn_in,
            }
        table = pd.concat(frames, ignore_index=True)
        table.attrs["identity"] = run_identity(meta)
        return table, diag
    finally:
        for st in stores:
            st.close()


def series_label(method: str, rule: str) -> str:
    """Legend / Table 1 row name before the run's distinguishing values: the paper's method name. The policy
    model belongs in titles and captions, and in the label only when runs differ in it (``assign_variants``)."""
    fam = FAMILY[rule]
    prefix = "" if method in ("qalign", "ancestral") else f"{method.upper()}+"
    return f"{prefix}{fam}"


def _numeric_beta(meta: Mapping[str, Any]) -> float:
    for value in (meta.get("beta"), _cfg_get(meta, "beta")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return math.nan


def _acceptance(data: RunData, metas: Sequence[Mapping[str, Any]], sizes: Sequence[int], opts: PredictOptions
                ) -> tuple[dict[str, float], float]:
    """Chain acceptance of a QAlign run with a bootstrap CI over prompts (a prompt = the mean of its chains),
    and the acceptance of changed proposals from the run's stored diagnostics (pooled over shards from their
    counts; NaN when a shard has none: telling identical proposals apart needs the completions, which predict
    does not read)."""
    per_chain = stats.acceptance_rate(data.accepted)
    per_prompt = np.nanmean(per_chain.reshape(-1, data.chains), axis=1) if per_chain.size else per_chain
    finite = per_prompt[np.isfinite(per_prompt)]
    cols: dict[str, float] = {}
    if finite.size:
        low, high = stats.bootstrap_ci(finite, opts.bootstrap, opts.ci, opts.seed)
        cols = {"acceptance": float(finite.mean()), "acceptance_low": float(low), "acceptance_high": float(high)}
    diags = [m.get("diagnostics") or {} for m in metas]
    if len(diags) == 1:
        c = diags[0].get("acceptance_changed_overall")
        return cols, float(c) if isinstance(c, (int, float)) else math.nan
    # shards: pool the counts behind each shard's rate (identical proposals are always accepted)
    changed = accepted_changed = 0.0
    for d in diags:
        vals = [d.get(k) for k in ("acceptance_overall", "identical_proposal_rate", "chains", "steps")]
        if any(not isinstance(v, (int, float)) for v in vals):
            return cols, math.nan
        acc, same, n_chains, steps = vals
        total = n_chains * (steps - 1)
        changed += total * (1 - same)
        accepted_changed += total * (acc - same)
    return cols, accepted_changed / changed if changed > 0 else math.nan


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(node, (list, tuple)):
        out[prefix] = json.dumps(node, sort_keys=True, default=str)
    else:
        out[prefix] = node


def run_identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Every stored config value that changes what a run generated or how it is scored, flattened to dotted
    keys: the keys the run name hashes (``naming.GENERATION_KEYS``), with the backend reduced to what changes
    the data, the β actually used (a calibrated ``beta=auto`` run stores it) and the model actually loaded. Two
    runs with different identities are different series; shards of one run share one."""
    from qalign_repro.store.run_names import BACKEND_IDENTITY, GENERATION_KEYS

    cfg = meta.get("config") or {}
    out: dict[str, Any] = {}
    for key in GENERATION_KEYS:
        if key not in cfg:
            continue
        value = cfg[key]
        if key == "backend" and isinstance(value, Mapping):
            value = {k: value.get(k) for k in BACKEND_IDENTITY}
        _flatten(value, key, out)
    beta = _numeric_beta(meta)
    if not math.isnan(beta):
        out["beta"] = beta
    weights = meta.get("weights") if isinstance(meta.get("weights"), Mapping) else {}
    for part in ("model", "reward"):
        loaded = (meta.get(part) or {}).get("name") if isinstance(meta.get(part), Mapping) else None
        if loaded:
            out[f"{part}.name"] = loaded
        if weights.get(part):  # the weights themselves, not where they lay (runs merged from two machines)
            out.pop(f"{part}.path", None)
            out[f"{part}.weights"] = weights[part]
    # chains per prompt as the run stored them (meta or config), 1 for runs from before the option existed
    out["method.chains"] = meta.get("chains") or out.get("method.chains") or 1
    return out


#: how a distinguishing key reads in a label, and its place (keys not listed come after, alphabetically)
_LABEL_KEYS = {"beta": "β", "model.name": "model", "reward.name": "RM", "method.chains": "chains", "seed": "seed",
               "temperature": "T", "max_new_tokens": "max_new_tokens", "dataset.n": "prompts",
               "backend.name": "backend"}


def _label_part(key: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    if key.endswith(".path") and isinstance(value, str):
        value = Path(value).name or value
    if key.endswith(".weights") and isinstance(value, str):
        value = value[:8]
    name = _LABEL_KEYS.get(key) or (key.split(".", 1)[1] if key.startswith("method.") else key)
    return f"{name}={value}"


def distinguishing_keys(identities: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys whose values differ between the given runs (a key absent from a run is not a difference: an
    older run may lack an option that newer configs spell out at its default), in label order. When a model's
    name differs its other keys (path, revision, ...) are left out: the name already tells the runs apart (the
    same for the RM and the backend)."""
    keys = sorted({k for ident in identities for k in ident})
    differ = [k for k in keys if len({json.dumps(i[k], sort_keys=True, default=str)
                                      for i in identities if k in i}) > 1]
    for part in ("model", "reward", "backend"):
        if f"{part}.name" in differ:
            differ = [k for k in differ if not k.startswith(f"{part}.") or k == f"{part}.name"]
    rank = {k: i for i, k in enumerate(_LABEL_KEYS)}
    return sorted(differ, key=lambda k: (rank.get(k, len(rank)), k))


def sweep_key(identity: Mapping[str, Any]) -> str:
    """Short hash of a run's identity without β: runs that share it differ in β only (a β sweep)."""
    rest = {k: v for k, v in identity.items() if k != "beta"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _is_primary(key: str) -> bool:
    """Keys a reader compares runs by (β, models, seed, method options, ...); the others (weights fingerprints,
    context sizes, backend details, dataset paths) go into a label only when needed to tell two runs apart."""
    return key in _LABEL_KEYS or key.startswith("method.")


def assign_variants(table: pd.DataFrame, identities: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Fill ``variant`` (the run's values of the keys that differ among the runs of its method, e.g.
    "β=0.005") and append it to ``label``, so that a sweep's runs are separate series everywhere. The keys are
    found per (dataset, method) and pooled per method, so a series keeps one label across datasets. Secondary
    keys (``_is_primary``) are added only to runs whose labels would otherwise clash; runs that still share a
    label (the same values under different run names) get their run name appended."""
    table = table.copy()
    runs = table[["dataset", "method", "run"]].drop_duplicates()
    keys_of: dict[str, set[str]] = {}
    for (_ds, method), g in runs.groupby(["dataset", "method"], sort=True):
        keys_of.setdefault(method, set()).update(distinguishing_keys([identities.get(r, {}) for r in g["run"]]))
    rank = {k: i for i, k in enumerate(_LABEL_KEYS)}

    def parts(run: str, method: str, primary: bool) -> list[str]:
        ident = identities.get(run, {})
        keys = sorted(keys_of.get(method, set()), key=lambda k: (rank.get(k, len(rank)), k))
        return [_label_part(k, ident[k]) for k in keys if k in ident and _is_primary(k) == primary]

    variant = {r.run: " ".join(parts(r.run, r.method, True)) for r in runs.itertuples(index=False)}
    method_of = dict(zip(runs["run"], runs["method"]))

    def apply(v: Mapping[str, str]) -> None:
        table["variant"] = table["run"].map(v).fillna("")
        table["label"] = [f"{b} {x}" if x else b for b, x in zip(base, table["variant"])]

    base = table["label"].astype(str).tolist()
    apply(variant)
    table["sweep_key"] = table["run"].map({r: sweep_key(identities.get(r, {})) for r in runs["run"]})
    for extra in ("secondary", "run"):
        clash = table.groupby(["dataset", "label", "order", "rule"])["run"].transform("nunique") > 1
        if not clash.any():
            break
        for run in set(table.loc[clash, "run"]):
            more = parts(run, method_of[run], False) if extra == "secondary" else [run]
            variant[run] = " ".join([variant[run], *more]).strip()
        apply(variant)
    return table


def _cfg_get(meta: Mapping[str, Any], *keys: str) -> Any:
    node: Any = meta.get("config") or {}
    for k in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(k)
    return node


# -- the whole stage ------------------------------------------------------------------------------------------
def predict_runs(root: str | os.PathLike, names: Iterable[str], opts: PredictOptions
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prediction table and diagnostics table for the given runs (sorted, deterministic). The table's
    ``attrs["members"]`` maps each run in it to the stored runs (shards) it pools."""
    from qalign_repro.store.shards import ShardError, group_runs

    frames, diags = [], []
    identities: dict[str, dict[str, Any]] = {}
    groups = group_runs(root, names)
    for key in sorted(groups):
        try:
            frame, diag = predict_run(root, groups[key], opts, name=key)
        except ShardError:
            raise  # a missing shard would silently change the numbers: stop the stage
        except DataError as exc:
            print(f"warning: {exc}; run skipped", file=sys.stderr)
            continue
        identities[key] = frame.attrs.get("identity", {})
        frames.append(frame)
        if diag is not None:
            diags.append(diag)
    if not frames:
        raise DataError("none of the selected runs could be predicted (see the warnings above)")
    table = assign_variants(pd.concat(frames, ignore_index=True), identities)
    table = table.sort_values(["experiment", "dataset", "run", "rule", "order", "n"], kind="stable")
    diag_table = pd.DataFrame(diags, columns=DIAG_COLUMNS).sort_values(["dataset", "run"], kind="stable")
    qa_label = dict(zip(table.loc[table["rule"] == "qalign", "run"], table.loc[table["rule"] == "qalign", "label"]))
    diag_table["label"] = [qa_label.get(r, lbl) for r, lbl in zip(diag_table["run"], diag_table["label"])]
    table = table.reset_index(drop=True)
    table.attrs["members"] = {k: v for k, v in groups.items() if k in set(table["run"])}
    return table, diag_table.reset_index(drop=True)


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temp file + rename so readers never see half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fixed temp name: a kill before the rename leaves a file the next run overwrites, not litter
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def to_markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4g") + "\n"


def write_tables(table: pd.DataFrame, diag: pd.DataFrame, out_dir: Path, root: str | os.PathLike
                 ) -> list[Path]:
    paths = [out_dir / "predictions.csv", out_dir / "predictions.md"]
    _atomic_write(paths[0], table.to_csv(index=False, float_format=FLOAT_FORMAT))
    _atomic_write(paths[1], to_markdown(table))
    if len(diag):
        paths += [out_dir / "diagnostics.csv", out_dir / "diagnostics.md"]
        _atomic_write(paths[2], diag.to_csv(index=False, float_format=FLOAT_FORMAT))
        _atomic_write(paths[3], to_markdown(diag))
    members = table.attrs.get("members") or {}
    for run, rows in table.groupby("run", sort=True):
        text = rows.to_csv(index=False, float_format=FLOAT_FORMAT)
        for stored in members.get(str(run), [str(run)]):  # a sharded run's rows go to every shard
            path = Path(root) / "runs" / stored / "predictions.csv"
            if path.parent.is_dir():
                _atomic_write(path, text)
                paths.append(path)
    return paths


def predictions_dir(cfg: Mapping[str, Any]) -> Path:
    return Path(str(cfg["output_root"])) / "predictions" / str(cfg["experiment_name"])


def predict(cfg: Any) -> pd.DataFrame:
    """Run the stage for ``cfg`` (a composed config): select runs, predict, write the tables."""
    from qalign_repro.cli import select_runs

    opts = PredictOptions.from_config(cfg)
    names = select_runs(cfg)
    table, diag = predict_runs(cfg.output_root, names, opts)
    paths = write_tables(table, diag, predictions_dir(cfg), cfg.output_root)
    print(f"predictions for {table['run'].nunique()} run(s), {len(table)} rows -> {paths[0]}")
    _print_summary(table)
    return table


def _print_summary(table: pd.DataFrame) -> None:
    """One line per series (a sweep's runs apart) at its largest budget, under a line per dataset naming the
    models and prompts."""
    last = table.sort_values("n", kind="stable").groupby(["dataset", "label", "order"], sort=True).tail(1)
    names = [lbl if o == "first" else f"{lbl}, {o} orders" for lbl, o in zip(last["label"], last["order"])]
    last = last.assign(shown=names)
    width = max(len(x) for x in names)
    for ds, g in last.groupby("dataset", sort=True):
        models = ", ".join(sorted(set(g["model"].astype(str))))
        rms = ", ".join(sorted(set(g["reward_model"].astype(str))))
        prompts = ", ".join(str(int(x)) for x in sorted(set(g["n_prompts"])))
        print(f"  {ds}: model {models}, RM {rms}, {prompts} prompts")
        for _, r in g.sort_values("shown").iterrows():
            acc = "" if pd.isna(r.get("acceptance", math.nan)) else f"  acceptance={r['acceptance']:.3f}"
            print(f"    {r['shown']:<{width}}  n={int(r['n']):<5} acc={r['accuracy']:.3f} "
                  f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  FLOPs={r['flops']:.3g}{acc}")


def main() -> None:
    from qalign_repro.cli import entry_point

    entry_point(predict)()


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.stages.predict import main as _main

    _main()
