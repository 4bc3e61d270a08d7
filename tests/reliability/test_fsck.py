"""``qalign_repro.store.fsck``: finds each kind of inconsistency, never modifies a store when checking, and
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
from qalign_repro.store.fsck import check_store, inspect_store, main, repair_store
from qalign_repro.store.storage import CHECKED_TABLES, RunStore, row_checksum

ARGS = ["method=qalign", "dataset.n=3", "steps=5", "seed=8"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, preloaded) -> Path:
    """A finished and evaluated toy QAlign run (3 prompts x 5 steps)."""
    from qalign_repro.stages.evaluate import evaluate_run
    from qalign_repro.stages.run import execute

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


def reseal(root: Path, name: str) -> None:
    """Give every row the checksum of what it now holds: damage made this way stands for a writer bug (bad data
    stored with a valid checksum), which only fsck's own checks can find; the tamper tests skip this."""
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    for table, (column, keys) in CHECKED_TABLES.items():
        for row in conn.execute(f"SELECT rowid, {', '.join(keys)}, {column} FROM {table}").fetchall():
            conn.execute(f"UPDATE {table} SET crc=? WHERE rowid=?",
                         (row_checksum(table, tuple(row[1:-1]), row[-1]), row[0]))
    conn.close()


def sql(root: Path, name: str, *statements: str, params: tuple = (), sealed: bool = True) -> None:
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    for st in statements:
        conn.execute(st, params if "?" in st else ())
    conn.close()
    if sealed:
        reseal(root, name)


def edit_output(root: Path, name: str, idx: int, step: int, fn: Callable[[dict], None], raw: str | None = None,
                sealed: bool = True) -> None:
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    (value,) = conn.execute("SELECT value FROM outputs WHERE idx=? AND step=?", (idx, step)).fetchone()
    out = json.loads(value)
    fn(out)
    conn.execute("UPDATE outputs SET value=? WHERE idx=? AND step=?", (raw or json.dumps(out), idx, step))
    conn.close()
    if sealed:
        reseal(root, name)


def edit_meta(root: Path, name: str, fn: Callable[[dict], None]) -> None:
    conn = sqlite3.connect(root / "runs" / name / "exp.sqlite", isolation_level=None)
    meta = json.loads(conn.execute("SELECT value FROM fields WHERE name='meta'").fetchone()[0])
    fn(meta)
    conn.execute("UPDATE fields SET value=? WHERE name='meta'", (json.dumps(meta),))
    conn.close()
    reseal(root, name)


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
    ("orphan-output", lambda r, n: sql(r, n, "INSERT INTO outputs(idx, step, value) VALUES (7, 0, '{}')"), "orphan",
     None),
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
    reseal(root, name)


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
    from qalign_repro.stages.run import execute

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


# -- tampering that keeps the JSON valid (issue 16, item 10) -----------------------------------------------------
def _outputs(root: Path, name: str) -> dict[tuple[int, int], dict]:
    return {(i, s): json.loads(v) for i, s, v in dump_store(root, name)["outputs"]}


def _accepted_move(root: Path, name: str, min_index: int) -> tuple[int, int, dict, dict]:
    """(idx, step, previous state, state) of the first accepted QAlign move that kept ``min_index`` tokens."""
    outs = _outputs(root, name)
    for (i, s), out in sorted(outs.items()):
        if s and out["accepted"] and out["index"] >= min_index and out["completion_ids"][out["index"]:] != [0]:
            return i, s, outs[(i, s - 1)], out
    raise AssertionError("the toy run has no such accepted move; pick another seed in ARGS")


def _row_problems(root: Path, name: str) -> list:
    """The problems of single rows; the only others a damaged step may bring: evals that no longer align."""
    problems = check_store(root, name)
    assert {p.code for p in problems if p.instance is None} <= {"eval"}, problems
    return [p for p in problems if p.instance is not None]


def _flip(token: int) -> int:
    return {1: 2, 2: 1}.get(token, 1)  # toy tokens: 0 = EOS, 1 = "a", 2 = "b"


def _assert_damaged_everywhere(root: Path, name: str, idx: int, step: int, capsys) -> None:
    """fsck names the row; run refuses to call the run complete; evaluate names the store and the way out."""
    from qalign_repro.stages.evaluate import evaluate_run
    from qalign_repro.stages.run import execute

    problems = _row_problems(root, name)
    assert [(p.code, p.instance, p.step) for p in problems] == [("checksum", idx, step)], problems
    assert main([str(root / "runs" / name)]) == 1
    assert f"[checksum] instance {idx}, step {step}: output fails its checksum" in capsys.readouterr().out
    with pytest.raises(StorageError) as exc:
        execute(toy_config(root, *ARGS))
    assert f"output of instance {idx} at step {step} fails its checksum" in str(exc.value)
    assert "complete" not in capsys.readouterr().out
    with pytest.raises(StorageError) as exc:
        evaluate_run(str(root), name)
    assert f"run {name!r}" in str(exc.value) and "fsck" in str(exc.value) and "--repair" in str(exc.value)


