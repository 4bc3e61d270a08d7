"""The cost plan: exact bookkeeping on known lengths, and within 10 % of what a real tiny run spends."""

from __future__ import annotations

import pytest

from qalign_repro.cli import compose_config
from qalign_repro.methods.qalign import suffix_model
from qalign_repro.stages.plan import (
    Lengths,
    build_plan,
    calibration_tokens,
    expected_tokens,
    recipe_stages,
)
from qalign_repro.store.storage import RunStore


def test_expected_tokens_follow_the_run_accounting():
    lengths = Lengths(n_prompts=10, prompt_tokens=100, completion_tokens=41, rm_tokens=150, source="test")
    anc = expected_tokens("ancestral", 4, lengths)
    assert anc == {"tokens_generated": 10 * 4 * 41, "tokens_prefilled": 10 * 4 * 100,
                   "tokens_cached": 10 * 3 * 100, "tokens_scored": 10 * 4 * 150}
    qa = expected_tokens("qalign", 4, lengths)
    # step 0 is an ancestral sample; each later step regenerates the suffix after a uniform cut: (L+1)/2 tokens
    assert qa["tokens_generated"] == 10 * (41 + 3 * 21)
    assert qa["tokens_prefilled"] == 10 * (100 + 3 * (100 + 20))
    assert qa["tokens_cached"] == 10 * 3 * 120
    assert qa["tokens_scored"] == anc["tokens_scored"]
    # Appendix D: for long chains QAlign decodes about half the tokens of as many independent samples
    long_q, long_a = expected_tokens("qalign", 1024, lengths), expected_tokens("ancestral", 1024, lengths)
    assert 0.5 < long_q["tokens_generated"] / long_a["tokens_generated"] < 0.53
    # measured lengths that are all L give the same numbers as the single length L
    fixed = Lengths(10, 100, 41, 150, "test", length_samples=(41,) * 5)
    assert expected_tokens("qalign", 4, fixed) == pytest.approx(qa)
    total, steps = calibration_tokens({"pair_draws": 2, "steps": 3, "iterations": 2}, lengths)
    assert steps == 1 + 2 + 2 * 3
    assert total["tokens_generated"] == expected_tokens("qalign", 3, lengths)["tokens_generated"] * 3


def test_suffix_model_from_a_length_distribution():
    # lengths 2 and 4, equally likely. State 2: cut 0 -> fresh sample (3), cut 1 -> E[L'-1 | L'>1] = 2.
    # State 4: cuts 0..3 -> 3, 2, 2 (only 4 is longer than 2), 1. Means: cut (0.5 + 1.5) / 2, suffix
    # ((3 + 2) / 2 + (3 + 2 + 2 + 1) / 4) / 2.
    cut, suffix = suffix_model(Lengths(1, 10, 3, 20, "test", length_samples=(2, 4)))
    assert cut == pytest.approx(1.0)
    assert suffix == pytest.approx((2.5 + 2.0) / 2)
    # a model that stops at random: much more than half of a completion is regenerated after a cut
    geometric = tuple(int(x) for x in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89] * 3)
    mean = sum(geometric) / len(geometric)
    assert suffix_model(Lengths(1, 10, mean, 20, "t", length_samples=geometric))[1] > (mean + 1) / 2


def _stored_totals(root, name) -> dict[str, int]:
    store = RunStore(root, name, readonly=True)
    try:
        totals = dict.fromkeys(("tokens_generated", "tokens_prefilled", "tokens_scored"), 0)
        for inst in store.iter_instances():
            for out in inst["outputs"]:
                for k in totals:
                    totals[k] += int(out[k])
        return totals
    finally:
        store.close()


