"""``python -m qalign_repro.calibrate``: choose β for a target QAlign acceptance rate (the paper tunes for ≈ 50 %).

Two stages, both on a few calibration prompts:
1. *Pairs.* Draw ancestral states y and one Quest proposal y' from each. The acceptance of a pair,
   min(1, exp((r' − r)/β)·|y|/|y'|), is known in closed form for every β, so a grid over log β gives the β
   whose mean acceptance hits the target without sampling again.
2. *Chains.* Run short real chains at that β (their states are not ancestral, so stage 1 is only a first
   guess) and measure their acceptance as the mean acceptance *probability* of their proposals: the same
   expectation as the share of accepted proposals without its coin-flip noise, and, being closed form, it
   gives the next β by solving on the chains' own pairs. Repeat until the rate is within
   ``calibrate.tolerance`` of the target or the iterations run out; measured βs bracket the target and a
   solution outside the bracket is bisected. What limits the result is the number of *prompts*: acceptance
   varies much more between prompts than between steps of one chain, so the standard error is taken over
   prompts and a warning says when it exceeds ``calibrate.max_se``.
The result (β, both acceptance estimates, the history) is written to
``<output_root>/calibration/<experiment_name>.json`` and reused by ``beta=auto`` runs and by the recipes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf

from qalign_repro.analysis.stats import identical_proposals
from qalign_repro.backends import build_backends
from qalign_repro.cli import entry_point
from qalign_repro.config import positive_int
from qalign_repro.errors import ConfigError
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.methods.qalign import QAlign
from qalign_repro.models.folders import model_fingerprints
from qalign_repro.store.run_names import config_hash
from qalign_repro.tasks import get_task

#: the method whose acceptance rate this stage tunes β for (plan prices the calibration with its cost model)
CALIBRATED_METHOD = QAlign


def calibration_path(cfg: DictConfig) -> Path:
    return Path(cfg.output_root) / "calibration" / f"{cfg.experiment_name}.json"


def acceptance_probabilities(delta_r: np.ndarray, len_old: np.ndarray, len_new: np.ndarray,
                             beta: float) -> np.ndarray:
    """QAlign's min(1, exp(Δr/β)·|y|/|y'|) for every (state, proposal) pair at once."""
    log_alpha = delta_r / beta + np.log(len_old) - np.log(len_new)
    return np.exp(np.minimum(log_alpha, 0.0))


def pair_acceptance(delta_r: np.ndarray, len_old: np.ndarray, len_new: np.ndarray, beta: float) -> float:
    """Mean acceptance probability of the pairs at ``beta``: the expected acceptance rate, without the noise
    of the accept/reject coin flips."""
    return float(np.mean(acceptance_probabilities(delta_r, len_old, len_new, beta)))


BETA_RANGE = (1e-6, 1e6)


def beta_for_target(delta_r: np.ndarray, len_old: np.ndarray, len_new: np.ndarray, target: float) -> float:
    """The β at which the pairs' mean acceptance crosses ``target``: a log grid finds the bracket, bisection
    refines it. The rate rises with β for all but the rare pairs whose reward gain meets a longer proposal, so
    the first crossing is the one; outside the range the nearer end is returned."""
    lo, hi = (math.log(b) for b in BETA_RANGE)
    grid = np.linspace(lo, hi, 241)
    rates = np.array([pair_acceptance(delta_r, len_old, len_new, math.exp(g)) for g in grid])
    above = np.nonzero(rates >= target)[0]
    if not above.size:
        return BETA_RANGE[1]
    j = int(above[0])
    if j == 0:
        return BETA_RANGE[0]
    a, b = grid[j - 1], grid[j]
    for _ in range(40):
        mid = (a + b) / 2
        if pair_acceptance(delta_r, len_old, len_new, math.exp(mid)) >= target:
            b = mid
        else:
            a = mid
    return math.exp(b)


def _calibration_chains(cfg: DictConfig, generator: Any) -> list[Chain]:
    dataset = cast(dict[str, Any], OmegaConf.to_container(cfg.dataset, resolve=True))
    dataset["n"] = int(cfg.calibrate.prompts)
    dataset["subset_seed"] = int(cfg.calibrate.subset_seed)
    if cfg.calibrate.get("split"):
        dataset["split"] = str(cfg.calibrate.split)
    task = get_task(dataset)
    chains = []
    for idx, doc in enumerate(task.docs()):
        messages = task.prompt(doc)
        chains.append(Chain(idx=idx, prompt_id=f"calib:{doc['id']}", prompt_ids=generator.encode_chat(messages),
                            messages=messages))
    return chains


COUNTS = ("all", "changed")


@dataclass
class ChainPairs:
    """The counted (state, proposal) pairs of short chains: enough to give the chains' expected acceptance at
    any β, and its standard error over prompts."""

    delta_r: np.ndarray   # r(y') - r(y)
    len_old: np.ndarray   # |y|
    len_new: np.ndarray   # |y'|
    accepted: np.ndarray  # the coin flips the chains made
    chain: np.ndarray     # which chain (prompt) each pair came from

    def expected(self, beta: float) -> float:
        if not self.delta_r.size:
            return float("nan")
        return pair_acceptance(self.delta_r, self.len_old, self.len_new, beta)

    def observed(self) -> float:
        return float(self.accepted.mean()) if self.accepted.size else float("nan")

    def standard_error(self, beta: float) -> float:
        """Standard error of ``expected(beta)`` with prompts as the sampling unit (pairs of one chain are not
        independent): the delta-method variance of a ratio of per-chain sums."""
        if not self.delta_r.size:
            return float("nan")
        alpha = acceptance_probabilities(self.delta_r, self.len_old, self.len_new, beta)
        chains, inverse = np.unique(self.chain, return_inverse=True)
        m = len(chains)
        if m < 2:
            return float("nan")
        sums = np.bincount(inverse, weights=alpha, minlength=m)
        counts = np.bincount(inverse, minlength=m).astype(float)
        rate = sums.sum() / counts.sum()
        return float(math.sqrt(m / (m - 1) * np.sum((sums - rate * counts) ** 2)) / counts.sum())


def _step_pairs(olds: list[dict[str, Any]], outs: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    """(Δr, |y|, |y'|, accepted, identical) of one QAlign step's proposals against the states y they were made
    from; identical = the proposal reproduced y (``stats.identical_proposals``)."""
    accepted = np.array([o["accepted"] for o in outs], dtype=bool)
    unchanged = np.array([o["completion_ids"] == y["completion_ids"] for y, o in zip(olds, outs)], dtype=bool)
    return (np.array([o["proposal_reward"] - y["reward"] for y, o in zip(olds, outs)], dtype=float),
            np.array([len(y["completion_ids"]) for y in olds], dtype=float),
            np.array([o["proposal_len"] for o in outs], dtype=float),
            accepted, identical_proposals(accepted, unchanged))


def _drive_outputs(method: Any, ctx: RunContext, chains: list[Chain], steps: int, start: int = 0,
                   schedule: str = "auto") -> dict[tuple[int, int], dict[str, Any]]:
    """Outputs ``start..steps-1`` of every chain through the run stage's step driver (kept in memory)."""
    from qalign_repro.methods.driver import drive

    outputs: dict[tuple[int, int], dict[str, Any]] = {}
    for c in chains:
        c.done = start
    drive(method, ctx, chains, steps, outputs.update, schedule=schedule)
    return outputs


class _ProposalsFrom(QAlign):
    """Independent QAlign proposals (k = 1, 2, ...) all made from one fixed state per chain: the closed-form
    first guess needs (state, proposal) pairs from ancestral states, not a chain."""

    kind = "samples"

    def __init__(self, states: dict[int, dict[str, Any]]):
        super().__init__({})
        self.states = states

    def propose(self, ctx: RunContext, chain: Chain, k: int, state: dict[str, Any] | None = None) -> Any:
        return super().propose(ctx, chain, k, self.states[chain.idx])


def chain_pairs(ctx: RunContext, chains: list[Chain], steps: int, count: str = "all",
                schedule: str = "auto") -> ChainPairs:
    """Run short QAlign chains at ``ctx.beta`` from fresh ancestral starts and keep every proposal ``count``
    selects; ``count="changed"`` leaves out the proposals that reproduce the current completion (they are
    accepted at every β, see ``stats.identical_proposals``)."""
    for c in chains:
        c.last = None
    outs = _drive_outputs(QAlign({}), ctx, chains, steps, schedule=schedule)
    idx = np.array([c.idx for c in chains], dtype=int)
    kept: list[tuple[np.ndarray, ...]] = []
    for k in range(1, steps):
        olds = [outs[(c.idx, k - 1)] for c in chains]
        delta_r, len_old, len_new, accepted, same = _step_pairs(olds, [outs[(c.idx, k)] for c in chains])
        keep = ~same if count == "changed" else np.ones_like(same)
        kept.append((delta_r[keep], len_old[keep], len_new[keep], accepted[keep], idx[keep]))
    if not kept:
        kept = [(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=int))]
    delta_r, len_old, len_new, accepted, chain = (np.concatenate(col) for col in zip(*kept))
    return ChainPairs(delta_r=delta_r, len_old=len_old, len_new=len_new, accepted=accepted, chain=chain)


