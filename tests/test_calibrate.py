"""β calibration hits the target acceptance; diagnostics describe a stored chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qalign_repro.calibrate import (
    _chain_acceptance,
    beta_for_target,
    calibrate_beta,
    load_or_calibrate,
    pair_acceptance,
)
from qalign_repro.cli import compose_config
from qalign_repro.diagnostics import run_diagnostics
from qalign_repro.errors import ConfigError
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.run import build_backends, execute
from qalign_repro.stats import changed_acceptance_rate, identical_proposals
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
    """Acceptance of fresh chains (other prompts, other seed) at ``beta``, counted as the config says."""
    ds = dict(cfg.dataset)
    ds.update(n=48, subset_seed=99)
    task = get_task(ds)
    chains = [Chain(idx=i, prompt_id=f"check:{d['id']}", prompt_ids=generator.encode_chat(task.prompt(d)),
                    messages=task.prompt(d)) for i, d in enumerate(task.docs())]
    ctx = RunContext(generator=generator, reward=reward, seed=12345, beta=beta, max_new_tokens=int(cfg.max_new_tokens),
                     temperature=1.0, batch_size=64)
    return _chain_acceptance(ctx, chains, int(cfg.calibrate.steps), str(cfg.calibrate.count))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="with the surprise RM the changed-proposal acceptance is very steep in beta: "
                   "calibrating on 48 prompts lands at 0.505 (beta 0.0084) but 48 other prompts give 0.333 "
                   "(0.525 vs 0.643 with 32 prompts); issue 4 stays open for a steadier calibration")
def test_calibration_on_tiny_models_hits_target(tmp_path):
    """On the tiny models (experiment=tiny counts the proposals that change the completion, see
    calibrate.count) the calibrated beta gives 50 +- 10 % acceptance, also on chains it was not tuned on."""
    cfg = compose_config(["experiment=tiny", f"output_root={tmp_path}", "calibrate.prompts=48", "calibrate.steps=8",
                          "progress=false"])
    assert cfg.calibrate.count == "changed"
    generator, reward = build_backends(cfg)
    result = calibrate_beta(cfg, generator, reward)
    measured = _independent_acceptance(cfg, generator, reward, result["beta"])
    print(f"\n[calibration] beta={result['beta']:.4g} calib-chain acc={result['chain_acceptance']:.3f} "
          f"independent acc={measured:.3f} identical={result['identical_proposal_rate']:.2f}")
    assert result["reached"] and result["count"] == "changed"
    assert abs(result["chain_acceptance"] - 0.5) <= 0.1
    assert abs(measured - 0.5) <= 0.1


def test_counting_all_proposals_on_the_tiny_lm_reports_the_unreachable_target(tmp_path, capsys):
    """count=all: the re-proposed completions (always accepted) keep acceptance far above 50 %, and calibrate
    says so in one line with the way out."""
    cfg = compose_config(["experiment=tiny", "calibrate.count=all", f"output_root={tmp_path}", "calibrate.prompts=6",
                          "calibrate.steps=4", "calibrate.iterations=2", "calibrate.pair_draws=2", "progress=false"])
    generator, reward = build_backends(cfg)
    result = calibrate_beta(cfg, generator, reward)
    assert not result["reached"] and result["identical_proposal_rate"] > 0.5
    err = [line for line in capsys.readouterr().err.splitlines() if "beta=auto" in line]
    assert len(err) == 1 and "out of reach" in err[0] and "calibrate.count=changed" in err[0]


def test_changed_count_leaves_out_reproposals():
    """The toy chain's identical proposals are excluded from the changed rate and only from it."""
    accepted = np.array([[True, True, False, True, True]])
    unchanged = np.array([[False, True, True, False, True]])  # step 1 and 4: identical, step 2: rejected
    assert identical_proposals(accepted, unchanged).tolist() == [[False, True, False, False, True]]
    assert changed_acceptance_rate(accepted, unchanged)[0] == pytest.approx(1 / 2)  # steps 2 (no) and 3 (yes)
    assert np.isnan(changed_acceptance_rate(np.array([[True, True]]), np.array([[False, True]]))[0])


def test_bad_count_is_one_line(tmp_path):
    cfg = compose_config(["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false",
                          f"output_root={tmp_path}", "calibrate.count=some"])
    generator, reward = build_backends(cfg)
    with pytest.raises(ConfigError, match=r"calibrate.count='some'; allowed: all, changed"):
        calibrate_beta(cfg, generator, reward)


def test_stored_calibration_is_reused_only_for_the_same_count(tmp_path):
    base = ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false", f"output_root={tmp_path}",
            "calibrate.prompts=8", "calibrate.steps=4", "calibrate.iterations=2"]
    cfg = compose_config(base)
    generator, reward = build_backends(cfg)
    first = load_or_calibrate(cfg, generator, reward, {"lm": "x"})
    assert load_or_calibrate(cfg, generator, reward, {"lm": "x"}) == first
    other = load_or_calibrate(compose_config([*base, "calibrate.count=changed"]), generator, reward, {"lm": "x"})
    assert other["count"] == "changed" and first["count"] == "all"


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
    # proposals that reproduce the state are accepted and leave it unchanged; the changed rate excludes them
    same = [[o["accepted"] and o["completion_ids"] == p["completion_ids"] for p, o in zip(ch, ch[1:])] for ch in outs]
    assert d["identical_proposal_rate"] == pytest.approx(np.mean(same))
    kept = [(o["accepted"], s) for ch, row in zip(outs, same) for o, s in zip(ch[1:], row) if not s]
    assert d["acceptance_changed_overall"] == pytest.approx(np.mean([a for a, _ in kept]))
