"""``qalign_repro.fsck``: finds each kind of inconsistency, never modifies a store when checking, and
``--repair`` only truncates to the last consistent step after a backup — after which the run resumes and ends
with exactly the data of an uninterrupted run."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from badkit import copy_root
from crashkit import Fault, PhaseBoard, dump_store, run_forked, run_names, toy_config

from qalign_repro.errors import StorageError
from qalign_repro.fsck import check_store, inspect_store, main, repair_store
from qalign_repro.storage import RunStore

ARGS = ["method=qalign", "dataset.n=3", "steps=5", "seed=8"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, preloaded) -> Path:
    """A finished and evaluated toy QAlign run (3 prompts x 5 steps)."""
    from qalign_repro.evaluate import evaluate_run
    from qalign_repro.run import execute

    root = tmp_path_factory.mktemp("fsck") / "root"
    cfg = toy_config(root, *ARGS)

    def run_and_grade():
        store = execute(cfg)
        evaluate_run(str(root), store.name)

    assert run_forked(run_and_grade, Fault(), board=PhaseBoard(), log=root.parent / "log").returncode == 0
    return root


@pytest.fixture()
def store(finished, tmp_path) -> tuple[Path, str]:
    root = copy_root(finished, tmp_path / "root")
    return root, run_names(root)[0]


def sql(root: Path, name: str, *statements: str, params: tuple = ()) -> None:
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    for st in statements:
        conn.execute(st, params if "?" in st else ())
    conn.close()


def edit_output(root: Path, name: str, idx: int, step: int, fn: Callable[[dict], None], raw: str | None = None
                ) -> None:
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    (value,) = conn.execute("SELECT value FROM outputs WHERE idx=? AND step=?", (idx, step)).fetchone()
    out = json.loads(value)
    fn(out)
    conn.execute("UPDATE outputs SET value=? WHERE idx=? AND step=?", (raw or json.dumps(out), idx, step))
    conn.close()


def edit_meta(root: Path, name: str, fn: Callable[[dict], None]) -> None:
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    meta = json.loads(conn.execute("SELECT value FROM fields WHERE name='meta'").fetchone()[0])
    fn(meta)
    conn.execute("UPDATE fields SET value=? WHERE name='meta'", (json.dumps(meta),))
    conn.close()


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(key, value)


def _reject_with_other_state(out: dict) -> None:
    out["accepted"] = False
    out["completion_ids"] = [*out["completion_ids"], 1]


def test_clean_store_passes_and_checking_writes_nothing(store, capsys):
    root, name = store
    db = root / "runs" / name / "exp.sqlite"
    files = {p.name: p.read_bytes() for p in db.parent.glob("exp.sqlite*") if not p.name.endswith("-shm")}
    assert check_store(root, name) == []
    assert main([str(db.parent)]) == 0
    assert "ok (3 instances x 5 steps, evals: 1)" in capsys.readouterr().out
    assert main([name, "--root", str(root)]) == 0 and main([str(db)]) == 0  # name + root, or the file
    assert {p.name: p.read_bytes() for p in db.parent.glob("exp.sqlite*") if not p.name.endswith("-shm")} == files
    assert not list(db.parent.glob("*.bak-*"))


# (id, damage, problem code, truncation point or None when truncation cannot fix it)
DAMAGE = [
    ("step-gap", lambda r, n: sql(r, n, "DELETE FROM outputs WHERE idx=1 AND step=2"), "step-gap", 2),
    ("partial-step", lambda r, n: sql(r, n, "DELETE FROM outputs WHERE idx=0 AND step=4"), "partial-step", 4),
    ("nan-reward", lambda r, n: _nan_reward(r, n, 2, 3), "record", 3),
    ("cached-above-prefilled", lambda r, n: edit_output(r, n, 0, 2, _set("tokens_cached", 10**6)), "record", 2),
    ("negative-count", lambda r, n: edit_output(r, n, 1, 1, _set("tokens_generated", -1)), "record", 1),
    ("generated-above-proposal", lambda r, n: edit_output(r, n, 1, 3, _set("tokens_generated", 99)), "record", 3),
    ("longer-than-max-new", lambda r, n: edit_output(r, n, 0, 0, _set("completion_ids", [1] * 9)), "record", 0),
    ("empty-completion", lambda r, n: edit_output(r, n, 2, 1, _set("completion_ids", [])), "record", 1),
    ("rejected-not-repeating", lambda r, n: edit_output(r, n, 1, 2, _reject_with_other_state), "record", 2),
    ("invalid-json", lambda r, n: edit_output(r, n, 0, 3, lambda o: None, raw="{not json"), "record", 3),
    ("eval-misaligned", lambda r, n: sql(r, n, "UPDATE fields SET value='[]' WHERE name='eval_grades'"), "eval", 5),
    ("meta-steps-ahead", lambda r, n: edit_meta(r, n, _set("steps_done", 9)), "meta-steps", 5),
    ("config-edited", lambda r, n: edit_meta(r, n, lambda m: m["config"].__setitem__("beta", 7.0)), "meta-config",
     None),
    ("hash-edited", lambda r, n: edit_meta(r, n, _set("config_hash", "00000000")), "meta-config", None),
    ("orphan-output", lambda r, n: sql(r, n, "INSERT INTO outputs VALUES (7, 0, '{}')"), "orphan", None),
    ("meta-missing", lambda r, n: sql(r, n, "DELETE FROM fields WHERE name='meta'"), "meta", None),
    ("instance-ids", lambda r, n: sql(r, n, "UPDATE instances SET input=(SELECT input FROM instances WHERE idx=0) "
                                         "WHERE idx=2"), "instances", None),
    ("not-a-database", lambda r, n: _garbage(r, n), "database", None),
]


def _nan_reward(root: Path, name: str, idx: int, step: int) -> None:
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    (value,) = conn.execute("SELECT value FROM outputs WHERE idx=? AND step=?", (idx, step)).fetchone()
    out = json.loads(value)
    conn.execute("UPDATE outputs SET value=? WHERE idx=? AND step=?",
                 (value.replace(json.dumps(out["reward"]), "NaN"), idx, step))
    conn.close()


def _garbage(root: Path, name: str) -> None:
    db = root / "runs" / name / "exp.sqlite"
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    db.write_bytes(b"garbage!" * 1024)


@pytest.mark.parametrize(("damage", "code", "keep"), [pytest.param(d, c, k, id=i) for i, d, c, k in DAMAGE])
def test_each_inconsistency_is_found_and_only_truncation_repairs(store, capsys, damage, code, keep):
    root, name = store
    damage(root, name)
    db = root / "runs" / name / "exp.sqlite"
    damaged = db.read_bytes()
    problems = check_store(root, name)
    assert code in {p.code for p in problems}, problems
    assert main([str(db.parent)]) == 1
    out = capsys.readouterr().out
    assert f"[{code}]" in out and "problem(s)" in out
    assert db.read_bytes() == damaged  # checking changes nothing
    if keep is None:  # truncation cannot fix it: repair refuses and touches nothing
        assert main([str(db.parent), "--repair"]) == 1
        assert "not repaired" in capsys.readouterr().out
        assert db.read_bytes() == damaged and not list(db.parent.glob("*.bak-*"))
        return
    before = dump_store(root, name)
    assert main([str(db.parent), "--repair"]) == 0
    assert f"truncated to {keep} steps" in capsys.readouterr().out
    (backup,) = db.parent.glob("exp.sqlite.bak-*")
    assert _dump_file(backup) == _strip(before)  # the backup is the store as it was
    after = dump_store(root, name)
    assert check_store(root, name) == []
    assert after["outputs"] == [r for r in before["outputs"] if r[1] < keep]  # only truncated
    assert after["instances"] == before["instances"]
    assert after["meta"]["steps_done"] <= keep and after["meta"]["repaired"]["truncated_to_steps"] == keep


def _strip(dump: dict) -> dict:
    return {k: dump[k] for k in ("instances", "outputs")} | {"meta": dump["meta"]}


def _dump_file(path: Path) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {"meta": json.loads(conn.execute("SELECT value FROM fields WHERE name='meta'").fetchone()[0]),
                "instances": conn.execute("SELECT idx, input FROM instances ORDER BY idx").fetchall(),
                "outputs": conn.execute("SELECT idx, step, value FROM outputs ORDER BY idx, step").fetchall()}
    finally:
        conn.close()


def test_repaired_run_resumes_to_the_uninterrupted_result(store, tmp_path, board):
    """Damage step 2 of one chain, repair (truncate to 2 steps), rerun: identical to the undamaged run."""
    from qalign_repro.run import execute

    root, name = store
    original = dump_store(root, name)
    _nan_reward(root, name, 1, 2)
    rep, backup = repair_store(root, name)
    assert rep.ok and backup is not None and rep.consistent_steps == 2
    assert "eval_grades" not in dump_store(root, name)["fields"]  # 5 graded outputs no longer align: dropped
    cfg = toy_config(root, *ARGS)
    assert run_forked(lambda: execute(cfg), Fault(), board=board, log=tmp_path / "log").returncode == 0
    assert dump_store(root, name)["outputs"] == original["outputs"]
    assert dump_store(root, name)["meta"]["status"] == "done"


def _hold(root: Path, name: str, ready, release) -> None:
    with RunStore(root, name).lock():
        ready.set()
        release.wait(60)


def test_repair_refuses_while_a_writer_holds_the_lock(store, capsys):
    root, name = store
    sql(root, name, "DELETE FROM outputs WHERE idx=0 AND step=4")
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(root, name, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(StorageError, match="already being written by pid"):
            repair_store(root, name)
        assert main([str(root / "runs" / name), "--repair"]) == 2
        assert "already being written" in capsys.readouterr().err
    finally:
        release.set()
        holder.join()
    assert inspect_store(root, name).consistent_steps == 4
    assert not list((root / "runs" / name).glob("*.bak-*"))


@pytest.mark.parametrize("target", ["../escape", "a/b", "/etc", "no-such-run"])
def test_bad_targets_exit_2(tmp_path, capsys, target):
    assert main([target, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