def precision_warning(measurement: dict[str, float], max_se: float, prompts: int) -> str | None:
    """One line when the acceptance estimate is too noisy for the chosen β to hold on other prompts (None when
    its standard error is within ``max_se`` or unknown)."""
    se = measurement["chain_acceptance_se"]
    if not se > max_se:
        return None
    return (f"beta=auto: acceptance {measurement['chain_acceptance']:.3f} +- {se:.3f} (standard error over "
            f"{prompts} prompts) is above calibrate.max_se={max_se:g}: raise calibrate.prompts (or calibrate.steps) "
            f"for a beta that holds on other prompts")


def check_settings(cfg: DictConfig) -> None:
    """One-line errors for ``calibrate`` values that would make the search meaningless, before any sampling."""
    c = cfg.calibrate
    count = c.get("count", "all")
    if count not in COUNTS:
        raise ConfigError(f"calibrate.count={count!r}; allowed: {', '.join(COUNTS)}")
    for key, minimum in (("prompts", 1), ("steps", 2), ("pair_draws", 1), ("iterations", 1)):
        positive_int(c.get(key), f"calibrate.{key}", minimum)
    for key, low, high in (("target_acceptance", 0.0, 1.0), ("tolerance", 0.0, 1.0), ("max_se", 0.0, 1.0)):
        value = c.get(key, 0.05)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            raise ConfigError(f"calibrate.{key}={value!r} is invalid; allowed: a number in ({low:g}, {high:g})")


