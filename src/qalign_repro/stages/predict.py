"""``python -m qalign_repro.predict``: accuracy vs. inference budget for every selected run, in one tidy table.

For each run the stage streams the stored instances once (memory: a few compact ``[prompts, samples]`` arrays
plus one ``[samples, samples]`` utility matrix at a time for MBR), applies the selection rules that fit the
run's method at every budget n (1, 2, 4, ... up to the run size, plus ``predict.budgets``), and reports
accuracy with a bootstrap CI over prompts, tokens and FLOPs measured from stored token counts, the invalid
rate and the mean reward of the selected outputs.

The stage knows methods and rules only by their declarations (``methods.base.Method``, ``selection.RULES``),
never by name. Rules per run (``predict.rules: null``): the method's ``default_rules`` (QAlign: ``qalign``, MV
over chain states after ``burn_in``, MBR-ROUGE over the states when the task's ``mbr_kind`` is "rouge"), else
the sample-pool rules ``mv``, ``wmv``, ``bon`` (``mbr``, ``wmbr``, ``bon`` for rouge tasks). An explicit
``predict.rules`` list applies to every run, less the rules other methods declare as their ``own_rules``.
``predict.resample_orders=R`` averages the rules on runs of ``kind`` "samples" over R seeded random orders of
each prompt's pool instead of the stored "first n" (column ``order``: ``first`` or ``randomR``); chains keep
their order. The shards of a sharded run (``shards.group_runs``) are pooled into one run in the original prompt
order, so they give the numbers of the unsharded run. Series and labels: ``analysis/series.py``; the curves
themselves (rules at every budget, CIs, costs): ``analysis/curves.py``; the column reads: ``store/reading.py``.

K chains per prompt (``meta["chains"] = K``; instance ``p*K + j`` is chain j of prompt p): budget n counts
outputs of all chains, taken chain by chain (pooled position ``t = k*K + j``, ``selection.pool_chains``), so
n runs up to ``K * steps``; burn-in drops each chain's first ``burn_in`` states (the first ``burn_in * K``
pooled positions); CIs resample prompts, never chains; FLOPs count exactly the states used. Acceptance, ESS and
the burn-in estimate are per chain.

RM cost: a reward-free rule (``mv``, ``mbr``) on a run whose method declares ``reward_in_generation = False``
(ancestral sampling) is charged no RM FLOPs; every other combination is (QAlign, CARDS and SSS call the RM
while generating).

Outputs (rerunning gives byte-identical files):
    <output_root>/predictions/<experiment_name>/predictions.{csv,md}   all selected runs
    <output_root>/predictions/<experiment_name>/diagnostics.{csv,md}   chain diagnostics (QAlign runs)
    <output_root>/runs/<run>/predictions.csv                            that run's rows
With ``predict.reward=reward:<RM>`` (outputs re-scored by ``evaluate.rescore``) the same files go to
``predictions/<experiment_name>/reward-<RM>/`` and ``runs/<run>/predictions-reward-<RM>.csv``, beside the
tables of the run's own RM rather than over them ("BoN under a second RM" compares the two).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qalign_repro.analysis import curves, stats
from qalign_repro.analysis import flops as fl
from qalign_repro.analysis import selection as sel
from qalign_repro.analysis.series import (
    assign_variants,
    cfg_get,
    method_of,
    numeric_beta,
    required_beta,
    run_chains,
    run_identity,
    series_label,
)
from qalign_repro.errors import ConfigError, DataError
from qalign_repro.methods.base import METHODS
from qalign_repro.store.reading import (
    chain_layout,
    check_chain_layout,
    grade_scores,
    iter_output_fields,
    reward_trace,
)
from qalign_repro.store.rescores import read_rescored, rescored_folder, selection_reward
from qalign_repro.store.storage import RunStore

#: every rule ``predict.rules`` may name; what each one needs and does is declared in ``selection.RULES``
RULES = tuple(sel.RULES)
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
    reward: str | None = None   # a rescore eval (``reward:<RM name>``) the reward-using rules select with

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
            reward=selection_reward(p.get("reward")),
        )


def default_rules(method: str, mbr_kind: str) -> tuple[str, ...]:
    """The rules of a run when ``predict.rules`` is unset: its method's declared ``default_rules``, else the
    sample-pool rules of the task's MBR kind (``selection.POOL_RULES``)."""
    declared = method_of(method).default_rules
    return tuple(declared) if declared is not None else sel.pool_rules(mbr_kind == "rouge")


