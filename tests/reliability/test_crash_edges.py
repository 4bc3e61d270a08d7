"""Kills at the edges of a run's life: while its store is being created, after its last step, while an
already finished run is being extended, and with the real tiny HF models (in a separate process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from crashkit import FINALISATION_META, Fault, dump_store, run_forked, run_names, stable_meta, toy_config

from qalign_repro.store.fsck import check_store

ARGS = ["method=qalign", "dataset.n=3", "steps=6", "seed=4"]


def _run(cfg):
    from qalign_repro.stages.run import execute

    return lambda: execute(cfg)


@pytest.fixture()
def reference(tmp_path, preloaded, board) -> dict:
    cfg = toy_config(tmp_path / "reference", *ARGS)
    assert run_forked(_run(cfg), Fault(), board=board, log=tmp_path / "ref.log").returncode == 0
    (name,) = run_names(tmp_path / "reference")
    return dump_store(tmp_path / "reference", name)


@pytest.mark.parametrize("point", ["before", "in"])
def test_store_left_by_a_kill_during_creation_is_flagged_by_fsck(tmp_path, preloaded, board, point):
    root = tmp_path / "root"
    ep = run_forked(_run(toy_config(root, *ARGS)), Fault("tx", point, 1), board=board, log=tmp_path / "log")
    assert ep.killed
    (name,) = run_names(root)
    assert [p.code for p in check_store(root, name)] == ["meta"]


def test_kill_during_store_creation_then_rerun_completes(tmp_path, reference, board):
    root = tmp_path / "root"
    cfg = toy_config(root, *ARGS)
    assert run_forked(_run(cfg), Fault("tx", "before", 1), board=board, log=tmp_path / "log").killed
    again = run_forked(_run(cfg), Fault(), board=board, log=tmp_path / "log")
    assert again.returncode == 0, again.log
    (name,) = run_names(root)
    assert dump_store(root, name)["outputs"] == reference["outputs"]


def test_kill_after_the_last_step_then_rerun_finalises_meta(tmp_path, reference, board):
    root = tmp_path / "root"
    cfg = toy_config(root, *ARGS)
    assert run_forked(_run(cfg), Fault("hook", "after_commit", 5), board=board, log=tmp_path / "log").killed
    assert run_forked(_run(cfg), Fault(), board=board, log=tmp_path / "log").returncode == 0
    (name,) = run_names(root)
    final = dump_store(root, name)
    assert final["outputs"] == reference["outputs"]  # holds today
    assert {k: final["meta"].get(k) for k in FINALISATION_META} == \
        {k: reference["meta"].get(k) for k in FINALISATION_META}


def test_kill_while_extending_a_finished_run(tmp_path, reference, board):
    """steps=3 finished, then steps=6 killed twice on the way: same data as one uninterrupted 6-step run."""
    root = tmp_path / "root"
    short = toy_config(root, *ARGS, "steps=3")
    assert run_forked(_run(short), Fault(), board=board, log=tmp_path / "log").returncode == 0
    cfg = toy_config(root, *ARGS)
    (name,) = run_names(root)
    for fault in (Fault("tx", "in", 1), Fault("hook", "in_commit", 4)):  # the 'running' meta, then step 4
        assert run_forked(_run(cfg), fault, board=board, log=tmp_path / "log").killed
        assert check_store(root, name) == []
    assert run_forked(_run(cfg), Fault(), board=board, log=tmp_path / "log").returncode == 0
    final = dump_store(root, name)
    assert final["outputs"] == reference["outputs"]
    # meta.config is the config the run was created with (steps=3); meta.steps follows the extension
    got, want = (stable_meta(d["meta"], FINALISATION_META) for d in (final, reference))
    assert got["config"].pop("steps") == 3 and want["config"].pop("steps") == 6
    assert got == want


@pytest.mark.slow
def test_kill_and_resume_with_the_real_tiny_models(tmp_path):
    """A few kills of real HF runs (QAlign and ancestral), in a process that forks after importing torch."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("hf_campaign.py")), str(tmp_path),
                           str(report)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    print(json.dumps(result, indent=1))
    assert result["qalign"]["kills"] >= 3 and result["ancestral"]["kills"] >= 1