def calibrate_beta(cfg: DictConfig, generator: Any, reward: Any) -> dict[str, Any]:
    check_settings(cfg)
    target = float(cfg.calibrate.target_acceptance)
    count = str(cfg.calibrate.get("count", "all"))
    chains = _calibration_chains(cfg, generator)
    ctx = RunContext(generator=generator, reward=reward, seed=int(cfg.seed) + 7919, beta=1.0,
                     max_new_tokens=int(cfg.max_new_tokens), temperature=1.0, batch_size=int(cfg.batch_size))
    # stage 1: ancestral states and one proposal each, for several proposal draws
    schedule = str(cfg.get("schedule", "auto"))
    for c in chains:
        c.last = None
    start = _drive_outputs(QAlign({}), ctx, chains, 1, schedule=schedule)
    first = [start[(c.idx, 0)] for c in chains]
    n_draws = int(cfg.calibrate.pair_draws)
    proposals = _drive_outputs(_ProposalsFrom({c.idx: o for c, o in zip(chains, first)}), ctx, chains,
                               n_draws + 1, start=1, schedule=schedule)
    draws = [_step_pairs(first, [proposals[(c.idx, k)] for c in chains]) for k in range(1, n_draws + 1)]
    delta_r, len_old, len_new, _, identical = (np.concatenate(col) for col in zip(*draws))
    pick = ~identical if count == "changed" and (~identical).any() else np.ones_like(identical)
    beta = beta_for_target(delta_r[pick], len_old[pick], len_new[pick], target)
    guess = {"beta": beta, "pair_acceptance": pair_acceptance(delta_r[pick], len_old[pick], len_new[pick], beta)}

    # stage 2: real chains. Their states are not ancestral, so each measurement re-solves the closed form on the
    # chains' own pairs; the measured rate is their mean acceptance probability (no coin-flip noise). Acceptance
    # grows with beta, so measured betas bracket the target and a solution outside the bracket is bisected.
    history = []
    steps = int(cfg.calibrate.steps)
    tolerance = float(cfg.calibrate.tolerance)
    lo, hi = None, None
    for _ in range(int(cfg.calibrate.iterations)):
        ctx.beta = beta
        pairs = chain_pairs(ctx, chains, steps, count, schedule)
        rate = pairs.expected(beta)
        history.append({"beta": beta, "chain_acceptance": rate, "chain_acceptance_se": pairs.standard_error(beta),
                        "observed_acceptance": pairs.observed(), "proposals": int(pairs.delta_r.size)})
        if math.isnan(rate) or abs(rate - target) <= tolerance:
            break
        if rate < target:
            lo = beta if lo is None else max(lo, beta)
        else:
            hi = beta if hi is None else min(hi, beta)
        proposed = beta_for_target(pairs.delta_r, pairs.len_old, pairs.len_new, target)
        inside = (lo is None or proposed > lo) and (hi is None or proposed < hi)
        if not inside:
            proposed = math.sqrt(lo * hi) if lo is not None and hi is not None else (
                beta * 4.0 if rate < target else beta / 4.0)
        beta = min(max(proposed, BETA_RANGE[0]), BETA_RANGE[1])
    best = min(history, key=lambda h: abs(h["chain_acceptance"] - target) if not math.isnan(h["chain_acceptance"])
               else math.inf)
    # A proposal that reproduces the current completion is accepted at every beta, so with count=all the
    # acceptance cannot fall below their share: with a very peaked LM the target may be out of reach.
    identical_rate = float(identical.mean()) if len(identical) else 0.0
    reachable = abs(best["chain_acceptance"] - target) <= tolerance
    closest = f"closest: beta={best['beta']:.3g} with acceptance {best['chain_acceptance']:.3f}"
    if not reachable and count == "all" and best["chain_acceptance"] > target and identical_rate > target - tolerance:
        print(f"beta=auto: target acceptance {target:.2f} is out of reach: {identical_rate:.0%} of the proposals "
              f"reproduce the current completion (always accepted; calibrate.count=changed leaves them out); "
              f"{closest}", file=sys.stderr)
    elif not reachable and math.isnan(best["chain_acceptance"]):
        print(f"beta=auto: no proposal was counted (calibrate.count={count}): raise calibrate.prompts or "
              f"calibrate.steps; keeping beta={best['beta']:.3g}", file=sys.stderr)
    elif not reachable:
        print(f"beta=auto: target acceptance {target:.2f} not reached in calibrate.iterations={len(history)} "
              f"measurements; {closest}", file=sys.stderr)
    elif (warning := precision_warning(best, float(cfg.calibrate.get("max_se", 0.05)), len(chains))) is not None:
        print(warning, file=sys.stderr)
    return {
        "beta": best["beta"],
        "count": count,
        "target_acceptance": target,
        "chain_acceptance": best["chain_acceptance"],
        "chain_acceptance_se": best["chain_acceptance_se"],
        "observed_acceptance": best["observed_acceptance"],
        "reached": reachable,
        "identical_proposal_rate": identical_rate,
        "pair_guess": guess,
        "history": history,
        "prompts": len(chains),
        "steps": steps,
        "settings": calibration_settings(cfg),
        "config_hash": config_hash(cfg),
        "dataset": str(cfg.dataset.name),
        "model": str(cfg.model.name),
        "reward": str(cfg.reward.name),
    }