@pytest.mark.slow
def test_dry_run_plan_matches_a_real_tiny_run(tmp_path):
    """A measured tiny ancestral run gives L (plan.measure=runs); the plan of the whole recipe made from it must
    match the tokens the real ancestral *and* QAlign runs used within 10 %. For QAlign this checks the cost model
    itself (suffix of (L+1)/2 tokens per step after the uniform cut, prefix in the prompt, RM on full outputs);
    prompt and RM lengths come from the real tokenizers."""
    from qalign_repro.stages.run import execute

    base = ["experiment=recipe_tiny", f"output_root={tmp_path}", "recipe.calibrate.enabled=false", "steps=8",
            "recipe.dataset_overrides.arith=['dataset.n=8']", "progress=false", "backend=hf"]
    cfg = compose_config(base)
    stages = recipe_stages(cfg, base)
    assert [compose_config(s.overrides).method.name for s in stages] == ["ancestral", "qalign"]

    ancestral = execute(compose_config(stages[0].overrides))
    table, _ = build_plan(cfg, base, ["plan.measure=runs"])
    planned = {row["method"]: row for _, row in table[table["stage"] == "run"].iterrows()}
    assert all("P: model tokenizer" in row["source"] and "64 stored outputs" in row["source"]
               for row in planned.values())
    qalign = execute(compose_config(stages[1].overrides))
    for store in (ancestral, qalign):
        actual = _stored_totals(tmp_path, store.name)
        method = store.meta["method"]
        store.close()
        row = planned[method]
        assert row["sequences"] == 8 * 8
        for key, value in actual.items():
            ratio = row[key] / value
            print(f"{method} {key}: planned {row[key]:.0f}, actual {value} ({ratio:.3f})")
            assert 0.9 <= ratio <= 1.1, f"{method} {key}: planned {row[key]:.0f} vs actual {value}"


def test_plan_of_the_general_recipe_offline(monkeypatch):
    """Without network the real tokenizers and GSM8K train are unavailable: the plan still sizes every stage,
    from the bundled test sets and stated estimates, and says so per row."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    over = ["experiment=general", "recipe.datasets=[gsm8k,math500]"]
    table, opts = build_plan(compose_config(over), over, ["plan.tokens_per_s=5000"])
    runs = table[table["stage"] == "run"]
    assert len(runs) == 3 * 2 and (runs["steps"] == 1024).all()
    gsm = runs[runs["dataset"] == "gsm8k"].iloc[0]
    assert gsm["prompts"] == 1024 and gsm["completion_tokens"] == 250
    assert runs[runs["dataset"] == "math500"].iloc[0]["prompts"] == 500
    assert "estimate" in gsm["source"]
    cal = table[table["stage"] == "calibrate"].iloc[0]
    assert cal["prompts"] == 128 and "128 prompts assumed" in cal["source"]
    total = table[table["stage"] == "total"].iloc[0]
    assert total["gpu_hours"] == pytest.approx(table["gpu_hours"][:-1].sum())
    assert opts["tokens_per_s"] == 5000 and opts["cached_prefill"]
    # 2 * 8.03e9 params * tokens: FLOPs follow the token counts
    assert gsm["flops_policy"] == pytest.approx(2 * 8030261248 * (gsm["tokens_prefilled"] + gsm["tokens_generated"]))


def test_occupancy_model():
    """Lock-step calls last as long as their longest sequence; async on a continuous engine does not."""
    from qalign_repro.stages.plan import PLAN_DEFAULTS, Lengths, expected_max, occupancy

    assert expected_max([5.0], 8) == 5.0
    assert expected_max([1.0, 3.0], 1) == 2.0 and abs(expected_max([1.0, 3.0], 2) - 2.5) < 1e-12
    spread = Lengths(n_prompts=64, prompt_tokens=50, completion_tokens=40, rm_tokens=90, source="test",
                     length_samples=tuple([10] * 50 + [90] * 10))
    opts = dict(PLAN_DEFAULTS)
    lock_anc, _ = occupancy("ancestral", "lockstep", spread, 64, 96, True, opts)
    lock_q, _ = occupancy("qalign", "lockstep", spread, 64, 96, True, opts)
    one, _ = occupancy("ancestral", "lockstep", spread, 1, 96, True, opts)
    asyn, why = occupancy("qalign", "async", spread, 64, 96, True, opts)
    hf_async, _ = occupancy("qalign", "async", spread, 64, 96, False, opts)
    assert abs(lock_anc - (sum(spread.length_samples) / 60) / 90) < 0.01  # mean / max: a batch of 64 holds a 90
    assert abs(one - 1.0) < 1e-9  # one sequence per call: never waits for another
    assert 0 < lock_q < 1 and asyn == 0.9 and "async" in why
    assert hf_async == lock_q  # no continuous batching: async falls back to lock-step behaviour
