"""Runs are resumable: a SIGKILL at any point of a step loses at most that step, and the rerun ends with
exactly the data of an uninterrupted run with the same seed."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from _helpers import run_module

from qalign_repro.storage import RunStore, list_runs


def stored_data(root: Path) -> list:
    (name,) = list_runs(root)
    return list(RunStore(root, name, readonly=True).iter_instances())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    run_module("run", *_args(root, "qalign"))
    return stored_data(root)


def _args(root: Path, method: str, steps: int = 6) -> list[str]:
    return ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false", "dataset.n=5",
            f"steps={steps}", f"method={method}", f"output_root={root}"]


@pytest.mark.parametrize("point", ["before_commit:0", "in_commit:2", "after_commit:3", "in_commit:5"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, reference, point):
    killed = run_module("run", *_args(tmp_path, "qalign"), env={"QALIGN_KILL_AT": point}, check=False)
    assert killed.returncode == -signal.SIGKILL
    step = int(point.split(":")[1])
    (name,) = list_runs(tmp_path)
    expected_done = step + 1 if point.startswith("after") else step
    assert RunStore(tmp_path, name, readonly=True).steps_done() == expected_done
    run_module("run", *_args(tmp_path, "qalign"))
    assert stored_data(tmp_path) == reference


def test_rerun_of_finished_run_does_nothing(tmp_path):
    run_module("run", *_args(tmp_path, "ancestral"))
    before = stored_data(tmp_path)
    proc = run_module("run", *_args(tmp_path, "ancestral"))
    assert "nothing to do" in proc.stdout
    assert stored_data(tmp_path) == before


def test_more_steps_extends_the_same_chains(tmp_path, reference):
    run_module("run", *_args(tmp_path, "qalign", steps=3))
    run_module("run", *_args(tmp_path, "qalign", steps=6))
    assert stored_data(tmp_path) == reference


def test_seed_changes_data(tmp_path, reference):
    run_module("run", *_args(tmp_path, "qalign"), "seed=1")
    assert stored_data(tmp_path) != reference