def rules_for(method: str, mbr_kind: str, opts: PredictOptions) -> tuple[str, ...]:
    """The rules of one run: the defaults, or the explicit ``predict.rules`` less the rules that other methods
    declare as their own (``own_rules``: a chain rule means nothing on independent samples)."""
    if opts.rules is None:
        rules = default_rules(method, mbr_kind)
    else:
        own = set(method_of(method).own_rules)
        others = {r for m in METHODS.names() for r in METHODS.get(m).own_rules} - own
        rules = tuple(r for r in opts.rules if r not in others)
    bad = [r for r in rules if r not in sel.RULES]
    if bad:
        raise ConfigError(f"method {method!r} declares unknown rule(s) {bad}; allowed: {', '.join(RULES)}")
    return rules


# -- reading one run ------------------------------------------------------------------------------------------
#: per-output fields the stage reads (``text`` only for MBR)
OUTPUT_FIELDS = ("reward", "accepted", *fl.TOKEN_FIELDS)


def read_run(store: RunStore, n: int, opts: PredictOptions, rules: Sequence[str], bud: Sequence[int],
             orders: np.ndarray | None, burn_in: int, beta: float, rouge: bool, chains: int = 1
             ) -> curves.RunData:
    """Stream the instances once, keeping compact arrays and (for rouge tasks) the MBR choices.

    ``n`` is the number of states per chain; ``bud``, ``orders`` and ``burn_in`` (already ``burn_in * chains``)
    refer to the pooled axis of ``chains * n`` outputs per prompt."""
    name = store.name
    if not store.has_eval("grades"):
        raise DataError(f"run {name!r} has no 'grades' eval; run `python -m qalign_repro.evaluate` first")
    grades = store.read_eval("grades")
    rewards_eval = store.read_eval("reward") if opts.reward is None and store.has_eval("reward") else None
    # predict.reward: the rewards of a second RM (evaluate.rescore) for the reward-using rules
    rescored = read_rescored(store, opts.reward, n) if opts.reward is not None else None
    n_prompts = store.n_instances()
    if len(grades) != n_prompts:
        raise DataError(f"run {name!r}: grades cover {len(grades)} prompts, the store has {n_prompts}; "
                        "rerun the evaluate stage")
    if chains > 1:
        check_chain_layout(chain_layout(store), chains, name)
    score = np.zeros((n_prompts, n))
    reward = np.zeros((n_prompts, n))
    accepted = np.zeros((n_prompts, n), dtype=bool)
    tokens = {k: np.zeros((n_prompts, n), dtype=np.int64) for k in fl.TOKEN_FIELDS}
    mbr_rules = [sel.RULES[r] for r in rules if sel.RULES[r].over_utilities(rouge)]
    n_ord = 1 if orders is None else len(orders)
    mbr_index = {r.name: np.zeros((n_ord, n_prompts // chains, len(bud)), dtype=np.int64) for r in mbr_rules}
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
        score[p] = grade_scores(g, opts.metric, n, where)
        if rescored is not None:
            reward[p] = rescored[p]
        elif rewards_eval is not None:
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
            choices = curves.mbr_choices(utility, pooled_reward, mbr_rules, bud, orders, q, burn_in, beta)
            for r, idx in choices.items():
                mbr_index[r][:, q] = idx
        group = []
    pool = lambda a: sel.pool_chains(a, chains)  # noqa: E731
    return curves.RunData(pooled_codes, pool(score), pool(reward), accepted,
                          {k: pool(v) for k, v in tokens.items()}, mbr_index, chain_reward=reward, chains=chains)


def resolve_burn_in(opts: PredictOptions, method: str, reward_trace: np.ndarray | None) -> int:
    """States dropped from the start of each chain: ``predict.burn_in`` (``auto``: estimated from the reward
    trace) on runs of a chain method, 0 on independent samples."""
    if method_of(method).kind != "chain":
        return 0
    if opts.burn_in == "auto":
        return stats.estimate_burn_in(reward_trace) if reward_trace is not None else 0
    return int(opts.burn_in)


def predict_run(root: str | os.PathLike, names: str | Sequence[str], opts: PredictOptions,
                name: str | None = None) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """Rows of the prediction table for one run, and its chain diagnostics (chain methods) or None.

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
        method = str(meta.get("method") or cfg_get(meta, "method", "name") or "unknown")
        dataset = str(meta.get("dataset") or cfg_get(meta, "dataset", "name") or "unknown")
        for other, m in zip(names[1:], metas[1:]):
            if (m.get("method"), m.get("dataset")) != (meta.get("method"), meta.get("dataset")):
                raise DataError(f"shards {names[0]!r} and {other!r} of run {name!r} differ in method or dataset")
        mbr_kind = str(meta.get("mbr_kind") or "exact")
        rouge = mbr_kind == "rouge"
        declared = method_of(method)
        chain = declared.kind == "chain"  # burn-in, stored order only, acceptance and diagnostics
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
        beta = opts.wmv_beta if opts.wmv_beta is not None else required_beta(meta, name)
        sizes = []
        for st in stores:
            size = st.n_instances()
            if size % k_chains:
                raise DataError(f"run {st.name!r} has {size} instances, not a multiple of its {k_chains} chains")
            sizes.append(size // k_chains)
        orders = None
        if opts.resample_orders > 0 and not chain:
            orders = curves.random_orders(opts.resample_orders, sum(sizes), n_total, opts.seed)
        pre_trace = None
        if chain and opts.burn_in == "auto" and rouge:  # a mean over prompts: order-free
            pre_trace = np.concatenate([reward_trace(st, n) for st in stores])
        burn_in = resolve_burn_in(opts, method, pre_trace)
        if chain and burn_in >= n:
            raise ConfigError(f"predict.burn_in={burn_in} leaves no chain state in run {name!r} ({n} states)")
        positions = curves.original_positions(sizes)
        parts, offset = [], 0
        for st, size in zip(stores, sizes):
            part_orders = None if orders is None else orders[:, positions[offset: offset + size]]
            parts.append(read_run(st, n, opts, rules, bud, part_orders, burn_in * k_chains, beta, rouge,
                                  k_chains))
            offset += size
        data = curves.concat(parts)
        if len(parts) > 1:
            data = curves.reorder(data, np.argsort(positions, kind="stable"))
        if chain and opts.burn_in == "auto" and pre_trace is None:
            burn_in = resolve_burn_in(opts, method, data.chain_reward)
        specs = [sel.RULES[r] for r in rules]
        results = curves.evaluate_rules(data, specs, bud, orders, burn_in * k_chains, beta, rouge)
        n_params = fl.n_params_of(meta, "model")
        n_params_rm = fl.n_params_of(meta, "reward")
        cost_orders = curves.budget_tokens(data.tokens, bud, orders, opts.count_prefix_cache)
        cost_first = curves.budget_tokens(data.tokens, bud, None, opts.count_prefix_cache)
        order_name = "first" if orders is None else f"random{len(orders)}"
        run_beta = numeric_beta(meta)
        model = str((meta.get("model") or {}).get("name") or cfg_get(meta, "model", "name") or "?")
        acc_cols, acc_changed = (curves.acceptance(data, [m.get("diagnostics") or {} for m in metas], opts.bootstrap,
                                                   opts.ci, opts.seed) if chain else ({}, math.nan))
        frames = []
        for spec in specs:
            rule = spec.name
            first = spec.follows_chain or orders is None
            tp, tc, tr = cost_first if first else cost_orders
            if not declared.reward_in_generation and not spec.needs_reward:
                tr = np.zeros_like(tr)  # outputs made without the RM + a reward-free rule never run the RM
            cv = curves.curve(results[rule], bud, opts.bootstrap, opts.ci, opts.seed)
            ok = cv["ok"]
            frame = pd.DataFrame({
                "experiment": str(meta.get("experiment_name", "")), "dataset": dataset, "run": name,
                "method": method, "model": model,
                "reward_model": fl.reward_label(meta),  # python / mix parts say "0 FLOPs" (flops.py)
                "rule": rule, "family": spec.family, "label": series_label(method, rule), "variant": "",
                "order": "first" if first else order_name,
                "n": cv["n"], "n_prompts": data.codes.shape[0], "chains": k_chains,
                "burn_in": burn_in if spec.follows_chain else 0, "beta": run_beta,
                "selection_beta": beta if spec.weighted else math.nan,
                "metric": opts.metric or "correct", "prefix_cache": opts.count_prefix_cache,
                "tokens_policy": tp[ok], "tokens_cached": tc[ok], "tokens_rm": tr[ok],
                "flops_policy": fl.forward_flops(n_params, tp[ok]),
                "flops_rm": fl.forward_flops(n_params_rm, tr[ok]),
                "accuracy": cv["accuracy"], "ci_low": cv["ci_low"], "ci_high": cv["ci_high"],
                "ci_level": opts.ci if opts.bootstrap > 0 else math.nan,
                "invalid_rate": cv["invalid_rate"], "mean_reward_selected": cv["mean_reward_selected"],
                "acceptance": acc_cols.get("acceptance", math.nan),
                "acceptance_low": acc_cols.get("acceptance_low", math.nan),
                "acceptance_high": acc_cols.get("acceptance_high", math.nan),
                "acceptance_changed": acc_changed, "sweep_key": "",
            })
            frame["flops"] = frame["flops_policy"] + frame["flops_rm"]
            frames.append(frame[COLUMNS])
        diag = None
        if chain:
            chain_rules = sel.rules_where(follows_chain=True)
            label_rule = next((r for r in rules if r in chain_rules), chain_rules[0])
            diag = {
                "experiment": str(meta.get("experiment_name", "")), "dataset": dataset, "run": name,
                "label": series_label(method, label_rule), "model": model, "beta": run_beta,
                "n_prompts": data.codes.shape[0], "chains": k_chains, "steps": n,
                "acceptance_changed": acc_changed, **curves.chain_summary(data), "burn_in_used": burn_in,
            }
        table = pd.concat(frames, ignore_index=True)
        if opts.reward is not None:  # which rewards the reward-using rules selected with (a column only then)
            table["selection_reward"] = [opts.reward if sel.RULES[r].needs_reward and not sel.RULES[r].follows_chain
                                         else "" for r in table["rule"]]
        table.attrs["identity"] = run_identity(meta)
        return table, diag
    finally:
        for st in stores:
            st.close()


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
    on_chain = table["rule"].isin(sel.rules_where(follows_chain=True))  # a chain run's diagnostics: its series
    chain_label = dict(zip(table.loc[on_chain, "run"], table.loc[on_chain, "label"]))
    diag_table["label"] = [chain_label.get(r, lbl) for r, lbl in zip(diag_table["run"], diag_table["label"])]
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


def write_tables(table: pd.DataFrame, diag: pd.DataFrame, out_dir: Path, root: str | os.PathLike,
                 run_file: str = "predictions.csv") -> list[Path]:
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
            path = Path(root) / "runs" / stored / run_file
            if path.parent.is_dir():
                _atomic_write(path, text)
                paths.append(path)
    return paths


def predictions_dir(cfg: Mapping[str, Any], reward: str | None = None) -> Path:
    base = Path(str(cfg["output_root"])) / "predictions" / str(cfg["experiment_name"])
    sub = rescored_folder(reward)
    return base if sub is None else base / sub


def predict(cfg: Any) -> pd.DataFrame:
    """Run the stage for ``cfg`` (a composed config): select runs, predict, write the tables."""
    from qalign_repro.stages.summary import console_lines
    from qalign_repro.store.listing import select_runs

    opts = PredictOptions.from_config(cfg)
    names = select_runs(cfg)
    table, diag = predict_runs(cfg.output_root, names, opts)
    sub = rescored_folder(opts.reward)
    paths = write_tables(table, diag, predictions_dir(cfg, opts.reward), cfg.output_root,
                         "predictions.csv" if sub is None else f"predictions-{sub}.csv")
    print(f"predictions for {table['run'].nunique()} run(s), {len(table)} rows -> {paths[0]}")
    print("\n".join(console_lines(table)))
    return table


def main() -> None:
    from qalign_repro.cli import entry_point

    entry_point(predict)()


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.stages.predict import main as _main

    _main()
