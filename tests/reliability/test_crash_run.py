"""Crash consistency of ``run``: SIGKILL a seeded toy QAlign run and an ancestral run at many random points
(inside/around step commits, inside other storage transactions, during generation and RM calls, at random
times), resume after each kill, and check at every intermediate point that the store passes fsck, holds whole
steps only and is a prefix of an uninterrupted run's data; at the end the data equal it byte for byte.
"""

from __future__ import annotations

import pytest
from crashkit import assert_same_as_reference, campaign, toy_config

SLOW = 0.02  # seconds added to each generator / RM call so that phase kills land inside them


@pytest.mark.parametrize(("method", "steps", "kills", "seed"), [("qalign", 14, 12, 11), ("ancestral", 12, 10, 7)])
def test_kill_anywhere_then_resume_equals_uninterrupted(tmp_path, preloaded, board, method, steps, kills, seed):
    args = [f"method={method}", "dataset.n=4", f"steps={steps}", f"seed={seed}", "schedule=lockstep"]
    record, final, reference = campaign(
        toy_config(tmp_path / "root", *args), toy_config(tmp_path / "reference", *args), steps=steps,
        target_kills=kills, seed=seed, board=board, logdir=tmp_path, slow=SLOW, phase_delay=0.9 * SLOW)
    print(f"{method}: {record.kills} kills survived ({record.phases()}): {record.summary()}")
    assert record.kills >= kills
    phases = record.phases()
    # kills landed inside generation and RM calls and inside transactions, not only around step commits
    assert any(k.endswith(":generate") for k in phases) and any(k.endswith(":reward") for k in phases), phases
    assert phases.get("hook", 0) >= 3 and phases.get("tx", 0) >= 1, phases
    assert_same_as_reference(final, reference)


@pytest.mark.parametrize(("method", "extra"), [("qalign", "rm_batch=2"), ("ancestral", "in_flight=6")])
def test_kill_anywhere_in_an_asynchronous_run_then_resume_equals_uninterrupted(tmp_path, preloaded, board, method,
                                                                               extra):
    """Chains that advance on their own / samples submitted in bulk (requests finishing out of order, commits
    of a few chains at a time): a kill leaves chains at different steps; resuming continues each from its own
    state, and the final store equals an uninterrupted lock-step run's byte for byte."""
    base = [f"method={method}", "dataset.n=6", "steps=12", "seed=5"]
    args = [*base, "schedule=async", "backend.continuous=true", extra]
    record, final, reference = campaign(
        toy_config(tmp_path / "root", *args), toy_config(tmp_path / "reference", *base, "schedule=lockstep"),
        steps=12, target_kills=8, seed=3, board=board, logdir=tmp_path, slow=SLOW, phase_delay=0.9 * SLOW,
        whole_steps=False)
    print(f"async {method}: {record.kills} kills survived ({record.phases()}): {record.summary()}")
    assert record.kills >= 8
    # the schedule is in the stored config (it is not part of the run's identity); all else is the same
    for store in (final, reference):
        for key in ("schedule", "in_flight", "rm_batch"):
            store["meta"]["config"].pop(key)
        store["meta"]["config"]["backend"].pop("continuous")
    assert_same_as_reference(final, reference)
