"""CARDS: reduces to ancestral sampling as the reward threshold goes to -inf, follows its closed-form output
distribution for a finite threshold, cuts segments where the entropy rule says, and runs through the stages."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from _helpers import TOY

from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.lm.toy import EOS, ToyGenerator
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.methods.cards import (
    CARDS,
    DEFAULTS,
    accept_probability,
    cut_segment,
    reward_threshold,
)
from qalign_repro.rm.toy import ToyReward
from qalign_repro.stages.evaluate import evaluate_run
from qalign_repro.stages.predict import PredictOptions, predict_runs
from qalign_repro.stages.run import execute

MAX_NEW = 4
GEN = {"vocab": 3, "max_len": MAX_NEW, "seed": 4, "scale": 1.0}
RM = {"seed": 1, "scale": 2.0}
CFG = dict(segmentation="entropy", entropy_threshold=0.85, min_segment_tokens=1, max_segment_tokens=3, chunk_tokens=2,
           reward_threshold=1.5, threshold_schedule="linear", alpha=0.5, beta=0.5, max_candidates=3,
           on_exhausted="last")


def entropy(p: np.ndarray) -> float:
    return float(-(p * np.log(p)).sum())


def run_cards(cfg: dict, n: int, gen_cfg: dict = GEN, k: int = 0, max_new: int = MAX_NEW) -> list[dict]:
    ctx = RunContext(generator=ToyGenerator(gen_cfg), reward=ToyReward(RM), seed=7, beta=1.0, max_new_tokens=max_new,
                     temperature=1.0, batch_size=100_000)
    chains = [Chain(idx=j, prompt_id=f"p{j}", prompt_ids=[1], messages=[]) for j in range(n)]
    return CARDS(cfg).step(ctx, chains, k)


def exact_cards(gen: ToyGenerator, rm: ToyReward, cfg: dict) -> dict[tuple[int, ...], float]:
    """The output distribution of CARDS with ``on_exhausted: last``, by enumerating segments.

    From prefix y a segment s has model probability p(s | y) (the entropy rule makes its end a function of the
    tokens so far); with acceptance a(s) and A = Σ p(s) a(s), N candidates at most and the N-th taken anyway:
        P(s) = p(s) a(s) Σ_{i<N} (1 - A)^i + (1 - A)^(N-1) p(s) (1 - a(s)).
    """
    r_prompt = rm.value("")

    def segments(prefix: list[int]) -> dict[tuple[int, ...], float]:
        out: dict[tuple[int, ...], float] = {}

        def grow(seg: list[int], p: float) -> None:
            y = prefix + seg
            if (seg and seg[-1] == EOS) or len(y) >= MAX_NEW or len(seg) >= cfg["max_segment_tokens"]:
                out[tuple(seg)] = p
                return
            probs = gen.next_probs(y)
            if len(seg) >= cfg["min_segment_tokens"] and entropy(probs) > cfg["entropy_threshold"]:
                out[tuple(seg)] = p
                return
            for t in range(gen.vocab):
                grow(seg + [t], p * probs[t])

        grow([], 1.0)
        return out

    def dist(prefix: list[int]) -> dict[tuple[int, ...], float]:
        if prefix and (prefix[-1] == EOS or len(prefix) >= MAX_NEW):
            return {tuple(prefix): 1.0}
        segs = segments(prefix)
        acc = {}
        for s in segs:
            y = prefix + list(s)
            tau = reward_threshold(len(y), r_prompt, final=cfg["reward_threshold"], alpha=cfg["alpha"],
                                   max_new=MAX_NEW, schedule=cfg["threshold_schedule"])
            acc[s] = accept_probability(rm.value(gen.decode(y)), tau, cfg["beta"])
        a_total = sum(segs[s] * acc[s] for s in segs)
        n = cfg["max_candidates"]
        geo = sum((1 - a_total) ** i for i in range(n))
        res: dict[tuple[int, ...], float] = defaultdict(float)
        for s, ps in segs.items():
            weight = ps * acc[s] * geo + (1 - a_total) ** (n - 1) * ps * (1 - acc[s])
            for y, py in dist(prefix + list(s)).items():
                res[y] += weight * py
        return dict(res)

    return dist([])


def tv(counts: Counter, target: dict[tuple[int, ...], float]) -> float:
    total = sum(counts.values())
    return 0.5 * sum(abs(counts.get(y, 0) / total - target.get(y, 0.0)) for y in set(counts) | set(target))


# -- distribution tests -------------------------------------------------------------------------------------
def test_minus_inf_threshold_is_ancestral_sampling(capsys):
    gen = ToyGenerator(GEN)
    p = {y: gen.sequence_prob(list(y)) for y in gen.enumerate_completions(MAX_NEW)}
    outs = run_cards({**CFG, "reward_threshold": -math.inf}, 20_000)
    d = tv(Counter(tuple(o["completion_ids"]) for o in outs), p)
    with capsys.disabled():
        print(f"\n[cards, threshold -inf] TV(CARDS, ancestral) = {d:.4f}")
    assert d <= 0.02
    assert all(o["rejected"] == 0 for o in outs)
    # several segments per sample on average: the reduction is not the trivial one-segment case
    assert np.mean([len(o["segments"]) for o in outs]) > 1.5


def test_finite_threshold_matches_closed_form(capsys):
    gen, rm = ToyGenerator(GEN), ToyReward(RM)
    exact = exact_cards(gen, rm, CFG)
    assert abs(sum(exact.values()) - 1) < 1e-9
    p = {y: gen.sequence_prob(list(y)) for y in gen.enumerate_completions(MAX_NEW)}
    outs = run_cards(CFG, 20_000)
    counts = Counter(tuple(o["completion_ids"]) for o in outs)
    d, shift = tv(counts, exact), 0.5 * sum(abs(p[y] - exact.get(y, 0.0)) for y in p)
    # the same algorithm with a different segmentation targets another distribution: the test sees segments
    other = exact_cards(gen, rm, {**CFG, "segmentation": "fixed", "entropy_threshold": math.inf})
    d_other = tv(counts, other)
    with capsys.disabled():
        print(f"\n[cards, threshold 1.5] TV(CARDS, closed form) = {d:.4f}; TV(model, closed form) = {shift:.3f}; "
              f"TV(CARDS, closed form of fixed-length segments) = {d_other:.3f}")
    assert d <= 0.02
    assert shift > 0.15 and d_other > 3 * d
    assert any(o["exhausted"] for o in outs) and any(o["rejected"] for o in outs)


# -- unit tests ---------------------------------------------------------------------------------------------
def test_cut_segment_rule():
    ent = [2.0, 0.1, 0.2, 3.0, 0.1]
    # the first token is exempt below min_len; the cut is *before* the uncertain token
    assert cut_segment([5, 6, 7, 8, 9], ent, 0, min_len=1, threshold=1.0, eos_ids=[0]) == (3, "entropy")
    assert cut_segment([5, 6, 7, 8, 9], ent, 0, min_len=4, threshold=1.0, eos_ids=[0]) == (5, None)
    # a continuation chunk: positions count from the segment start
    assert cut_segment([5, 6], [3.0, 0.1], 2, min_len=2, threshold=1.0, eos_ids=[0]) == (0, "entropy")
    assert cut_segment([5, 0, 7], [0.1, 0.1, 0.1], 0, min_len=1, threshold=1.0, eos_ids=[0]) == (2, "eos")
    # an uncertain EOS is cut before (and drawn again), like any token
    assert cut_segment([5, 0], [0.1, 2.0], 0, min_len=1, threshold=1.0, eos_ids=[0]) == (1, "entropy")
    assert cut_segment([5, 6], None, 0, min_len=1, threshold=None, eos_ids=[0]) == (2, None)


def test_threshold_schedule_and_acceptance():
    kw = dict(final=2.0, alpha=0.5, max_new=10, schedule="linear")
    assert reward_threshold(0, 0.0, **kw) == pytest.approx(1.0)  # (1 - a) r0 + a tau
    assert reward_threshold(5, 0.0, **kw) == pytest.approx(1.5)
    assert reward_threshold(10, 0.0, **kw) == pytest.approx(2.0)
    assert reward_threshold(4, 5.0, **kw) == 2.0  # never above tau
    assert reward_threshold(3, 0.0, **{**kw, "schedule": "constant"}) == 2.0
    assert reward_threshold(3, 0.0, **{**kw, "final": -math.inf}) == -math.inf
    assert accept_probability(1.0, 0.5, 1.0) == 1.0
    assert accept_probability(0.0, 1.0, 0.5) == pytest.approx(math.exp(-2))


def test_segment_boundaries_follow_entropy_rule():
    """On real outputs: every accepted segment ends exactly where the rule fires, never earlier."""
    gen_cfg = {"vocab": 3, "max_len": 10, "seed": 2, "scale": 1.0}
    gen = ToyGenerator(gen_cfg)
    cfg = {**CFG, "entropy_threshold": 0.9, "min_segment_tokens": 2, "max_segment_tokens": 5, "chunk_tokens": 3,
           "reward_threshold": -math.inf}
    outs = run_cards(cfg, 300, gen_cfg=gen_cfg, max_new=10)
    reasons = Counter()
    for o in outs:
        y, start = o["completion_ids"], 0
        assert sum(o["segments"]) == len(y)
        for n in o["segments"]:
            end = start + n
            for j in range(cfg["min_segment_tokens"], n):  # no boundary inside the segment
                assert entropy(gen.next_probs(y[:start + j])) <= cfg["entropy_threshold"]
            if y[end - 1] == EOS:
                reasons["eos"] += 1
            elif end == 10:
                reasons["limit"] += 1
            elif n == cfg["max_segment_tokens"]:
                reasons["max_len"] += 1
            else:
                assert n >= cfg["min_segment_tokens"]
                assert entropy(gen.next_probs(y[:end])) > cfg["entropy_threshold"]
                reasons["entropy"] += 1
            start = end
    assert reasons["entropy"] > 50 and reasons["eos"] > 50 and reasons["max_len"] > 0
    assert sum(o["entropy_cuts"] for o in outs) >= reasons["entropy"]


def test_outputs_do_not_depend_on_batch_and_count_everything():
    alone = run_cards(CFG, 1, k=2)[0]
    assert run_cards(CFG, 6, k=2)[0] == alone
    assert alone["rm_calls"] == alone["candidates"] + 1  # + the prompt-only call of the linear schedule
    assert alone["prompt_reward"] == ToyReward(RM).value("")
    assert alone["lm_calls"] >= alone["candidates"]
    # rejected candidates are paid for too
    assert alone["tokens_generated"] >= len(alone["completion_ids"]) + alone["tokens_wasted"]
    outs = run_cards({**CFG, "reward_threshold": -math.inf, "threshold_schedule": "constant"}, 50)
    for o in outs:  # nothing rejected: every generated token is either kept or a wasted tail
        assert o["tokens_generated"] == len(o["completion_ids"]) + o["tokens_wasted"]
        assert o["rm_calls"] == o["candidates"] == len(o["segments"])


def test_exhausted_retries_take_the_best_or_the_last_candidate():
    """tau = +inf rejects every candidate: each segment is taken after max_candidates tries."""
    never = {**CFG, "reward_threshold": math.inf, "max_candidates": 3}
    best = run_cards({**never, "on_exhausted": "best"}, 400)
    last = run_cards({**never, "on_exhausted": "last"}, 400)
    for o in best + last:
        assert o["exhausted"] == len(o["segments"]) and o["candidates"] == 3 * len(o["segments"])
    # the final reward is the score of the last segment's pick: the best of 3 candidates vs a plain draw
    assert np.mean([o["reward"] for o in best]) > np.mean([o["reward"] for o in last]) + 0.2  # 1.56 vs 1.10


def test_config_errors_and_defaults():
    with pytest.raises(ConfigError, match="segmentation"):
        CARDS({"segmentation": "sentence"})
    with pytest.raises(ConfigError, match="unknown"):
        CARDS({"entropy_treshold": 1.0})
    with pytest.raises(ConfigError, match="not a number"):
        CARDS({"reward_threshold": "-.inf"})
    cfg = compose_config(["method=cards"]).method
    assert {k: v for k, v in cfg.items() if k != "name"} == DEFAULTS


# -- end to end ---------------------------------------------------------------------------------------------
def test_cards_end_to_end_toy(tmp_path):
    cfg = compose_config(["method=cards", *TOY, f"output_root={tmp_path}", "steps=3", "dataset.n=3",
                          "method.min_segment_tokens=1", "method.entropy_threshold=0.8", "method.reward_threshold=1.0"])
    store = execute(cfg)
    assert execute(cfg).name == store.name  # a rerun finds the run complete
    grades = evaluate_run(str(tmp_path), store.name)
    assert len(grades) == 3 and all(len(g["correct"]) == 3 for g in grades)
    table, _ = predict_runs(tmp_path, [store.name], PredictOptions(bootstrap=0))
    assert set(table["rule"]) == {"mv", "wmv", "bon"}
    assert all(lbl.startswith("CARDS+") for lbl in table["label"]) and (table["tokens_rm"] > 0).any()


@pytest.mark.slow
def test_cards_end_to_end_tiny_hf(tmp_path):
    cfg = compose_config(["method=cards", f"output_root={tmp_path}", "steps=2", "dataset.n=2", "max_new_tokens=16",
                          "progress=false", "method.max_candidates=2"])
    store = execute(cfg)
    for inst in store.iter_instances():
        first, second = inst["outputs"]
        for o in (first, second):
            assert sum(o["segments"]) == len(o["completion_ids"]) <= 16 and o["tokens_scored"] > 0
        # the prompt-only RM call of the linear schedule is made once per prompt, then reused
        assert first["rm_calls"] == first["candidates"] + 1 and second["rm_calls"] == second["candidates"]
        assert second["prompt_reward"] == first["prompt_reward"]
    assert len(evaluate_run(str(tmp_path), store.name)) == 2