def calibration_settings(cfg: DictConfig) -> dict[str, Any]:
    """The ``calibrate`` block with its defaults filled in: what a stored calibration must have been made with."""
    settings = cast(dict[str, Any], OmegaConf.to_container(cfg.calibrate, resolve=True))
    settings.setdefault("count", "all")
    return settings


def load_or_calibrate(cfg: DictConfig, generator: Any, reward: Any,
                      prints: dict[str, str | None]) -> dict[str, Any]:
    """The calibration ``reusable_calibration`` finds for this config and these weights (``prints``, the
    fingerprints of ``models.folders.model_fingerprints`` that the caller already has), else a fresh one, written
    to the experiment's calibration file."""
    found = reusable_calibration(cfg, prints)
    if found is not None:
        return found
    result = {**calibrate_beta(cfg, generator, reward), "weights": prints}
    write_calibration(calibration_path(cfg), result)
    return result


def calibration_mismatch(stored: dict[str, Any], cfg: DictConfig, prints: dict[str, str | None]) -> list[str]:
    """What a stored calibration was made for that differs from this config (empty: it may be reused). The one
    reuse rule of every stage (``beta=auto`` runs, the recipes, shipped calibrations): the same policy, RM and
    dataset names, the same weights behind them (fingerprints) and every ``calibrate`` setting (target, count,
    prompts, steps, tolerance, split, ...); a β from other models or another measurement is not this config's β."""
    wanted = {"model": str(cfg.model.name), "reward": str(cfg.reward.name), "dataset": str(cfg.dataset.name)}
    out = [f"{key} {stored.get(key)} (this config: {value})" for key, value in wanted.items()
           if stored.get(key) != value]
    if stored.get("weights") != prints:
        out.append(f"other weights (fingerprints {stored.get('weights')}, now {prints})")
    settings, now = stored.get("settings"), calibration_settings(cfg)
    if not isinstance(settings, dict):
        out.append("unrecorded calibrate settings")
    elif settings != now:
        keys = sorted(k for k in {*settings, *now} if settings.get(k) != now.get(k))
        out.append("other calibrate settings (" + ", ".join(f"{k}={settings.get(k)!r}, now {now.get(k)!r}"
                                                             for k in keys) + ")")
    return out


