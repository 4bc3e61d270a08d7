"""Runs against real vLLM servers survive crashes.

1. The generation server is killed mid-run (SIGKILL to its whole process group) and restarted: the run's client
   retries with backoff, says so, and the run completes without a rerun.
2. The run process itself is killed mid-run: rerunning the same command resumes from the last committed step.
Nothing committed before a crash changes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm)")

from qalign_repro.store.storage import RunStore, list_runs  # noqa: E402

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
# retries must outlast a server restart (about 1-3 minutes on 2 busy CPU cores): 1+2+4+8+15*20 s > 5 min
RETRY = ["backend.retries=24", "backend.backoff_s=1", "backend.backoff_max_s=15", "backend.timeout_s=120"]


def start_run(overrides: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "qalign_repro.run", *overrides], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def steps_done(out: Path) -> int:
    names = list_runs(out) if (out / "runs").exists() else []
    if not names:
        return 0
    try:
        return RunStore(out, names[0], readonly=True).steps_done()
    except Exception:  # created but no instances yet
        return 0


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def snapshot(out: Path) -> dict[int, list[dict]]:
    store = RunStore(out, list_runs(out)[0], readonly=True)
    return {i: inst["outputs"] for i, inst in enumerate(store.iter_instances())}


def test_run_survives_a_server_crash_and_resumes(servers, run_overrides, tmp_path):
    lm, _, backend = servers
    out = tmp_path / "out"

    def overrides(steps: int) -> list[str]:
        # steps is not part of a run's identity: a larger value extends the same chains
        return [*backend, *run_overrides(out, "method=qalign", "dataset.n=8", f"steps={steps}", "max_new_tokens=32",
                                         "beta=0.05"), *RETRY]

    # 1. the generation server dies mid-run and comes back: the client's retries carry the run over
    log1 = tmp_path / "run1.log"
    run1 = start_run(overrides(6), log1)
    try:
        wait_for(lambda: steps_done(out) >= 2, 600, "two committed steps", run1, log1)
        lm.kill()
        at_kill = snapshot(out)
        wait_for(lambda: "retry 1/24" in log1.read_text(), 120, "a retry message", run1, log1)
        lm.start()
        assert run1.wait(timeout=900) == 0, log1.read_text()[-3000:]
    finally:
        if run1.poll() is None:
            os.killpg(run1.pid, signal.SIGKILL)
    lm.wait_ready(60)
    after1 = snapshot(out)
    k = min(len(v) for v in at_kill.values())
    assert k >= 2 and all(len(v) == 6 for v in after1.values())
    assert all(after1[i][:k] == at_kill[i][:k] for i in at_kill), "committed steps changed"

    # 2. the run process itself crashes (SIGKILL) while extending the chains: the same command resumes
    log2 = tmp_path / "run2.log"
    run2 = start_run(overrides(14), log2)
    try:
        wait_for(lambda: steps_done(out) >= 8, 600, "eight committed steps", run2, log2)
        os.killpg(run2.pid, signal.SIGKILL)
        run2.wait(timeout=60)
    finally:
        if run2.poll() is None:
            os.killpg(run2.pid, signal.SIGKILL)
    at_crash = snapshot(out)
    k2 = min(len(v) for v in at_crash.values())
    assert 8 <= k2 < 14
    done = subprocess.run([sys.executable, "-m", "qalign_repro.run", *overrides(14)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    final = snapshot(out)
    assert all(len(v) == 14 for v in final.values()) and steps_done(out) == 14
    assert all(final[i][:k2] == at_crash[i][:k2] for i in at_crash), "committed steps changed"
    assert all(final[i][:6] == after1[i] for i in after1)

    # 3. once complete, a rerun has nothing to do
    again = subprocess.run([sys.executable, "-m", "qalign_repro.run", *overrides(14)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout
