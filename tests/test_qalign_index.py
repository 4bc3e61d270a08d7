"""``method.index`` (where a QAlign proposal cuts y) and the stored acceptance probability ``alpha``.

Every index rule is exact only with its own reverse-move term in the ratio: checked by enumeration on the toy
(as ``test_qalign_exact.py`` does for the paper's uniform index), and a rule given the wrong term must fail.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from _helpers import TOY
from test_qalign_exact import BETA, MAX_NEW, exact_target, tv_distance

from qalign_repro.analysis.diagnostics import chain_diagnostics, format_diagnostics, run_diagnostics
from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.lm.toy import ToyGenerator
from qalign_repro.methods.base import PURPOSE_ACCEPT, Chain, RunContext, derive_rng
from qalign_repro.methods.driver import drive
from qalign_repro.methods.proposal_index import IndexRule
from qalign_repro.methods.qalign import QAlign, acceptance_probability
from qalign_repro.rm.toy import ToyReward
from qalign_repro.store.fsck import check_output, check_store, check_transition, transition_hook
from qalign_repro.store.run_names import run_name

HOOK = transition_hook("qalign")


class LongPromptToy(ToyGenerator):
    """The toy model behind a chat prompt of ``extra + 1`` tokens (the toy itself expects one), so block
    boundaries fall at offsets other than the multiples of b."""

    extra = 1

    def sample(self, prompts: list[list[int]], *args: Any, **kwargs: Any):
        return super().sample([list(p[self.extra:]) for p in prompts], *args, **kwargs)


def _toy(cls: type = ToyGenerator) -> tuple[ToyGenerator, ToyReward]:
    return cls({"vocab": 3, "max_len": MAX_NEW, "seed": 3, "scale": 1.0}), ToyReward({"seed": 1, "scale": 2.0})


def _chains(method_cfg: dict, n_chains: int = 1500, steps: int = 40, prompt: tuple[int, ...] = (1,),
            gen_cls: type = ToyGenerator) -> tuple[list[list[dict]], RunContext]:
    gen, rm = _toy(gen_cls)
    ctx = RunContext(generator=gen, reward=rm, seed=7, beta=BETA, max_new_tokens=MAX_NEW, temperature=1.0,
                     batch_size=10_000)
    chains = [Chain(idx=j, prompt_id=f"p{j}", prompt_ids=list(prompt), messages=[]) for j in range(n_chains)]
    outs: list[list[dict]] = [[] for _ in chains]

    def commit(group: dict[tuple[int, int], dict]) -> None:
        for (j, k), o in group.items():
            outs[j].append((k, o))

    drive(QAlign(method_cfg), ctx, chains, steps, commit, schedule="lockstep")
    return [[o for _, o in sorted(c, key=lambda t: t[0])] for c in outs], ctx


def _tv(method_cfg: dict, burn_in: int = 10, **kw: Any) -> float:
    chains, _ = _chains(method_cfg, **kw)
    counts = Counter(tuple(o["completion_ids"]) for c in chains for o in c[burn_in:])
    gen, rm = _toy()
    return tv_distance(counts, exact_target(gen, rm, BETA))


CASES = {
    "block b=2": ({"index": "block", "block_size": 2}, {}),
    # prompt of 2 tokens: the cuts are {0} and i with (2 + i - 1) % 2 == 0, i.e. {0, 1, 3}
    "block b=2, 2-token prompt": ({"index": "block", "block_size": 2}, {"prompt": (1, 1), "gen_cls": LongPromptToy}),
    "block b=16 (all cuts 0)": ({"index": "block"}, {}),
    "fixed p=0 (independence sampler)": ({"index": "fixed", "index_position": 0}, {}),
}


# test-fast keeps the first case (block b=2, the shipped option); the full suite runs them all (~15 s each)
@pytest.mark.parametrize("case", [c if i == 0 else pytest.param(c, marks=pytest.mark.slow) for i, c in enumerate(CASES)])
def test_each_index_option_is_exact(case, capsys):
    cfg, kw = CASES[case]
    tv = _tv(cfg, **kw)
    with capsys.disabled():
        print(f"\n[exactness] TV(QAlign index {case}, target) = {tv:.4f}")
    assert tv <= 0.02


@pytest.mark.slow  # two enumeration runs, ~12 s
def test_block_index_with_the_uniform_ratio_is_wrong(monkeypatch, capsys):
    """The control: the block draw with the uniform |y|/|y'| term targets another distribution."""
    exact = _tv({"index": "block", "block_size": 2})
    monkeypatch.setattr(IndexRule, "log_reverse_ratio",
                        lambda self, i, lo, ln, p, g: float(np.log(lo) - np.log(ln)))
    wrong = _tv({"index": "block", "block_size": 2})
    with capsys.disabled():
        print(f"\n[exactness] TV(block b=2, uniform ratio) = {wrong:.4f} vs {exact:.4f} with m(y)/m(y')")
    assert wrong > 0.03 and wrong > 3 * exact