def test_one_changed_character_of_a_text_is_found_and_the_run_is_not_complete(store, capsys):
    from qalign_repro.stages.run import execute

    root, name = store
    execute(toy_config(root, *ARGS))
    assert "complete" in capsys.readouterr().out  # the undamaged copy is complete
    (idx, step), out = next((k, o) for k, o in sorted(_outputs(root, name).items()) if k[1] and o["text"])
    text = out["text"]
    edit_output(root, name, idx, step, _set("text", text[:-1] + {"a": "b", "b": "a"}[text[-1]]), sealed=False)
    _assert_damaged_everywhere(root, name, idx, step, capsys)
    assert main([str(root / "runs" / name), "--repair"]) == 0  # the damaged step and everything after it go
    assert check_store(root, name) == [] and inspect_store(root, name).consistent_steps == step


def test_one_changed_token_of_an_accepted_state_is_found_with_or_without_its_checksum(store, capsys):
    root, name = store
    idx, step, _, out = _accepted_move(root, name, 0)
    ids = list(out["completion_ids"])
    j = next(j for j in range(out["index"], len(ids)) if ids[j] != 0)  # a resampled token, not the EOS
    ids[j] = _flip(ids[j])
    edit_output(root, name, idx, step, _set("completion_ids", ids), sealed=False)
    _assert_damaged_everywhere(root, name, idx, step, capsys)
    reseal(root, name)  # the same edit with a valid checksum (a writer bug): the tokenizer check finds it
    (p,) = _row_problems(root, name)
    assert (p.code, p.instance, p.step) == ("text", idx, step) and "decode(completion_ids)" in p.message


def test_accepted_state_that_does_not_keep_the_prefix_breaks_the_qalign_invariant(store):
    from qalign_repro.lm.toy import ToyGenerator

    root, name = store
    idx, step, prev, out = _accepted_move(root, name, 1)
    ids = list(out["completion_ids"])
    ids[0] = _flip(prev["completion_ids"][0])  # y[:index] no longer the previous state's
    text = ToyGenerator({"vocab": 3}).decode(ids)  # and the text still matches its ids
    edit_output(root, name, idx, step, lambda o: o.update(completion_ids=ids, text=text))
    (p,) = _row_problems(root, name)
    assert (p.code, p.instance, p.step) == ("record", idx, step)
    assert "does not share y[:index]" in p.message


def test_fsck_uses_the_methods_own_transition_check():
    from qalign_repro.methods.ancestral import Ancestral
    from qalign_repro.methods.qalign import transition_errors
    from qalign_repro.store.fsck import transition_hook

    assert transition_hook("qalign") is transition_errors
    assert transition_hook("ancestral") is Ancestral.transition_errors  # each sample checked on its own
    assert transition_hook("cards") is None and transition_hook("no-such-method") is None  # declares none
    prev = {"completion_ids": [5, 6, 7, 0], "text": "567", "reward": 0.5}
    good = {"completion_ids": [5, 6, 9, 0], "text": "569", "reward": 0.7, "proposal_reward": 0.7, "accepted": True,
            "index": 2, "proposal_len": 4, "tokens_generated": 2}
    assert transition_errors(prev, good) == []
    assert transition_errors(prev, {**good, "completion_ids": [5, 8, 9, 0]}) == [
        "accepted state does not share y[:index] (index=2) with the previous state (first difference at token 1)"]
    rejected = {**good, "accepted": False, "completion_ids": prev["completion_ids"], "text": "567", "reward": 0.5}
    assert transition_errors(prev, rejected) == []
    assert transition_errors(prev, {**rejected, "text": "568"}) == ["rejected step does not repeat the previous state"]
    assert transition_errors(None, {**good, "index": 0, "proposal_len": 4}) == []
    assert transition_errors(None, good) == ["state 0 (an ancestral sample) must have accepted=true and index=0"]


def test_legacy_store_without_checksums_is_checked_and_says_so(store, capsys):
    root, name = store
    sql(root, name, *(f"ALTER TABLE {t} DROP COLUMN crc" for t in CHECKED_TABLES), sealed=False)
    rep = inspect_store(root, name)
    assert rep.ok and rep.unchecked == len(dump_store(root, name)["outputs"]) + 3 + 1 + len(rep.evals)
    assert main([str(root / "runs" / name)]) == 0
    out = capsys.readouterr().out
    assert "ok (3 instances x 5 steps" in out and "unchecked: a legacy store" in out
    edit_output(root, name, 1, 2, _set("reward", 99.0), sealed=False)  # unchecked rows: the other checks still run
    assert "record" in {p.code for p in check_store(root, name)}