def calibration_matches(stored: dict[str, Any], cfg: DictConfig, prints: dict[str, str | None]) -> bool:
    """Whether ``stored`` may be reused for this config and weights (``calibration_mismatch`` is empty)."""
    return not calibration_mismatch(stored, cfg, prints)


def _read_stored(path: Path) -> dict[str, Any] | None:
    """The calibration file at ``path``; None (with a warning) when it is unreadable or holds no β."""
    try:
        stored = json.loads(path.read_text())
        float(stored["beta"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"warning: calibration file {path} is unreadable ({type(exc).__name__}: {exc}); ignoring it",
              file=sys.stderr)
        return None
    return stored


def _shipped_file(cfg: DictConfig) -> Path | None:
    """The reward model's local folder's ``calibration.json`` if there is one (checked without validating the
    folder, so a config whose folder is not there yet is not refused here)."""
    node = cast(dict[str, Any], OmegaConf.to_container(cfg.reward, resolve=True))
    if node.get("path") is not None:
        folder = Path(str(node["path"])).expanduser()
    elif node.get("asset"):
        from qalign_repro.models.tiny import assets_dir

        folder = Path(assets_dir(str(node["asset"])))
    else:
        return None
    file = folder / SHIPPED_FILE
    return file if file.is_file() else None


def reusable_calibration(cfg: DictConfig, prints: dict[str, str | None] | None = None,
                         on_mismatch: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """A stored calibration this config may use (``calibration_mismatch``): the experiment's calibration file
    (``calibration_path``), else one shipped in the reward model's folder (``shipped_calibration``); None when
    neither matches. ``prints`` None: the weights are fingerprinted here, and only when there is a candidate (a
    recipe's dry run fingerprints nothing). ``on_mismatch`` receives one sentence per refused file."""
    path = calibration_path(cfg)
    stored = _read_stored(path) if path.is_file() else None
    if stored is None and _shipped_file(cfg) is None:
        return None
    if prints is None:
        prints = model_fingerprints(cfg)
    if stored is not None:
        # a file written before fingerprints were stored: taken as made with the current weights
        why = calibration_mismatch({"weights": prints, **stored}, cfg, prints)
        if not why:
            return stored
        if on_mismatch is not None:
            on_mismatch(f"{path} was calibrated for {'; '.join(why)}")
    return shipped_calibration(cfg, prints)


#: the file in a reward model's folder that holds calibrations shipped with it (``scripts/ship_calibration.py``)
SHIPPED_FILE = "calibration.json"


def shipped_calibration(cfg: DictConfig, prints: dict[str, str | None]) -> dict[str, Any] | None:
    """A calibration shipped in the reward model's folder (``calibration.json``: ``{"calibrations": [...]}``)
    that matches this config and these weights (``calibration_matches``), marked with ``shipped: <file>``; None
    otherwise. Why: the demo should not spend 1.5 min calibrating the shipped models on every run, and a stored
    fingerprint makes retrained or swapped weights fall back to a fresh calibration instead of a stale β."""
    node = cast(dict[str, Any], OmegaConf.to_container(cfg.reward, resolve=True))
    if (node.get("path") is None and not node.get("asset")) or not all(prints.values()):
        return None
    from qalign_repro.models.folders import resolve_model_path

    file = Path(resolve_model_path(node, "reward")) / SHIPPED_FILE
    if not file.is_file():
        return None
    for entry in json.loads(file.read_text()).get("calibrations", []):
        if calibration_matches(entry, cfg, prints):
            return {**entry, "shipped": str(file)}
    return None


def write_calibration(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


@entry_point
def main(cfg: DictConfig) -> None:
    """Pick β for ``calibrate.target_acceptance`` and write it to results/calibration/<experiment>.json."""
    generator, reward = build_backends(cfg)
    path = calibration_path(cfg)
    result = {**calibrate_beta(cfg, generator, reward), "weights": model_fingerprints(cfg)}
    write_calibration(path, result)
    print(f"beta={result['beta']:.4g} (chain acceptance {result['chain_acceptance']:.3f}, "
          f"target {result['target_acceptance']:.2f}) -> {path}")


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.stages.calibrate import main as _main

    _main()
