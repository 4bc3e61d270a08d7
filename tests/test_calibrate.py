"""β calibration hits the target acceptance; diagnostics describe a stored chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qalign_repro.analysis.diagnostics import run_diagnostics
from qalign_repro.analysis.stats import changed_acceptance_rate, identical_proposals
from qalign_repro.backends import build_backends
from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.stages.calibrate import (
    BETA_RANGE,
    ChainPairs,
    acceptance_probabilities,
    beta_for_target,
    calibrate_beta,
    calibration_mismatch,
    calibration_path,
    chain_pairs,
    load_or_calibrate,
    pair_acceptance,
    precision_warning,
    reusable_calibration,
)
from qalign_repro.stages.run import execute
from qalign_repro.tasks import get_task


def test_pair_acceptance_is_monotone_and_inverted():
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 1, 500)
    lo, ln = rng.integers(5, 20, 500).astype(float), rng.integers(5, 20, 500).astype(float)
    rates = [pair_acceptance(delta, lo, ln, b) for b in (0.1, 0.3, 1.0, 3.0)]
    assert rates == sorted(rates)
    beta = beta_for_target(delta, lo, ln, 0.5)
    assert abs(pair_acceptance(delta, lo, ln, beta) - 0.5) < 0.02


def test_beta_for_target_solves_far_below_the_old_grid_and_clips_at_the_range():
    rng = np.random.default_rng(1)
    delta = -np.abs(rng.normal(0, 1e-4, 400))  # reward drops of ~1e-4: the target needs beta ~1e-4
    ones = np.full(400, 10.0)
    beta = beta_for_target(delta, ones, ones, 0.5)
    assert 1e-5 < beta < 1e-3
    assert pair_acceptance(delta, ones, ones, beta) == pytest.approx(0.5, abs=1e-3)
    # every pair improves the reward: acceptance 1 at every beta, the lower end is the closest
    assert beta_for_target(np.abs(delta), ones, ones, 0.5) == BETA_RANGE[0]
    # every pair is longer by half: acceptance <= 2/3 at every beta, 0.9 is out of reach above
    assert beta_for_target(delta, ones, ones * 1.5, 0.9) == BETA_RANGE[1]


def test_standard_error_is_over_prompts():
    """Pairs of one chain move together: the error must match a bootstrap over chains, not over pairs."""
    rng = np.random.default_rng(2)
    chains = 60
    level = rng.normal(-0.02, 0.02, chains)  # each prompt has its own typical reward change
    sizes = rng.integers(2, 9, chains)
    chain = np.repeat(np.arange(chains), sizes)
    delta = level[chain] + rng.normal(0, 0.002, chain.size)
    ones = np.full(chain.size, 10.0)
    pairs = ChainPairs(delta_r=delta, len_old=ones, len_new=ones, accepted=np.zeros(chain.size, bool), chain=chain)
    beta = 0.01
    boot = []
    for _ in range(2000):
        pick = np.concatenate([np.nonzero(chain == c)[0] for c in rng.integers(0, chains, chains)])
        boot.append(pair_acceptance(delta[pick], ones[pick], ones[pick], beta))
    assert pairs.standard_error(beta) == pytest.approx(np.std(boot), rel=0.15)
    naive = np.std(acceptance_probabilities(delta, ones, ones, beta)) / np.sqrt(chain.size)
    assert pairs.standard_error(beta) > 1.5 * naive
    one_chain = ChainPairs(delta_r=delta[:3], len_old=ones[:3], len_new=ones[:3], accepted=np.zeros(3, bool),
                           chain=np.zeros(3, int))
    assert np.isnan(one_chain.standard_error(beta))


def test_imprecise_calibration_is_one_line():
    line = precision_warning({"chain_acceptance": 0.52, "chain_acceptance_se": 0.09}, 0.05, 16)
    assert line is not None and "\n" not in line
    assert "0.520 +- 0.090" in line and "16 prompts" in line and "calibrate.max_se=0.05" in line
    assert "calibrate.prompts" in line
    assert precision_warning({"chain_acceptance": 0.52, "chain_acceptance_se": 0.03}, 0.05, 128) is None
    assert precision_warning({"chain_acceptance": 0.52, "chain_acceptance_se": float("nan")}, 0.05, 1) is None


def _independent_pairs(cfg, generator, reward, beta: float, n: int = 256):
    """Chains at ``beta`` on test prompts (calibration tunes on rm_train), another seed, counted as configured."""
    ds = dict(cfg.dataset)
    assert cfg.calibrate.split == "rm_train" and ds["split"] == "test"
    ds.update(n=n, subset_seed=99)
    task = get_task(ds)
    chains = [Chain(idx=i, prompt_id=f"check:{d['id']}", prompt_ids=generator.encode_chat(task.prompt(d)),
                    messages=task.prompt(d)) for i, d in enumerate(task.docs())]
    ctx = RunContext(generator=generator, reward=reward, seed=12345, beta=beta, max_new_tokens=int(cfg.max_new_tokens),
                     temperature=1.0, batch_size=64)
    return chain_pairs(ctx, chains, int(cfg.calibrate.steps), str(cfg.calibrate.count))


@pytest.mark.slow
def test_calibration_on_tiny_models_hits_target(tmp_path):
    """On the tiny models (experiment=tiny: 128 rm_train prompts, counting the proposals that change the
    completion) the calibrated beta gives 50 +- 10 % acceptance, also on 256 test prompts it never saw, counted
    as the share of proposals the chains accepted."""
    # 4-step chains: the same 128 prompts at half the cost of tiny_repro's 8 (the whole suite has 20 minutes);
    # calibrate must hit the target for whatever chain length it is given
    cfg = compose_config(["experiment=tiny", f"output_root={tmp_path}", "progress=false", "calibrate.steps=4"])
    assert cfg.calibrate.count == "changed" and cfg.calibrate.prompts >= 128
    generator, reward = build_backends(cfg)
    result = calibrate_beta(cfg, generator, reward)
    check = _independent_pairs(cfg, generator, reward, result["beta"])
    print(f"\n[calibration] beta={result['beta']:.4g} calib-chain acc={result['chain_acceptance']:.3f} "
          f"+- {result['chain_acceptance_se']:.3f} (observed {result['observed_acceptance']:.3f}); other prompts: "
          f"observed {check.observed():.3f}, expected {check.expected(result['beta']):.3f} "
          f"+- {check.standard_error(result['beta']):.3f} over {check.delta_r.size} proposals; "
          f"identical={result['identical_proposal_rate']:.2f}")
    assert result["reached"] and result["count"] == "changed"
    assert abs(result["chain_acceptance"] - 0.5) <= cfg.calibrate.tolerance
    assert result["chain_acceptance_se"] < 0.05
    assert check.delta_r.size >= 200
    assert abs(check.observed() - 0.5) <= 0.1
    assert abs(check.expected(result["beta"]) - 0.5) <= 0.1


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


def test_running_out_of_iterations_is_one_line(tmp_path, capsys):
    cfg = compose_config(["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false",
                          f"output_root={tmp_path}", "calibrate.prompts=6", "calibrate.steps=4",
                          "calibrate.iterations=1", "calibrate.tolerance=0.001"])
    generator, reward = build_backends(cfg)
    result = calibrate_beta(cfg, generator, reward)
    assert not result["reached"] and len(result["history"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "beta=auto" in line]
    assert len(err) == 1 and "not reached in calibrate.iterations=1 measurements" in err[0]
    assert f"beta={result['beta']:.3g}" in err[0]


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


@pytest.mark.parametrize(("override", "message"), [
    ("calibrate.prompts=0", "calibrate.prompts=0 is invalid; allowed: an integer >= 1"),
    ("calibrate.steps=1", "calibrate.steps=1 is invalid; allowed: an integer >= 2"),
    ("calibrate.target_acceptance=1.5", r"calibrate.target_acceptance=1.5 is invalid; allowed: a number in \(0, 1\)"),
    ("calibrate.tolerance=0", r"calibrate.tolerance=0 is invalid; allowed: a number in \(0, 1\)"),
    ("calibrate.max_se=abc", r"calibrate.max_se='abc' is invalid; allowed: a number in \(0, 1\)"),
])
def test_bad_calibrate_values_are_one_line(tmp_path, override, message):
    cfg = compose_config(["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false",
                          f"output_root={tmp_path}", override])
    generator, reward = build_backends(cfg)
    with pytest.raises(ConfigError, match=message):
        calibrate_beta(cfg, generator, reward)


def test_stored_calibration_is_reused_only_for_the_same_settings(tmp_path):
    base = ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false", f"output_root={tmp_path}",
            "calibrate.prompts=8", "calibrate.steps=4", "calibrate.iterations=2"]
    cfg = compose_config(base)
    generator, reward = build_backends(cfg)
    first = load_or_calibrate(cfg, generator, reward, {"lm": "x"})
    assert load_or_calibrate(cfg, generator, reward, {"lm": "x"}) == first
    other = load_or_calibrate(compose_config([*base, "calibrate.count=changed"]), generator, reward, {"lm": "x"})
    assert other["count"] == "changed" and first["count"] == "all"
    more = load_or_calibrate(compose_config([*base, "calibrate.prompts=9"]), generator, reward, {"lm": "x"})
    assert more["prompts"] == 9 and more["settings"]["prompts"] == 9
    assert load_or_calibrate(compose_config([*base, "calibrate.prompts=9"]), generator, reward, {"lm": "x"}) == more


def test_one_reuse_rule_weights_dataset_models_and_settings(tmp_path, capsys):
    """``reusable_calibration`` is the rule of beta=auto runs and of the recipes alike: a stored β is reused only
    for the same weights, dataset, policy / RM names and calibrate settings; an unreadable file is recomputed."""
    base = ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false", f"output_root={tmp_path}",
            "calibrate.prompts=4", "calibrate.steps=3", "calibrate.iterations=1", "calibrate.pair_draws=1"]
    cfg = compose_config(base)
    generator, reward = build_backends(cfg)
    prints = {"model": "a" * 16, "reward": "b" * 16}
    first = load_or_calibrate(cfg, generator, reward, prints)
    assert reusable_calibration(cfg, prints) == first
    assert calibration_mismatch(first, cfg, prints) == []
    why: list[str] = []
    assert reusable_calibration(cfg, {**prints, "reward": "c" * 16}, on_mismatch=why.append) is None
    assert "other weights" in why[0] and str(calibration_path(cfg)) in why[0]
    assert calibration_mismatch({**first, "dataset": "gsm8k"}, cfg, prints) == ["dataset gsm8k (this config: arith)"]
    assert calibration_mismatch({**first, "reward": "tiny"}, cfg, prints) == ["reward tiny (this config: toy)"]
    steps = compose_config([*base, "calibrate.steps=4"])
    assert calibration_mismatch(first, steps, prints) == ["other calibrate settings (steps=3, now 4)"]
    calibration_path(cfg).write_text("{not json")
    again = load_or_calibrate(cfg, generator, reward, prints)  # a damaged file: warned about, then recomputed
    assert again["beta"] == first["beta"] and "is unreadable" in capsys.readouterr().err


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
