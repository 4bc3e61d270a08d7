"""Runs are resumable: a SIGKILL at any point of a step loses at most that step, and the rerun ends with
exactly the data of an uninterrupted run with the same seed."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from _helpers import run_module

from qalign_repro.store.storage import RunStore, list_runs


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


# test-fast kills at one point (inside a commit); the full suite at all four
@pytest.mark.parametrize("point", [pytest.param(p, marks=pytest.mark.slow) if p != "in_commit:2" else p
                                   for p in ("before_commit:0", "in_commit:2", "after_commit:3", "in_commit:5")])
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


def test_other_weights_behind_the_same_path_are_refused(tmp_path):
    """Replacing the weights in a model folder keeps the run name (it hashes the config, not the weights): a
    finished run must not answer "nothing to do" for them, nor a resumed one mix two models."""
    import shutil

    from qalign_repro.cli import compose_config
    from qalign_repro.errors import StorageError
    from qalign_repro.models.tiny import assets_dir
    from qalign_repro.stages.run import execute

    rm_dir = tmp_path / "rm"
    shutil.copytree(assets_dir("tiny-rm"), rm_dir)
    cfg = compose_config([f"reward.path={rm_dir}", f"output_root={tmp_path / 'out'}", "dataset.n=2", "steps=2",
                          "max_new_tokens=24", "progress=false", "method=ancestral"])
    store = execute(cfg)
    assert set(store.meta["weights"]) == {"model", "reward"} and store.meta["weights"]["reward"]
    assert execute(cfg).steps_done() == 2  # same weights: nothing to do
    weights = rm_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"other weights behind reward.path .*allowed: the same weights"):
        execute(cfg)
