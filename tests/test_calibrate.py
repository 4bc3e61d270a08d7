"""β calibration hits the target acceptance; diagnostics describe a stored chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qalign_repro.calibrate import _chain_acceptance, beta_for_target, calibrate_beta, pair_acceptance
from qalign_repro.cli import compose_config
from qalign_repro.diagnostics import run_diagnostics
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.run import build_backends, execute
from qalign_repro.tasks import get_task


def test_pair_acceptance_is_monotone_and_inverted():
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 1, 500)
    lo, ln = rng.integers(5, 20, 500).astype(float), rng.integers(5, 20, 500).astype(float)
    rates = [pair_acceptance(delta, lo, ln, b) for b in (0.1, 0.3, 1.0, 3.0)]
    assert rates == sorted(rates)
    beta = beta_for_target(delta, lo, ln, 0.5)
    assert abs(pair_acceptance(delta, lo, ln, beta) - 0.5) < 0.02


def _independent_acceptance(cfg, generator, reward, beta: float) -> float:
    """Acceptance of fresh chains (other prompts, other seed) at ``beta``."""
    ds = dict(cfg.dataset)
    ds.update(n=12, subset_seed=99)
    task = get_task(ds)
    chains = [Chain(idx=i, prompt_id=f"check:{d['id']}", prompt_ids=generator.encode_chat(task.prompt(d)),
                    messages=task.prompt(d)) for i, d in enumerate(task.docs())]
    ctx = RunContext(generator=generator, reward=reward, seed=12345, beta=beta, max_new_tokens=int(cfg.max_new_tokens),
                     temperature=1.0, batch_size=64)
    return _chain_acceptance(ctx, chains, 10)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the shipped tiny LM is so peaked that 86 % of QAlign's suffix proposals "
                   "reproduce the current completion (always accepted), so acceptance stays ~0.9 at every beta >= 1e-4 "
                   "and the paper's 50 % target is out of reach; calibrate reports it (reached=false, "
                   "identical_proposal_rate). Issue 4 stays open")
def test_calibration_on_tiny_models_hits_target(tmp_path):
    cfg = compose_config([f"output_root={tmp_path}", "calibrate.prompts=12", "calibrate.steps=8",
                          "progress=false"])
    generator, reward = build_backends(cfg)
    result = calibrate_beta(cfg, generator, reward)
    measured = _independent_acceptance(cfg, generator, reward, result["beta"])
    print(f"\n[calibration] beta={result['beta']:.4g} calib-chain acc={result['chain_acceptance']:.3f} "
          f"independent acc={measured:.3f}")
    assert abs(result["chain_acceptance"] - 0.5) <= 0.1
    assert abs(measured - 0.5) <= 0.1


def test_beta_auto_records_calibration_in_meta(tmp_path):
    cfg = compose_config(["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false",
                          f"output_root={tmp_path}", "beta=auto", "steps=5", "dataset.n=4",
                          "calibrate.prompts=32", "calibrate.steps=6"])
    store = execute(cfg)
    meta = store.meta
    stored = json.loads((tmp_path / "calibration" / "default.json").read_text())
    assert meta["beta"] == stored["beta"] > 0
    assert meta["beta_calibration"]["chain_acceptance"] == stored["chain_acceptance"]
    assert meta["diagnostics"]["steps"] == 5
    # a rerun with more steps keeps the calibrated beta (no re-calibration)
    cfg.steps = 7
    assert execute(cfg).meta["beta"] == stored["beta"]


def test_diagnostics_of_a_toy_chain(tmp_path):
    cfg = compose_config(["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false",
                          f"output_root={tmp_path}", "steps=30", "dataset.n=6"])
    store = execute(cfg)
    d = run_diagnostics(store)
    outs = [inst["outputs"] for inst in store.iter_instances()]
    expected = np.mean([[o["accepted"] for o in chain[1:]] for chain in outs])
    assert d["acceptance_overall"] == pytest.approx(expected)
    assert d["chains"] == 6 and d["steps"] == 30
    assert 0 < d["mean_suffix_tokens"] <= 4
    assert 0 <= d["burn_in_estimate"] <= 15
    assert d["reward_ess_mean"] is None or 0 < d["reward_ess_mean"] <= 30 * np.log10(30)
