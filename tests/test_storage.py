"""The durable expkit storage: expkit's own contract, atomic steps, locking, safe names."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
from expkit import Exp
from expkit.storage import MemoryStorage
from expkit.storage.base import invariant_assert
from expkit.storage.base import test_generic_storage as expkit_storage_contract

from qalign_repro.errors import StorageError
from qalign_repro.store.storage import RunStore, SQLiteStorage, check_run_name


def test_expkit_generic_contract_matches_memory_storage(tmp_path):
    ours = expkit_storage_contract(SQLiteStorage(tmp_path, mode="rw"))
    memory = expkit_storage_contract(MemoryStorage(mode="rw"))
    # MemoryStorage hands out its live dict, so its first read shows a later write; ours returns a snapshot
    assert ours[0] == {"name": "test1"} and memory[0] == {"name": "test1", "time": "now"}
    invariant_assert(ours[1:], memory[1:])


def test_exp_instances_and_evals_roundtrip(tmp_path):
    storage = SQLiteStorage(tmp_path, mode="rw")
    exp = Exp(name="e1", meta={"a": 1}, storage=storage)
    exp.add_instance({"q": "x"}, [{"y": 1}, {"y": 2}])
    exp.add_instance({"q": "z"}, [{"y": 3}])
    exp.add_eval("acc", [{"v": 0.5}])
    again = Exp.load(storage=SQLiteStorage(tmp_path, mode="r"), name="e1")
    assert again.meta == {"a": 1}
    assert again.instances() == [{"input": {"q": "x"}, "outputs": [{"y": 1}, {"y": 2}]},
                                 {"input": {"q": "z"}, "outputs": [{"y": 3}]}]
    assert again.get_eval("acc") == [{"v": 0.5}]


def test_commit_step_is_atomic(tmp_path):
    store = RunStore(tmp_path, "r1", create=True, meta={"m": 1})
    store.add_instances([{"id": "a"}, {"id": "b"}])
    store.commit_step(0, {0: {"v": 0}, 1: {"v": 0}})
    # a step whose second row cannot be stored (NaN is not JSON) must leave no trace of the first row
    with pytest.raises(ValueError):
        store.commit_step(1, {0: {"v": 1}, 1: {"v": float("nan")}})
    assert store.step_counts() == {0: 1, 1: 1}
    assert store.steps_done() == 1
    assert store.last_outputs() == {0: {"v": 0}, 1: {"v": 0}}


def test_values_are_json_not_pickle(tmp_path):
    store = RunStore(tmp_path, "r1", create=True, meta={"m": 1})
    store.add_instances([{"id": "a"}])
    store.commit_step(0, {0: {"text": "é"}})
    conn = store.storage._conn("r1")
    (raw,) = conn.execute("SELECT value FROM outputs").fetchone()
    assert json.loads(raw) == {"text": "é"}


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 300, "a\\b", "..", "a..b"])
def test_run_names_cannot_escape(bad):
    with pytest.raises(StorageError, match="invalid run name"):
        check_run_name(bad)


def test_missing_run_lists_existing(tmp_path):
    RunStore(tmp_path, "present", create=True, meta={})
    with pytest.raises(StorageError, match="existing runs: present"):
        RunStore(tmp_path, "absent")


def _hold_lock(root, ready, release):
    store = RunStore(root, "r1")
    with store.lock():
        ready.set()
        release.wait(30)


def test_second_writer_is_refused_and_stale_lock_is_freed(tmp_path):
    RunStore(tmp_path, "r1", create=True, meta={})
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    assert ready.wait(30)
    with pytest.raises(StorageError, match=r"already being written by pid \d+ on host"):
        RunStore(tmp_path, "r1").lock().acquire()
    proc.kill()  # SIGKILL: the kernel releases the flock, the lock file stays behind
    proc.join()
    assert (tmp_path / "runs" / "r1" / "run.lock").exists()
    with RunStore(tmp_path, "r1").lock():
        pass


def test_corrupted_store_gives_clear_error(tmp_path):
    RunStore(tmp_path, "r1", create=True, meta={})
    (tmp_path / "runs" / "r1" / "exp.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "runs" / "r1" / f"exp.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(StorageError, match="not a readable run database"):
        RunStore(tmp_path, "r1")


# -- row checksums -----------------------------------------------------------------------------------------------
def _rows_without_crc(store: RunStore) -> int:
    conn = store.storage._conn(store.name)
    return sum(conn.execute(f"SELECT count(*) FROM {t} WHERE crc IS NULL").fetchone()[0]
               for t in ("fields", "instances", "outputs"))


def test_every_write_path_stores_a_checksum_and_an_edit_is_named(tmp_path):
    from qalign_repro.store.storage import checksum_failures

    store = RunStore(tmp_path, "r1", create=True, meta={"m": 1})
    store.add_instances([{"id": "a"}, {"id": "b"}])
    store.commit_step(0, {0: {"text": "12"}, 1: {"text": "34"}})
    store.commit_outputs({(0, 1): {"text": "56"}, (1, 1): {"text": "78"}, (0, 2): {"text": "90"}})
    store.update_meta(status="running")
    store.write_eval("grades", [{"id": "a"}, {"id": "b"}])
    store.storage.write_subfield("r1", "extra", "k", 1)
    store.exp.add_instance({"id": "c"}, [{"text": "x"}])  # expkit's own append path
    conn = store.storage._conn("r1")
    assert _rows_without_crc(store) == 0 and checksum_failures(conn) == ([], 0)
    store.verify()
    # one digit of a stored text: the JSON stays valid, only the checksum sees it
    conn.execute("UPDATE outputs SET value=? WHERE idx=1 AND step=1", (json.dumps({"text": "79"}),))
    # a state moved to another step keeps its text but not its key
    (other,) = conn.execute("SELECT value FROM outputs WHERE idx=0 AND step=1").fetchone()
    conn.execute("UPDATE outputs SET value=? WHERE idx=0 AND step=2", (other,))
    assert checksum_failures(conn)[0] == [("outputs", (0, 2)), ("outputs", (1, 1))]
    with pytest.raises(StorageError) as exc:
        store.verify()
    msg = str(exc.value)
    assert "run 'r1'" in msg and "output of instance 0 at step 2, output of instance 1 at step 1" in msg
    assert "python -m qalign_repro.fsck" in msg and "--repair" in msg and "\n" not in msg


_OLD_SCHEMA = """
CREATE TABLE fields (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE instances (idx INTEGER PRIMARY KEY, input TEXT NOT NULL);
CREATE TABLE outputs (idx INTEGER NOT NULL, step INTEGER NOT NULL, value TEXT NOT NULL, PRIMARY KEY (idx, step));
"""


def test_legacy_store_without_checksums_is_readable_then_migrated(tmp_path):
    import sqlite3

    from qalign_repro.store.fsck import inspect_store
    from qalign_repro.store.storage import checksum_failures, has_checksums

    db = tmp_path / "runs" / "old" / "exp.sqlite"
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.executescript(_OLD_SCHEMA)
    conn.execute("INSERT INTO fields VALUES ('meta', ?)", (json.dumps({"status": "done"}),))
    conn.execute("INSERT INTO instances VALUES (0, ?)", (json.dumps({"id": "a"}),))
    conn.execute("INSERT INTO outputs VALUES (0, 0, ?)", (json.dumps({"text": "1"}),))
    conn.commit()
    conn.close()

    old = RunStore(tmp_path, "old", readonly=True)
    assert [i["outputs"] for i in old.iter_instances()] == [[{"text": "1"}]]
    assert checksum_failures(old.storage._conn("old")) == ([], 3)  # unchecked, not damaged
    old.verify()
    old.close()

    rep = inspect_store(tmp_path, "old")
    assert not any(p.code == "checksum" for p in rep.problems)
    assert rep.unchecked == 3 and any("legacy" in n for n in rep.notes)

    store = RunStore(tmp_path, "old")  # writable open: ALTER TABLE, old rows stay NULL
    conn = store.storage._conn("old")
    assert all(has_checksums(conn, t) for t in ("fields", "instances", "outputs"))
    store.commit_step(1, {0: {"text": "2"}})
    store.update_meta(status="running")
    assert checksum_failures(conn) == ([], 2)  # the old instance and output; meta was rewritten with its crc
    assert store.meta == {"status": "running"} and [o["text"] for o in store.last_outputs().values()] == ["2"]
