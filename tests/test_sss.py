"""SSS is exact: on enumerable toy draft/target models its outputs follow the stated shifted target
pi(x | y_<t) ∝ p(x | y_<t) · (q(x | y_<t) / q0(x | y_<t))^shift, and it runs end to end through the stages."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from _helpers import TOY

from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.lm.toy import ToyGenerator
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.methods.sss import SSS, shifted_logprobs, verify
from qalign_repro.rm.toy import ToyReward
from qalign_repro.stages.evaluate import evaluate_run
from qalign_repro.stages.predict import PredictOptions, predict_runs
from qalign_repro.stages.run import execute

MAX_NEW = 4
TARGET = {"vocab": 3, "max_len": MAX_NEW, "seed": 3, "scale": 1.0}
DRAFT = {"seed": 11, "scale": 1.5}
REF = {"seed": 5}


def stated_target(target: ToyGenerator, draft: ToyGenerator, ref: ToyGenerator | None, shift: float
                  ) -> dict[tuple[int, ...], float]:
    """prod_t pi(y_t | y_<t) for every completion of the enumerable space."""
    out = {}
    for y in target.enumerate_completions(MAX_NEW):
        prob = 1.0
        for t in range(len(y)):
            pre = list(y[:t])
            lr = None if ref is None else np.log(ref.next_probs(pre))
            pi = np.exp(shifted_logprobs(np.log(target.next_probs(pre)), np.log(draft.next_probs(pre)), lr, shift))
            prob *= pi[y[t]]
        out[y] = prob
    return out


def tv(counts: Counter, target: dict[tuple[int, ...], float]) -> float:
    total = sum(counts.values())
    return 0.5 * sum(abs(counts.get(y, 0) / total - target.get(y, 0.0)) for y in set(counts) | set(target))


def run_sss(cfg: dict, n: int, seed: int = 7, k: int = 0, target_cfg: dict = TARGET) -> list[dict]:
    gen = ToyGenerator(target_cfg)
    ctx = RunContext(generator=gen, reward=ToyReward({"seed": 1}), seed=seed, beta=1.0, max_new_tokens=MAX_NEW,
                     temperature=1.0, batch_size=100_000)
    chains = [Chain(idx=j, prompt_id=f"p{j}", prompt_ids=[1], messages=[]) for j in range(n)]
    return SSS(cfg).step(ctx, chains, k)


@pytest.mark.parametrize("shift,use_ref", [(0.5, False), (1.0, True)], ids=["geometric-mix", "with-draft-ref"])
def test_sss_matches_stated_target(shift, use_ref, capsys):
    target, draft = ToyGenerator(TARGET), ToyGenerator({**TARGET, **DRAFT})
    ref = ToyGenerator({**TARGET, **REF}) if use_ref else None
    pi = stated_target(target, draft, ref, shift)
    assert abs(sum(pi.values()) - 1) < 1e-9 and len(pi) == 31
    outs = run_sss({"gamma": 2, "shift": shift, "draft": DRAFT, "draft_ref": REF if use_ref else None}, 20_000)
    counts = Counter(tuple(o["completion_ids"]) for o in outs)
    p = {y: target.sequence_prob(list(y)) for y in pi}
    q = {y: draft.sequence_prob(list(y)) for y in pi}
    tv_sss = tv(counts, pi)
    tv_p = 0.5 * sum(abs(p[y] - pi[y]) for y in pi)
    tv_q = 0.5 * sum(abs(q[y] - pi[y]) for y in pi)
    rate = float(np.mean([o["acceptance_rate"] for o in outs]))
    with capsys.disabled():
        print(f"\n[sss exactness shift={shift} ref={use_ref}] TV(SSS, target) = {tv_sss:.4f}; "
              f"TV(p, target) = {tv_p:.3f}; TV(draft, target) = {tv_q:.3f}; draft acceptance {rate:.2f}")
    assert tv_sss <= 0.02
    # the target is far from both models, so matching it is not a by-product of copying either one
    assert tv_p > 0.15 and tv_q > 0.15
    # the draft is really rejected sometimes (the residual path is exercised), and accepted often
    assert 0.3 < rate < 0.95


def test_shifted_logprobs():
    rng = np.random.default_rng(0)
    lp, lq, lr = (np.log(rng.dirichlet(np.ones(5))) for _ in range(3))
    assert np.allclose(shifted_logprobs(lp, lq, None, 1.0), lq)  # q0 = p and shift 1: the draft itself
    assert np.allclose(shifted_logprobs(lp, lq, lr, 0.0), lp)  # no shift: the target
    want = np.exp(lp) * np.exp(lq) / np.exp(lr)
    assert np.allclose(np.exp(shifted_logprobs(lp, lq, lr, 1.0)), want / want.sum())


def test_verify_token_distribution_is_pi():
    """One verification step, enumerated over the draft token: P(first new token = x) = pi(x)."""
    rng = np.random.default_rng(1)
    q, pi = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4))
    counts = np.zeros(4)
    draws = rng.choice(4, size=20_000, p=q)
    for x in draws:
        new, _ = verify([int(x)], np.log(q)[None], np.log(pi)[None], rng, extra=False)
        counts[new[0]] += 1
    assert 0.5 * np.abs(counts / counts.sum() - pi).sum() < 0.015
    # with a plain speculative acceptance (pi := q) nothing is ever rejected
    new, n_acc = verify([2, 1], np.log(np.stack([q, q, q])), np.log(np.stack([q, q, q])), rng, extra=True)
    assert n_acc == 2 and new[:2] == [2, 1] and len(new) == 3


def test_outputs_do_not_depend_on_batch_and_count_all_models():
    cfg = {"gamma": 2, "shift": 0.5, "draft": DRAFT}
    alone = run_sss(cfg, 1, k=3)[0]
    batched = run_sss(cfg, 5, k=3)[0]
    assert alone == batched
    m = alone["models"]
    assert set(m) == {"target", "draft"} and m["draft"]["generated"] == alone["drafted"] > 0
    # equal-size models: the standard fields are the sums over models (scale 1)
    assert alone["tokens_prefilled"] == m["target"]["prefilled"] + m["draft"]["prefilled"]
    assert alone["tokens_generated"] == m["draft"]["generated"]
    assert alone["rm_calls"] == 1 and alone["tokens_scored"] > 0


def test_draft_tokens_are_scaled_by_parameter_ratio():
    class BigDraft(ToyGenerator):
        pass

    big = BigDraft({**TARGET, **DRAFT})
    big.n_params = 3 * big.n_params
    gen = ToyGenerator(TARGET)
    ctx = RunContext(generator=gen, reward=ToyReward({}), seed=0, beta=1.0, max_new_tokens=MAX_NEW,
                     temperature=1.0, batch_size=8)
    out = SSS({"gamma": 2, "draft": DRAFT}, draft=big).step(ctx, [Chain(0, "a", [1], [])], 0)[0]
    m = out["models"]
    assert out["tokens_prefilled"] == m["target"]["prefilled"] + 3 * m["draft"]["prefilled"]
    assert out["tokens_generated"] == 3 * m["draft"]["generated"]


def test_config_errors():
    with pytest.raises(ConfigError, match="draft"):
        SSS({"gamma": 2})
    with pytest.raises(ConfigError, match="gamma"):
        SSS({"gamma": 0, "draft": DRAFT})
    with pytest.raises(ConfigError, match="unknown"):
        SSS({"draft": DRAFT, "gama": 3})


def test_conf_defaults_agree_with_code():
    from qalign_repro.methods.sss import DEFAULTS

    cfg = compose_config(["method=sss"]).method
    assert set(cfg) - {"name"} == set(DEFAULTS)
    assert cfg.gamma == DEFAULTS["gamma"] and cfg.shift == DEFAULTS["shift"]


def test_sss_end_to_end_toy(tmp_path):
    cfg = compose_config(["method=sss", *TOY, f"output_root={tmp_path}", "steps=3", "dataset.n=3",
                          "method.draft.asset=null", "+method.draft.seed=5", "method.gamma=2"])
    store = execute(cfg)
    grades = evaluate_run(str(tmp_path), store.name)
    assert len(grades) == 3 and all(len(g["correct"]) == 3 for g in grades)
    table, _ = predict_runs(tmp_path, [store.name], PredictOptions(bootstrap=0))
    assert set(table["rule"]) == {"mv", "wmv", "bon"}
    assert (table["flops_policy"] > 0).all()
    assert all(lbl.startswith("SSS+") for lbl in table["label"])


@pytest.mark.slow
def test_sss_end_to_end_tiny_hf(tmp_path):
    """The shipped tiny LM as target and tiny-draft as draft, two prompts, a few tokens."""
    cfg = compose_config(["method=sss", f"output_root={tmp_path}", "steps=2", "dataset.n=2", "max_new_tokens=12",
                          "progress=false"])
    store = execute(cfg)
    outs = [o for inst in store.iter_instances() for o in inst["outputs"]]
    assert len(outs) == 4
    for o in outs:
        assert 1 <= len(o["completion_ids"]) <= 12 and o["drafted"] >= 1
        assert o["models"]["target"]["calls"] == o["rounds"] and o["tokens_scored"] > 0
    assert len(evaluate_run(str(tmp_path), store.name)) == 2


@pytest.mark.slow
def test_hf_rows_match_next_token_logprobs():
    """The batched multi-position pass SSS uses agrees with the generator's own next-token log-probs."""
    from qalign_repro.api import load_model
    from qalign_repro.methods.sss import next_token_logprob_rows

    gen = load_model("tiny", device="cpu")
    prompts = [gen.encode_chat([{"role": "user", "content": "A box holds 4 eggs."}]), gen.encode_chat(
        [{"role": "user", "content": "Hi"}])]
    completions = [[40, 41, 42, 43], [50, 51]]
    rows = next_token_logprob_rows(gen, prompts, completions, [3, 2])
    for p, y, r in zip(prompts, completions, rows):
        n = len(r)
        ref = gen.next_token_logprobs([p + y[:len(y) - n + 1 + i] for i in range(n)]).double().numpy()
        assert np.allclose(r, ref, atol=1e-4)