def test_block_cuts_land_on_cache_block_boundaries():
    rule = IndexRule(kind="block", block_size=4)
    rng = np.random.default_rng(0)
    for prompt_len in (1, 2, 5, 8):
        cuts = Counter(rule.draw(rng, 13, prompt_len, None) for _ in range(4000))
        expected = [0] + [i for i in range(1, 13) if (prompt_len + i - 1) % 4 == 0]
        assert sorted(cuts) == expected and rule.block_choices(13, prompt_len, 4) == len(expected)
        assert max(cuts.values()) / min(cuts.values()) < 1.3  # uniform over the choices
    # a 1-token prompt: the multiples of b, m(y) = floor((|y|-1)/b) + 1
    assert [rule.block_choices(n, 1, 4) for n in (1, 4, 5, 9)] == [1, 1, 2, 3]
    # null block size: the generator's prefix-cache block size (vLLM), 16 for generators without one
    assert IndexRule(kind="block").resolved_block(type("G", (), {"prefix_block_size": 32})()) == 32
    assert IndexRule(kind="block").resolved_block(ToyGenerator()) == 16


def test_fixed_index_rejects_moves_without_a_reverse():
    rule = IndexRule(kind="fixed", position=2)
    assert rule.draw(None, 5, 1, None) == 2 and rule.draw(None, 2, 1, None) == 1
    assert rule.log_reverse_ratio(2, 5, 3, 1, None) == 0.0      # i(y') = 2 = i(y)
    assert rule.log_reverse_ratio(1, 2, 4, 1, None) == -np.inf  # i(y') = 2 != 1: no reverse move
    assert acceptance_probability(5.0, 0.0, 2, 4, 1.0, log_reverse=-np.inf) == 0.0


def test_uniform_index_is_unchanged():
    """The default keeps the paper's draw and ratio, so stored chains equal those of runs made before."""
    rule = IndexRule.from_cfg({})
    draws = [rule.draw(np.random.default_rng(s), 7, 3, None) for s in range(50)]
    assert draws == [int(np.random.default_rng(s).integers(0, 7)) for s in range(50)]
    assert acceptance_probability(0.3, 0.1, 3, 5, 0.5, log_reverse=rule.log_reverse_ratio(1, 3, 5, 3, None)) == \
        acceptance_probability(0.3, 0.1, 3, 5, 0.5)


def test_alpha_is_stored_and_decides_the_coin():
    """alpha is the min(1, ...) of the step (1.0 for state 0), and accepted == (u < alpha) for the step's own u."""
    for cfg in ({}, {"index": "block", "block_size": 2}):
        chains, ctx = _chains(cfg, n_chains=40, steps=12)
        rule = IndexRule.from_cfg(cfg)
        for j, outs in enumerate(chains):
            assert outs[0]["alpha"] == 1.0
            for k in range(1, len(outs)):
                prev, cur = outs[k - 1], outs[k]
                u = float(derive_rng(ctx.seed, f"p{j}", k, PURPOSE_ACCEPT).random())
                assert cur["accepted"] == (u < cur["alpha"])
                lr = rule.log_reverse_ratio(cur["index"], len(prev["completion_ids"]), cur["proposal_len"], 1,
                                            ctx.generator)
                assert cur["alpha"] == acceptance_probability(cur["proposal_reward"], prev["reward"],
                                                              len(prev["completion_ids"]), cur["proposal_len"],
                                                              BETA, log_reverse=lr)
                assert check_output(cur, MAX_NEW) == [] and check_transition("qalign", k, prev, cur, HOOK) == []
        acc = np.mean([o["accepted"] for c in chains for o in c[1:]])
        rb = chain_diagnostics(chains)["acceptance_rb_overall"]
        assert rb == pytest.approx(np.mean([o["alpha"] for c in chains for o in c[1:]]))
        assert abs(rb - acc) < 0.1  # the flips' expectation


