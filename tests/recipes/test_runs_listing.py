"""``python -m qalign_repro.runs``: every run with status, live progress and provenance."""

from __future__ import annotations

import socket
import subprocess
import sys

from recipes._recipe_helpers import make_toy_run

from qalign_repro.store.listing import list_table, live_status
from qalign_repro.store.storage import RunStore


def test_listing_shows_status_progress_and_provenance(tmp_path):
    done = make_toy_run(tmp_path, "experiment_name=exp_a", n=3, steps=2)
    shard = make_toy_run(tmp_path, "experiment_name=exp_a", "shard.count=2", "shard.index=1", n=3, steps=2,
                         method="ancestral")
    killed = make_toy_run(tmp_path, "experiment_name=exp_b", "seed=5", n=3, steps=2)
    store = RunStore(tmp_path, killed)
    store.update_meta(status="running", steps=4)  # as if killed after 2 of 4 steps
    (store.dir / "run.lock").write_text(f"pid 999999999 on host {socket.gethostname()} since then")
    store.close()

    table = list_table(tmp_path).set_index("run")
    assert table.loc[done, "status"] == "done" and table.loc[done, "progress"] == "2/2"
    assert table.loc[done, "method"] == "qalign" and table.loc[done, "dataset"] == "arith"
    assert table.loc[done, "model"] == "toy" and table.loc[done, "host"] == socket.gethostname()
    assert table.loc[done, "gpu"] == "cpu" and table.loc[done, "prompts"] == 3
    assert table.loc[shard, "shard"] == "1/2" and table.loc[shard, "prompts"] == 1
    assert table.loc[killed, "status"] == "interrupted" and table.loc[killed, "progress"] == "2/4"
    assert list(list_table(tmp_path, experiment="exp_b")["run"]) == [killed]
    assert list(list_table(tmp_path, patterns=["*shard*"])["run"]) == [shard]

    proc = subprocess.run([sys.executable, "-m", "qalign_repro.runs", f"output_root={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| run " in proc.stdout and done in proc.stdout
    assert "1 interrupted" in proc.stdout and "2 done" in proc.stdout


def test_live_status_of_a_running_writer(tmp_path):
    (tmp_path / "run.lock").write_text(f"pid {__import__('os').getpid()} on host {socket.gethostname()} since now")
    assert live_status(tmp_path, "running") == "running"
    (tmp_path / "run.lock").write_text("pid 1 on host elsewhere-node since now")
    assert live_status(tmp_path, "running") == "running on elsewhere-node"
    assert live_status(tmp_path, "done") == "done"


def test_bad_argument_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qalign_repro.runs", "root=x"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "unknown argument 'root=x'" in proc.stderr
