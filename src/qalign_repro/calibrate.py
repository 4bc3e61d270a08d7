"""``python -m qalign_repro.calibrate``: choose β for a target QAlign acceptance rate (the paper tunes for ≈ 50 %).

Two stages, both on a few calibration prompts:
1. *Pairs.* Draw ancestral states y and one Quest proposal y' from each. The acceptance of a pair,
   min(1, exp((r' − r)/β)·|y|/|y'|), is known in closed form for every β, so a grid over log β gives the β
   whose mean acceptance hits the target without sampling again.
2. *Chains.* Run a short real chain at that β and measure its acceptance (the chain's states are not
   ancestral, so stage 1 is only a first guess); acceptance grows with β, so bracket the target in log β and
   bisect until the measured rate is within ``calibrate.tolerance`` of it or the iterations run out.
The result (β, both acceptance estimates, the history) is written to
``<output_root>/calibration/<experiment_name>.json`` and reused by ``beta=auto`` runs and by the recipes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from qalign_repro.cli import entry_point
from qalign_repro.errors import ConfigError
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.methods.qalign import QAlign
from qalign_repro.models_io import model_fingerprints
from qalign_repro.naming import config_hash
from qalign_repro.stats import changed_acceptance_rate, identical_proposals
from qalign_repro.tasks import get_task


def calibration_path(cfg: DictConfig) -> Path:
    return Path(cfg.output_root) / "calibration" / f"{cfg.experiment_name}.json"


def pair_acceptance(delta_r: np.ndarray, len_old: np.ndarray, len_new: np.ndarray, beta: float) -> float:
    log_alpha = delta_r / beta + np.log(len_old) - np.log(len_new)
    return float(np.mean(np.exp(np.minimum(log_alpha, 0.0))))


def beta_for_target(delta_r: np.ndarray, len_old: np.ndarray, len_new: np.ndarray, target: float) -> float:
    grid = np.exp(np.linspace(math.log(1e-3), math.log(1e3), 241))
    rates = np.array([pair_acceptance(delta_r, len_old, len_new, b) for b in grid])
    return float(grid[int(np.argmin(np.abs(rates - target)))])


def _calibration_chains(cfg: DictConfig, generator: Any) -> list[Chain]:
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
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


def _rate(accepted: list[bool], unchanged: list[bool], count: str) -> float:
    """Pooled acceptance of the proposals ``count`` selects (``stats.changed_acceptance_rate`` decides which
    proposals reproduced the current completion); NaN when none is counted."""
    acc, same = np.array(accepted, dtype=bool), np.array(unchanged, dtype=bool)
    if count == "changed":
        return float(changed_acceptance_rate(acc, same, skip_first=False))
    return float(acc.mean()) if acc.size else float("nan")


def _chain_acceptance(ctx: RunContext, chains: list[Chain], steps: int, count: str = "all") -> float:
    """Acceptance of short chains from fresh ancestral starts; ``count="changed"`` leaves out the proposals
    that reproduce the current completion."""
    method = QAlign({})
    for c in chains:
        c.last = None
    accepted, unchanged = [], []
    for k in range(steps):
        outs = method.step(ctx, chains, k)
        if k > 0:
            accepted += [bool(o["accepted"]) for o in outs]
            unchanged += [o["completion_ids"] == c.last["completion_ids"] for c, o in zip(chains, outs)]
        for c, o in zip(chains, outs):
            c.last = o
    return _rate(accepted, unchanged, count)


def calibrate_beta(cfg: DictConfig, generator: Any, reward: Any) -> dict[str, Any]:
    target = float(cfg.calibrate.target_acceptance)
    count = str(cfg.calibrate.get("count", "all"))
    if count not in COUNTS:
        raise ConfigError(f"calibrate.count={count!r}; allowed: {', '.join(COUNTS)}")
    chains = _calibration_chains(cfg, generator)
    ctx = RunContext(generator=generator, reward=reward, seed=int(cfg.seed) + 7919, beta=1.0,
                     max_new_tokens=int(cfg.max_new_tokens), temperature=1.0, batch_size=int(cfg.batch_size))
    # stage 1: ancestral states and one proposal each, for several proposal draws
    method = QAlign({})
    deltas, l_old, l_new, accepted, unchanged = [], [], [], [], []
    for c in chains:
        c.last = None
    first = method.step(ctx, chains, 0)
    for c, o in zip(chains, first):
        c.last = o
    for k in range(1, int(cfg.calibrate.pair_draws) + 1):
        for o_old, o_new in zip(first, method.step(ctx, chains, k)):
            deltas.append(o_new["proposal_reward"] - o_old["reward"])
            l_old.append(len(o_old["completion_ids"]))
            l_new.append(o_new["proposal_len"])
            accepted.append(bool(o_new["accepted"]))
            unchanged.append(o_new["completion_ids"] == o_old["completion_ids"])
    delta_r, len_old, len_new = np.array(deltas), np.array(l_old, float), np.array(l_new, float)
    identical = identical_proposals(np.array(accepted, dtype=bool), np.array(unchanged, dtype=bool))
    pick = ~identical if count == "changed" and (~identical).any() else np.ones_like(identical)
    beta = beta_for_target(delta_r[pick], len_old[pick], len_new[pick], target)
    guess = {"beta": beta, "pair_acceptance": pair_acceptance(delta_r[pick], len_old[pick], len_new[pick], beta)}

    # stage 2: measure on real chains; acceptance grows with beta, so bracket and bisect in log beta
    history = []
    steps = int(cfg.calibrate.steps)
    log_b, lo, hi = math.log(beta), None, None
    for _ in range(int(cfg.calibrate.iterations)):
        ctx.beta = math.exp(log_b)
        rate = _chain_acceptance(ctx, chains, steps, count)
        history.append({"beta": ctx.beta, "chain_acceptance": rate})
        if math.isnan(rate) or abs(rate - target) <= float(cfg.calibrate.tolerance):
            break
        if rate < target:
            lo = log_b
            log_b = (log_b + hi) / 2 if hi is not None else log_b + 1.5
        else:
            hi = log_b
            log_b = (log_b + lo) / 2 if lo is not None else log_b - 1.5
        log_b = min(max(log_b, math.log(1e-4)), math.log(1e4))
    best = min(history, key=lambda h: abs(h["chain_acceptance"] - target) if not math.isnan(h["chain_acceptance"])
               else math.inf)
    # A proposal that reproduces the current completion is accepted at every beta, so with count=all the
    # acceptance cannot fall below their share: with a very peaked LM the target may be out of reach.
    identical_rate = float(identical.mean()) if len(identical) else 0.0
    reachable = abs(best["chain_acceptance"] - target) <= float(cfg.calibrate.tolerance)
    if not reachable:
        hint = " (calibrate.count=changed leaves them out)" if count == "all" else ""
        print(f"beta=auto: target acceptance {target:.2f} is out of reach: {identical_rate:.0%} of the proposals "
              f"reproduce the current completion (always accepted){hint}; closest: beta={best['beta']:.3g} with "
              f"acceptance {best['chain_acceptance']:.3f}", file=sys.stderr)
    return {
        "beta": best["beta"],
        "count": count,
        "target_acceptance": target,
        "chain_acceptance": best["chain_acceptance"],
        "reached": reachable,
        "identical_proposal_rate": identical_rate,
        "pair_guess": guess,
        "history": history,
        "prompts": len(chains),
        "steps": steps,
        "config_hash": config_hash(cfg),
        "dataset": str(cfg.dataset.name),
        "model": str(cfg.model.name),
        "reward": str(cfg.reward.name),
    }


def load_or_calibrate(cfg: DictConfig, generator: Any, reward: Any,
                      prints: dict[str, str | None]) -> dict[str, Any]:
    """The stored calibration for this experiment if it matches the models (names and ``prints``, the weight
    fingerprints of ``models_io.model_fingerprints`` that the caller already has) and the target (rate and
    ``calibrate.count``), else a fresh one."""
    path = calibration_path(cfg)
    if path.is_file():
        stored = json.loads(path.read_text())
        if (stored.get("model"), stored.get("reward"), stored.get("dataset"), stored.get("weights", prints),
                stored.get("count", "all"), stored.get("target_acceptance")) == (
                str(cfg.model.name), str(cfg.reward.name), str(cfg.dataset.name), prints,
                str(cfg.calibrate.get("count", "all")), float(cfg.calibrate.target_acceptance)):
            return stored
    result = {**calibrate_beta(cfg, generator, reward), "weights": prints}
    write_calibration(path, result)
    return result


def write_calibration(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


@entry_point
def main(cfg: DictConfig) -> None:
    """Pick β for ``calibrate.target_acceptance`` and write it to results/calibration/<experiment>.json."""
    from qalign_repro.run import build_backends

    generator, reward = build_backends(cfg)
    path = calibration_path(cfg)
    result = {**calibrate_beta(cfg, generator, reward), "weights": model_fingerprints(cfg)}
    write_calibration(path, result)
    print(f"beta={result['beta']:.4g} (chain acceptance {result['chain_acceptance']:.3f}, "
          f"target {result['target_acceptance']:.2f}) -> {path}")


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.calibrate import main as _main

    _main()
