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
from qalign_repro.storage import RunStore, SQLiteStorage, check_run_name


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
