"""The step driver: scheduling changes when requests run, never what is stored.

On the toy backends (pure numpy, per-request seeds) with ``ShuffledEngine`` standing in for a continuously
batching engine (requests finish in random order and random groups).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from qalign_repro.errors import ConfigError
from qalign_repro.lm.engine import BatchedEngine, ShuffledEngine
from qalign_repro.lm.toy import ToyGenerator
from qalign_repro.methods import METHODS
from qalign_repro.methods.base import Chain, RunContext
from qalign_repro.methods.driver import drive, resolve_schedule
from qalign_repro.rm.toy import ToyReward


class Continuous(ToyGenerator):
    """The toy model behind a shuffling engine; keeps the engine it made, so a test can look at it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__({"vocab": 3, "max_len": 6, "seed": 3})
        self.engine_seed = seed
        self.engines: list[ShuffledEngine] = []

    def request_engine(self, temperature: float = 1.0) -> ShuffledEngine:
        self.engines.append(ShuffledEngine(self, temperature, seed=self.engine_seed))
        return self.engines[-1]


class CountingReward(ToyReward):
    def __init__(self) -> None:
        super().__init__({"seed": 1, "scale": 2.0})
        self.calls: list[int] = []

    def score(self, prompts: list[Any], completions: list[str]) -> Any:
        self.calls.append(len(completions))
        return super().score(prompts, completions)


def make(gen: Any, reward: Any = None, n: int = 12, batch_size: int = 64) -> tuple[RunContext, list[Chain]]:
    ctx = RunContext(generator=gen, reward=reward or ToyReward({"seed": 1, "scale": 2.0}), seed=5, beta=0.5,
                     max_new_tokens=6, temperature=1.0, batch_size=batch_size)
    return ctx, [Chain(idx=j, prompt_id=f"p{j}", prompt_ids=[1], messages=[]) for j in range(n)]


def run(method: str, gen: Any, schedule: str, steps: int = 9, reward: Any = None, chains: list[Chain] | None = None,
        **kw: Any) -> dict[tuple[int, int], dict]:
    ctx, fresh = make(gen, reward)
    out: dict[tuple[int, int], dict] = {}
    drive(METHODS.get(method)({}), ctx, chains if chains is not None else fresh, steps, out.update,
          schedule=schedule, **kw)
    return out


@pytest.mark.parametrize("method", ["qalign", "ancestral"])
def test_scheduling_order_does_not_change_results(method):
    ref = run(method, ToyGenerator({"vocab": 3, "max_len": 6, "seed": 3}), "lockstep")
    for seed in (0, 1, 2):
        gen = Continuous(seed)
        got = run(method, gen, "async", in_flight=7, rm_batch=3)
        assert got == ref
        assert gen.engines and gen.engines[0].stats.finished == len(ref)
    assert len(ref) == 12 * 9


def test_commits_keep_each_chain_in_step_order():
    """Independent samples finish out of order; a chain's outputs are still committed 0, 1, 2, ..."""
    ctx, chains = make(Continuous(4))
    seen: dict[int, list[int]] = {}

    def commit(group: dict[tuple[int, int], dict]) -> None:
        for idx, k in sorted(group):
            seen.setdefault(idx, []).append(k)

    drive(METHODS.get("ancestral")({}), ctx, chains, 10, commit, schedule="async", in_flight=25, rm_batch=4)
    assert seen == {j: list(range(10)) for j in range(12)}


def test_in_flight_is_bounded():
    gen = Continuous(1)
    run("ancestral", gen, "async", steps=10, in_flight=5, rm_batch=2)
    assert gen.engines[0].max_seen == 5  # filled up to the bound, never past it
    chains_gen = Continuous(1)
    run("qalign", chains_gen, "async", steps=6)
    assert chains_gen.engines[0].max_seen == 12  # one request per live chain


def test_rm_scores_micro_batches():
    reward = CountingReward()
    out = run("qalign", Continuous(2), "async", steps=8, reward=reward, in_flight=12, rm_batch=4)
    assert sum(reward.calls) == len(out) == 12 * 8
    # not one RM call per output, and none larger than what was in flight
    assert len(reward.calls) < len(out) / 2 and max(reward.calls) <= 12
    # a call below the micro-batch only happens when nothing else could finish first
    assert np.mean(np.array(reward.calls) >= 4) > 0.5


def test_chains_resume_from_their_own_states():
    """After an asynchronous run was cut, chains stand at different steps; each continues from its own."""
    ref = run("qalign", ToyGenerator({"vocab": 3, "max_len": 6, "seed": 3}), "lockstep", steps=8)
    for schedule in ("async", "lockstep"):
        _, chains = make(Continuous(3))
        for c in chains:
            c.done = c.idx % 5  # chain j has outputs 0..j%5-1 stored
            c.last = ref[(c.idx, c.done - 1)] if c.done else None
        got = run("qalign", Continuous(3), schedule, steps=8, chains=chains)
        assert got == {key: v for key, v in ref.items() if key[1] >= key[0] % 5}


def test_schedule_errors():
    cards = METHODS.get("cards")({})
    with pytest.raises(ConfigError, match="schedule=async needs"):
        resolve_schedule("async", cards, 4)
    with pytest.raises(ConfigError, match="allowed: auto, lockstep, async"):
        resolve_schedule("fast", cards, 4)
    assert resolve_schedule("auto", cards, 4).mode == "lockstep"
    assert resolve_schedule("auto", METHODS.get("qalign")({}), 4).mode == "async"


def test_batched_engine_runs_chunks_of_batch_size():
    gen = ToyGenerator({"vocab": 3, "max_len": 6, "seed": 3})
    eng = BatchedEngine(gen, batch_size=4)
    from qalign_repro.lm.engine import Request

    for j in range(10):
        eng.submit(Request(key=j, prompt_ids=[1], max_tokens=6, seed=j))
    sizes = []
    while eng.in_flight():
        sizes.append(len(eng.wait()))
    assert sizes == [4, 4, 2] and eng.wait() == []


@pytest.mark.parametrize(("override", "match"), [
    ("schedule=fast", "schedule='fast' is not a known option"),
    ("in_flight=0", "in_flight"),
    ("rm_batch=-2", "rm_batch"),
])
def test_bad_schedule_settings_are_one_line_errors(tmp_path, override, match):
    from _helpers import TOY

    from qalign_repro.cli import compose_config
    from qalign_repro.config import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose_config([*TOY, f"output_root={tmp_path}", override]))


def test_async_with_a_batched_only_method_is_refused_before_work(tmp_path):
    from _helpers import TOY

    from qalign_repro.cli import compose_config
    from qalign_repro.config import validate

    with pytest.raises(ConfigError, match="schedule=async needs a method"):
        validate(compose_config([*TOY, f"output_root={tmp_path}", "method=cards", "schedule=async"]))
    assert not (tmp_path / "runs").exists()
