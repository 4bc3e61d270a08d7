"""Two processes on one run: the second is refused with the lock message (exit 2) and changes nothing; a lock
left by a killed process does not block the next run. Real ``python -m qalign_repro.<stage>`` processes: the
first is frozen with SIGSTOP while it holds the lock (no test hook needed), the others start meanwhile."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import REPO, run_module
from crashkit import TOY, dump_store, run_names

from qalign_repro.store.fsck import check_store

# long enough (fsync per step) that the first process is caught while it holds the lock
LONG = [*TOY, "method=ancestral", "dataset.n=4", "steps=60", "seed=2"]
LOCK_LINE = re.compile(r"^error: run '[^']+' is already being written by pid (\d+) on host \S+ since [\d:\- ]+; "
                       r"wait for it to finish or stop it, then rerun$")


def _start_and_freeze(root: Path) -> subprocess.Popen:
    """Start a long run and SIGSTOP it as soon as it holds the run lock."""
    proc = subprocess.Popen([sys.executable, "-m", "qalign_repro.run", *LONG, f"output_root={root}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        locks = list((root / "runs").glob("*/run.lock"))
        if locks and f"pid {proc.pid} " in locks[0].read_text():
            os.kill(proc.pid, signal.SIGSTOP)
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"the first run never held the lock: {proc.communicate()}")


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_second_writer_is_refused_and_changes_nothing(tmp_path):
    root = tmp_path / "root"
    first = _start_and_freeze(root)
    try:
        (name,) = run_names(root)
        before = dump_store(root, name)
        assert check_store(root, name) == []  # a reader sees a consistent snapshot while the writer is frozen
        second = run_module("run", *LONG, f"output_root={root}", check=False)
        assert second.returncode == 2
        m = LOCK_LINE.match(_one_line(second))
        assert m and int(m.group(1)) == first.pid, second.stderr
        evaluate = run_module("evaluate", *LONG, f"output_root={root}", check=False)
        assert evaluate.returncode == 2 and LOCK_LINE.match(_one_line(evaluate)), evaluate.stderr
        assert dump_store(root, name) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert check_store(root, name) == []
    assert len(dump_store(root, name)["outputs"]) == 4 * 60


def test_lock_of_a_killed_run_does_not_block(tmp_path):
    root = tmp_path / "root"
    first = _start_and_freeze(root)
    first.kill()  # SIGKILL while frozen with the lock held, mid-run
    first.communicate()
    (name,) = run_names(root)
    lock = root / "runs" / name / "run.lock"
    assert f"pid {first.pid} " in lock.read_text()  # the stale holder is still named in the file...
    assert check_store(root, name) == []
    t0 = time.monotonic()
    again = run_module("run", *LONG, f"output_root={root}")  # ...but does not block: no wait, no error
    assert "already being written" not in again.stderr
    assert time.monotonic() - t0 < 120
    assert check_store(root, name) == []
    assert len(dump_store(root, name)["outputs"]) == 4 * 60
