"""A new chain method is one file plus one yaml: nothing outside ``methods/`` names a method (issue 17).

The test defines a throw-away chain method, ``toywalk``, the way a new ``methods/toywalk.py`` would (a class that
registers itself and states its declarations), and its ``conf/method/toywalk.yaml`` as text put into Hydra's
config store (so that ``method=toywalk`` composes without writing into the package). Then it runs every stage on
the toy backends: run -> evaluate -> predict -> plot, plus ``plan`` (which must use the method's own cost model)
and ``fsck`` (which must apply the method's own ``transition_errors`` between consecutive states).

``toywalk`` is an independence Metropolis-Hastings sampler: state 0 is a sample from the model, every later step
proposes a fresh sample y' and keeps it with probability min(1, exp((r(y') - r(y)) / beta)). With proposals from
the model itself that targets p(y) exp(r / beta), so, like QAlign, it is exact only at temperature 1.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from qalign_repro.cli import compose_config
from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import Completion
from qalign_repro.methods import METHODS
from qalign_repro.methods.base import (
    PURPOSE_ACCEPT,
    Chain,
    Method,
    Proposal,
    RunContext,
    derive_rng,
    derive_seed,
    output_record,
)

NAME = "toywalk"
#: what conf/method/toywalk.yaml would hold
YAML = """\
# toywalk: independence Metropolis-Hastings with fresh samples from the model (a test-only method)
name: toywalk
"""
TOY = ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false"]
N_PROMPTS, STEPS = 3, 6


class ToyWalk(Method):
    """The whole method: per-request ``propose`` / ``decide``, plus the declarations the pipeline reads."""

    name = NAME
    kind = "chain"
    per_request = True
    exact_only_at_temperature_one = True
    default_rules = ("bon", "mv")

    @classmethod
    def expected_tokens(cls, steps: int, lengths: Any) -> dict[str, float]:
        """Every step is one whole sample: L generated, P prefilled (cached after the first), R scored."""
        n, p, length, r = lengths.n_prompts, lengths.prompt_tokens, lengths.completion_tokens, lengths.rm_tokens
        return {"tokens_generated": n * steps * length, "tokens_prefilled": n * steps * p,
                "tokens_cached": n * (steps - 1) * p, "tokens_scored": n * steps * r}

    @staticmethod
    def transition_errors(prev: dict[str, Any] | None, cur: dict[str, Any]) -> list[str]:
        bad = [] if cur["index"] == 0 else [f"index={cur['index']}: a toywalk proposal is a whole fresh sample"]
        if prev is None:
            return bad + ([] if cur["accepted"] else ["toywalk state 0 must be accepted"])
        if not cur["accepted"] and (cur["completion_ids"], cur["reward"]) != (prev["completion_ids"], prev["reward"]):
            bad.append("a rejected toywalk step must repeat the previous state")
        return bad

    def propose(self, ctx: RunContext, chain: Chain, k: int) -> Proposal:
        return Proposal(chain=chain, k=k, prompt_ids=chain.prompt_ids, max_tokens=ctx.max_new_tokens,
                        seed=derive_seed(ctx.seed, chain.prompt_id, k), memo={"old": chain.last})

    def decide(self, ctx: RunContext, proposal: Proposal, completion: Completion, text: str, reward: float,
               n_scored: int) -> dict[str, Any]:
        ids, old = completion.token_ids, proposal.memo["old"]
        alpha = 1.0 if old is None else min(1.0, math.exp((reward - old["reward"]) / ctx.beta))
        u = float(derive_rng(ctx.seed, proposal.chain.prompt_id, proposal.k, PURPOSE_ACCEPT).random())
        cost = dict(index=0, proposal_len=len(ids), proposal_reward=reward, tokens_generated=len(ids),
                    tokens_prefilled=completion.prompt_tokens, tokens_cached=0, tokens_scored=n_scored, alpha=alpha)
        if old is None or u < alpha:
            return output_record(ids, text, reward, accepted=True, finish_reason=completion.finish_reason, **cost)
        return output_record(old["completion_ids"], old["text"], old["reward"], accepted=False,
                             finish_reason=old["finish_reason"], **cost)


@pytest.fixture(scope="module")
def toywalk() -> Iterator[type[ToyWalk]]:
    """``toywalk`` registered (and its yaml composable) for this module only, so no other test sees it."""
    from hydra.core.config_store import ConfigStore

    METHODS.register(NAME)(ToyWalk)
    ConfigStore.instance().store(group="method", name=NAME, node=OmegaConf.create(YAML))
    try:
        yield ToyWalk
    finally:
        METHODS._entries.pop(NAME, None)
        ConfigStore.instance().repo["method"].pop(f"{NAME}.yaml", None)


def _args(root: Path, *extra: str) -> list[str]:
    return [*TOY, f"output_root={root}", f"method={NAME}", f"dataset.n={N_PROMPTS}", f"steps={STEPS}", "seed=3",
            "experiment_name=plugin", *extra]


@pytest.fixture(scope="module")
def run(toywalk, tmp_path_factory) -> tuple[Path, str]:
    """The run and evaluate stages on toywalk."""
    from qalign_repro.stages.evaluate import evaluate_run
    from qalign_repro.stages.run import execute

    root = tmp_path_factory.mktemp("plugin")
    store = execute(compose_config(_args(root)))
    name = store.name
    store.close()
    evaluate_run(str(root), name)
    return root, name


def _outputs(root: Path, name: str) -> dict[tuple[int, int], dict[str, Any]]:
    from qalign_repro.store.storage import RunStore

    store = RunStore(root, name, readonly=True)
    try:
        return {(i, k): out for i, inst in enumerate(store.iter_instances()) for k, out in enumerate(inst["outputs"])}
    finally:
        store.close()


def test_the_config_checks_read_the_declarations(toywalk, tmp_path):
    with pytest.raises(ConfigError, match=r"temperature=0.7 with method=toywalk breaks exactness"):
        compose_config(_args(tmp_path, "temperature=0.7"))
    assert compose_config(_args(tmp_path, "temperature=0.7", "allow_inexact=true")).method.name == NAME


def test_run_and_evaluate_store_a_chain(run):
    from qalign_repro.store.storage import RunStore

    root, name = run
    outs = _outputs(root, name)
    assert len(outs) == N_PROMPTS * STEPS
    assert all(outs[i, 0]["accepted"] for i in range(N_PROMPTS))
    rejected = [(i, k) for (i, k), o in outs.items() if not o["accepted"]]
    assert rejected, "a chain that never rejects tests nothing"
    for i, k in rejected:
        assert outs[i, k]["completion_ids"] == outs[i, k - 1]["completion_ids"]
    store = RunStore(root, name, readonly=True)
    try:
        assert store.meta["method"] == NAME and store.meta["status"] == "done"
        assert len(store.read_eval("grades")) == N_PROMPTS
    finally:
        store.close()


def test_fsck_applies_the_methods_transition_errors(run, tmp_path):
    import shutil

    from qalign_repro.store.fsck import check_store, main
    from qalign_repro.store.storage import CHECKED_TABLES, row_checksum

    root, name = run
    assert check_store(root, name) == []
    copy = tmp_path / "root"
    shutil.copytree(root / "runs", copy / "runs")
    outs = _outputs(copy, name)
    i, k = next((i, k) for (i, k), o in sorted(outs.items()) if not o["accepted"])
    bad = {**outs[i, k], "reward": outs[i, k]["reward"] + 1.0, "proposal_reward": outs[i, k]["reward"] + 1.0}
    conn = sqlite3.connect(copy / "runs" / name / "exp.sqlite", isolation_level=None)
    value = json.dumps(bad)
    assert CHECKED_TABLES["outputs"][1] == ("idx", "step")
    conn.execute("UPDATE outputs SET value=?, crc=? WHERE idx=? AND step=?",
                 (value, row_checksum("outputs", (i, k), value), i, k))  # a writer bug: a valid checksum
    conn.close()
    problems = check_store(copy, name)
    (p,) = [p for p in problems if p.code == "record"]  # (and the grades no longer align with the valid steps)
    assert (p.code, p.instance, p.step) == ("record", i, k)
    assert p.message == "a rejected toywalk step must repeat the previous state"
    assert {q.code for q in problems} == {"record", "eval"}
    assert main([str(copy / "runs" / name)]) == 1


def test_plan_prices_the_run_with_the_methods_cost_model(run):
    from qalign_repro.stages.plan import build_plan, expected_tokens

    root, _ = run
    args = _args(root)
    table, _ = build_plan(compose_config(args), args, ["plan.measure=runs"])
    row = table[table["stage"] == "run"].iloc[0]
    assert row["method"] == NAME and row["steps"] == STEPS and row["prompts"] == N_PROMPTS
    assert "stored outputs" in row["source"]  # L measured from the run above (its first outputs)
    assert row["tokens_generated"] == pytest.approx(N_PROMPTS * STEPS * row["completion_tokens"])
    assert row["tokens_prefilled"] == pytest.approx(N_PROMPTS * STEPS * row["prompt_tokens"])
    assert row["tokens_cached"] == pytest.approx(N_PROMPTS * (STEPS - 1) * row["prompt_tokens"])
    # a method that declares no cost model: one line listing those that do, toywalk among them
    with pytest.raises(ConfigError, match=r"no cost model for method=cards; allowed: ancestral, qalign, toywalk$"):
        expected_tokens("cards", STEPS, None)


def test_predict_and_plot_use_the_declarations(run):
    from qalign_repro.stages.plot import plot
    from qalign_repro.stages.predict import predict

    root, name = run
    cfg = compose_config(_args(root))
    table = predict(cfg)
    assert set(table["run"]) == {name} and set(table["method"]) == {NAME}
    assert set(table["rule"]) == set(ToyWalk.default_rules)  # its default rules, not the sample-pool trio
    assert all(label.startswith(ToyWalk.series_prefix()) for label in table["label"])  # "TOYWALK+ ..."
    paths = plot(cfg)
    assert paths and all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in paths)