def test_fsck_flags_alpha_that_contradicts_the_coin():
    chains, _ = _chains({}, n_chains=20, steps=6)
    prev, cur = next((c[k - 1], c[k]) for c in chains for k in range(1, len(c)) if not c[k]["accepted"])
    assert check_transition("qalign", 1, prev, cur, HOOK) == []
    assert check_transition("qalign", 1, prev, {**cur, "alpha": 1.0}, HOOK) == [
        "accepted=False contradicts the stored acceptance probability alpha=1.0"]
    assert check_output({**cur, "alpha": 1.5}, MAX_NEW) == ["alpha=1.5 is not a probability in [0, 1]"]
    assert check_output({k: v for k, v in cur.items() if k != "alpha"}, MAX_NEW) == []


def _cfg(root, *extra: str):
    return compose_config([*TOY, f"output_root={root}", "method=qalign", "dataset.n=3", "steps=5", *extra])


def test_store_without_alpha_still_reads(tmp_path, monkeypatch):
    """Runs stored before alpha existed: fsck finds nothing wrong, diagnostics have no RB acceptance."""
    from qalign_repro.stages.run import execute

    decide = QAlign.decide
    monkeypatch.setattr(QAlign, "decide", lambda self, *a: {k: v for k, v in decide(self, *a).items()
                                                           if k != "alpha"})
    store = execute(_cfg(tmp_path))
    assert all("alpha" not in o for inst in store.iter_instances() for o in inst["outputs"])
    assert check_store(tmp_path, store.name) == []
    d = run_diagnostics(store)
    assert d["acceptance_rb_overall"] is None and d["acceptance_overall"] is not None
    assert "Rao-Blackwellised" not in format_diagnostics(d)


def test_block_index_run_end_to_end(tmp_path):
    from qalign_repro.stages.run import execute

    store = execute(_cfg(tmp_path, "method.index=block", "method.block_size=2"))
    outs = [o for inst in store.iter_instances() for o in inst["outputs"]]
    assert all(o["index"] % 2 == 0 and 0.0 <= o["alpha"] <= 1.0 for o in outs)  # toy prompts are 1 token: multiples of b
    assert check_store(tmp_path, store.name) == []
    assert "Rao-Blackwellised" in format_diagnostics(run_diagnostics(store))
    # a non-default index is part of the run's identity; the default is left out of the hash
    assert run_name(_cfg(tmp_path, "method.index=block")) != run_name(_cfg(tmp_path))
    assert run_name(_cfg(tmp_path, "method.index=uniform", "method.block_size=8")) == run_name(_cfg(tmp_path))


@pytest.mark.parametrize("override, match", [
    ("method.index=random", "method.index='random' is not a known option; allowed: uniform, block, fixed"),
    ("method.block_size=0", "method.block_size=0 is invalid"),
    ("method.block_size=two", "method.block_size='two' is invalid"),
    ("method.block_size=true", "method.block_size=True is invalid"),
    ("method.index_position=-1", "method.index_position=-1 is invalid"),
])
def test_bad_index_options_are_one_line_errors(tmp_path, override, match):
    from qalign_repro.config import validate

    with pytest.raises(ConfigError) as exc:
        validate(_cfg(tmp_path, override))
    assert match in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "runs").exists()


def test_index_through_the_python_api():
    from qalign_repro import QAlign as ApiQAlign
    from qalign_repro import load_model, load_reward

    model, rm = load_model("toy"), load_reward("toy")
    default = ApiQAlign(model, rm, beta=0.5, max_new_tokens=4)
    assert not {"index", "block_size", "index_position"} & set(default._settings()["method"])  # names as before
    res = ApiQAlign(model, rm, beta=0.5, max_new_tokens=4, index="block", block_size=2).run(["a", "b"], steps=6)
    outs = [o for r in res for o in r]
    assert all(o["index"] % 2 == 0 and "alpha" in o for o in outs) and any(o["index"] == 2 for o in outs)
