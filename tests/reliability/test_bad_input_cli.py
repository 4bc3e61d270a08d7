"""Bad input through the real command line (what a user sees): exit 2, exactly one ``error:`` line on stderr,
no traceback, stored data untouched. The in-process catalogue (test_bad_input.py) covers the messages; these
cover the paths only the CLI has (Hydra's own output folder, the entry point's error formatting)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _helpers import REPO, run_module
from badkit import assert_unchanged, snapshot, toy
from crashkit import dump_store, run_names

NAN_RM = '''\
import numpy as np
from qalign_repro.rm.toy import ToyReward

_score = ToyReward.score


def score(self, prompts, completions):  # a reward model that overflows: NaN for everything
    res = _score(self, prompts, completions)
    res.rewards = np.full(len(completions), float("nan"))
    return res


ToyReward.score = score
from qalign_repro.stages.run import main  # noqa: E402

main()
'''


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.returncode == 2
    return lines[0]


def test_rm_nan_via_cli_is_one_line_and_stores_nothing(tmp_path):
    script = tmp_path / "nan_rm_run.py"
    script.write_text(NAN_RM)
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, str(script), *toy(root, "method=qalign", "dataset.n=2", "steps=3")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    (name,) = run_names(root)
    assert dump_store(root, name)["outputs"] == []  # holds today: the step is never committed
    line = one_error_line(proc)
    assert "reward model returned nan" in line and "nothing was stored" in line


def test_output_root_not_writable_via_cli(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_module("run", *toy(blocker / "sub", "dataset.n=2", "steps=2"), check=False)
    assert blocker.read_text() == "x"
    line = one_error_line(proc)
    assert "not writable" in line and str(blocker) in line


def test_corrupted_store_via_cli(tmp_path):
    root = tmp_path / "root"
    run_module("run", *toy(root, "dataset.n=2", "steps=2"))
    (name,) = run_names(root)
    db = root / "runs" / name / "exp.sqlite"
    for side in ("exp.sqlite-wal", "exp.sqlite-shm"):
        (db.parent / side).unlink(missing_ok=True)
    db.write_bytes(b"\x00garbage" * 512)
    proc = run_module("run", *toy(root, "dataset.n=2", "steps=2"), check=False)
    line = one_error_line(proc)
    assert f"store '{db}' is not a readable run database" in line
    assert db.read_bytes() == b"\x00garbage" * 512


def test_run_name_traversal_via_cli_creates_nothing(tmp_path):
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    before = snapshot(tmp_path)
    proc = run_module("run", *toy(root, "dataset.n=2", "steps=2", "run_name=../../escaped"), check=False)
    line = one_error_line(proc)
    assert "invalid run name '../../escaped'" in line
    assert_unchanged(tmp_path, before)
    assert not any(Path(tmp_path).rglob("escaped*"))
