"""Crash consistency of the later stages: ``evaluate`` and ``predict`` killed at random points and rerun give
the same eval / the same tables as an uninterrupted pass, never touch the generated data, and never leave a
half-written eval or table behind."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from crashkit import Campaign, Fault, dump_store, file_digest, run_forked, run_names, toy_config

from qalign_repro.store.fsck import check_store

ARGS = ["method=qalign", "dataset.n=4", "steps=8", "seed=5"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, preloaded):
    """A completed toy QAlign run (made in a forked child, so this process holds no store open)."""
    from crashkit import PhaseBoard

    from qalign_repro.stages.run import execute

    root = tmp_path_factory.mktemp("finished") / "root"
    cfg = toy_config(root, *ARGS)
    ep = run_forked(lambda: execute(cfg), Fault(), board=PhaseBoard(), log=root.parent / "run.log")
    assert ep.returncode == 0, ep.log
    return root


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _evaluate(root: Path):
    from qalign_repro.stages.evaluate import evaluate_run

    (name,) = run_names(root)
    return lambda: evaluate_run(str(root), name)


def test_evaluate_killed_anywhere_gives_the_same_eval(tmp_path, finished_run, board):
    ref_root = copy_root(finished_run, tmp_path / "ref")
    assert run_forked(_evaluate(ref_root), Fault(), board=board, log=tmp_path / "ref.log").returncode == 0
    (name,) = run_names(ref_root)
    reference = dump_store(ref_root, name)["fields"]["eval_grades"]

    root = copy_root(finished_run, tmp_path / "root")
    before = dump_store(root, name)
    rng = random.Random(3)
    faults = [Fault("tx", "before", 1), Fault("phase", "grade", 2, rng.uniform(0, 0.009)),
              Fault("tx", "in", 1), Fault("time", "", 0, rng.uniform(0.0, 0.1)),
              Fault("phase", "grade", 4, rng.uniform(0, 0.009)), Fault("tx", "after", 1), Fault()]
    record = Campaign()
    for fault in faults:
        ep = run_forked(_evaluate(root), fault, board=board, log=tmp_path / "episodes.log", slow=0.01)
        record.episodes.append(ep)
        assert ep.killed or ep.returncode == 0, ep.log
        now = dump_store(root, name)
        assert check_store(root, name) == []
        # the generated data are never touched, and the eval is either absent or complete and equal
        assert (now["instances"], now["outputs"], now["meta"]) == (before["instances"], before["outputs"],
                                                                   before["meta"])
        assert now["fields"].get("eval_grades", reference) == reference, fault
    print(f"evaluate: {record.kills} kills survived: {record.summary()}")
    assert record.kills >= 5
    assert dump_store(root, name)["fields"]["eval_grades"] == reference


def _predict(root: Path):
    from qalign_repro.stages.predict import predict

    cfg = toy_config(root, *ARGS)
    return lambda: predict(cfg)


def _tables(root: Path) -> dict[str, bytes]:
    """The visible outputs of predict (hidden temp files are listed by _temp_files)."""
    return {k: v for k, v in file_digest(root).items()
            if k.endswith((".csv", ".md")) and not Path(k).name.startswith(".")}


def _temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.is_file())


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, finished_run):
    from crashkit import PhaseBoard

    root = copy_root(finished_run, tmp_path_factory.mktemp("evaluated") / "root")
    assert run_forked(_evaluate(root), Fault(), board=PhaseBoard(), log=root.parent / "eval.log").returncode == 0
    return root


def test_predict_killed_anywhere_writes_the_same_tables(tmp_path, evaluated_run, board):
    ref_root = copy_root(evaluated_run, tmp_path / "ref")
    ref = run_forked(_predict(ref_root), Fault(), board=board, log=tmp_path / "ref.log")
    assert ref.returncode == 0, ref.log
    reference = _tables(ref_root)
    assert len(reference) >= 5  # predictions.{csv,md}, diagnostics.{csv,md}, runs/<run>/predictions.csv

    root = copy_root(evaluated_run, tmp_path / "root")
    (name,) = run_names(root)
    store_before = dump_store(root, name)
    rng = random.Random(9)
    faults = [Fault("replace", "", 1), Fault("phase", "write", 2, rng.uniform(0, 0.009)), Fault("replace", "", 3),
              Fault("time", "", 0, rng.uniform(0.0, ref.seconds)), Fault("replace", "", 5),
              Fault("phase", "write", 4, rng.uniform(0, 0.009)), Fault()]
    record = Campaign()
    for fault in faults:
        ep = run_forked(_predict(root), fault, board=board, log=tmp_path / "episodes.log", slow=0.01)
        record.episodes.append(ep)
        assert ep.killed or ep.returncode == 0, ep.log
        # every table is absent or complete and equal; the store is read only
        for path, data in _tables(root).items():
            assert data == reference[path], (fault, path)
        assert dump_store(root, name) == store_before
    print(f"predict: {record.kills} kills survived: {record.summary()}")
    assert record.kills >= 5
    assert _tables(root) == reference


def test_predict_rerun_leaves_no_temp_files(tmp_path, evaluated_run, board):
    root = copy_root(evaluated_run, tmp_path / "root")
    assert run_forked(_predict(root), Fault("replace", "", 2), board=board, log=tmp_path / "p.log").killed
    assert run_forked(_predict(root), Fault(), board=board, log=tmp_path / "p.log").returncode == 0
    assert _temp_files(root) == []
