"""Chains that advance on their own on the in-process vLLM engine (the async schedule, continuous batching).

1. The async schedule stores what the lock-step reference stores: every request carries its own seed, so the
   order in which vLLM finishes them changes nothing.
2. A run killed (SIGKILL) in the middle of an asynchronous run resumes each chain from its own last committed
   state and ends with exactly the data of an uninterrupted run.
Excluded from the comparison: ``tokens_cached``, vLLM's *measured* prefix-cache hits, which depend on what the
engine's cache happens to hold (a resumed engine starts cold); it is accounting, not data a chain depends on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm)")

from qalign_repro.store.storage import RunStore, list_runs  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RUN = ["method=qalign", "dataset.n=6", "steps=10", "max_new_tokens=32", "beta=0.05", "seed=2", "rm_batch=2"]


def run(overrides: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("QALIGN_KILL_AT", None)
    if kill_at:
        env["QALIGN_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "qalign_repro.run", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


def rows(out: Path) -> dict[int, list[dict]]:
    store = RunStore(out, list_runs(out)[0], readonly=True)
    return {i: [{k: v for k, v in o.items() if k != "tokens_cached"} for o in inst["outputs"]]
            for i, inst in enumerate(store.iter_instances())}


def test_async_vllm_run_equals_lockstep_and_survives_a_kill(run_overrides, vllm_backend, tmp_path):
    ref = run([*vllm_backend, *run_overrides(tmp_path / "ref", *RUN, "schedule=lockstep")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = rows(tmp_path / "ref")

    out = tmp_path / "async"
    overrides = [*vllm_backend, *run_overrides(out, *RUN, "schedule=async")]
    killed = run(overrides, kill_at="after_commit:4")  # after a group whose first output is step 4
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = rows(out)
    counts = [len(v) for v in partial.values()]
    assert 0 < sum(counts) < 6 * 10, counts
    # every chain holds a prefix of the uninterrupted run's chain
    assert all(partial[i] == reference[i][:len(partial[i])] for i in partial)

    resumed = run(overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows(out) == reference
    again = run(overrides)
    assert again.returncode == 0 and "nothing to do" in again.stdout
