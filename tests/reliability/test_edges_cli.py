"""The edges of the command line (issue 16, item 9): Ctrl-C, a server that is not there, vLLM's console noise,
selections that match nothing, numbers as typed, runs deleted under evaluate and ``--cfg job``. Each is what a
user sees: one line, in seconds, with nothing stored damaged or created."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import REPO, run_module
from badkit import cli_error, toy
from crashkit import dump_store, run_names

INTERRUPTING_RM = '''\
import importlib.util
import os
import signal

from qalign_repro.rm.toy import ToyReward

_score = ToyReward.score
calls = {"n": 0}


def score(self, prompts, completions):  # a real SIGINT (Ctrl-C) while the RM scores step 3
    calls["n"] += 1
    if calls["n"] == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return _score(self, prompts, completions)


ToyReward.score = score
from qalign_repro.stages.run import main  # noqa: E402

main()
'''


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tmp_path):
    script = tmp_path / "interrupting_run.py"
    script.write_text(INTERRUPTING_RM)
    root = tmp_path / "root"
    args = toy(root, "method=qalign", "dataset.n=2", "steps=4")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    said = re.fullmatch(r"interrupted after (\d+) outputs committed \((\d) of 2 chains complete at 4 steps\); "
                        r"the stored data are intact; rerun the same command to resume", lines[0])
    assert said, lines[0]
    (name,) = run_names(root)
    partial = dump_store(root, name)["outputs"]
    assert 0 < len(partial) < 2 * 4
    assert int(said[1]) == len(partial)  # the line tells what is stored, no more and no less
    run_module("run", *args)  # the same command, without the interrupt, finishes the run
    clean = tmp_path / "clean"
    run_module("run", *toy(clean, "method=qalign", "dataset.n=2", "steps=4"))
    assert dump_store(root, name)["outputs"] == dump_store(clean, name)["outputs"]


def test_ctrl_c_before_anything_is_committed_says_so(capsys):
    from qalign_repro import progress_note
    from qalign_repro.cli import INTERRUPTED_EXIT, interrupted

    progress_note.clear()
    with pytest.raises(SystemExit) as info:
        interrupted()
    assert info.value.code == INTERRUPTED_EXIT == 130
    assert capsys.readouterr().err == "interrupted; the stored data are intact; rerun the same command to resume\n"
    progress_note.note("5 steps committed (1 of 4 prompts complete)")
    with pytest.raises(SystemExit):
        interrupted()
    assert capsys.readouterr().err.startswith("interrupted after 5 steps committed (1 of 4 prompts complete); ")
    progress_note.clear()


# -- a server that is not there -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_backend_without_a_server_fails_in_seconds_naming_the_url(tmp_path):
    """The default retry budget (6 retries, ~1 min of backoff) is for servers that die mid-run, not for one that
    was never started."""
    dead = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    line = cli_error("run", ["backend=openai", "model=tiny", "reward=tiny", "progress=false", "dataset.n=2",
                             "steps=2", f"output_root={tmp_path}", f"backend.base_url={dead}/v1",
                             f"backend.rm_base_url={dead}"])
    assert time.monotonic() - t0 < 15
    assert "\n" not in line and "retry" not in line
    assert line.startswith(f"error: openai backend: no server answers at {dead}/v1 (GET {dead}/v1/models: ConnectError")
    assert "backend.base_url" in line


def test_reward_server_without_a_server_fails_in_seconds_naming_the_url(capsys):
    from qalign_repro.errors import BackendUnavailableError
    from qalign_repro.rm.openai import OpenAIReward

    dead = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        OpenAIReward({"name": "tiny", "path": None, "asset": "tiny-rm"}, {"rm_base_url": dead, "retries": 6})
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert "\n" not in msg and f"reward server: no server answers at {dead} (GET {dead}/v1/models" in msg
    assert "backend.rm_base_url" in msg
    assert "retry" not in capsys.readouterr().err  # no retry rounds were printed


# -- vLLM's console ---------------------------------------------------------------------------------------------------
def test_vllm_logging_is_quiet_by_default_and_verbose_on_request(monkeypatch):
    from qalign_repro.lm.vllm import QUIET_LEVEL, configure_logging, configure_process

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    configure_logging(False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == QUIET_LEVEL == "ERROR"
    configure_logging(True)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # what the user exported wins either way
    configure_logging(False)
    configure_logging(True)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"
    # the weight-loading progress bar follows backend.verbose, with or without the in-process engine
    for in_process in (False, True):
        assert configure_process({"in_process": in_process})["use_tqdm_on_load"] is False
        assert configure_process({"in_process": in_process, "verbose": True})["use_tqdm_on_load"] is True


QUIET_IMPORT = '''\
import logging
import importlib.util
import os

os.environ.pop("VLLM_LOGGING_LEVEL", None)
from qalign_repro.lm.vllm import configure_logging, require_vllm

require_vllm("test", {"verbose": False})
vllm_logger = logging.getLogger("vllm")
print("quiet", vllm_logger.getEffectiveLevel(), os.environ["VLLM_LOGGING_LEVEL"])
configure_logging(True)
print("verbose", vllm_logger.getEffectiveLevel(), os.environ["VLLM_LOGGING_LEVEL"])
'''


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make install-vllm)")
def test_vllm_loggers_follow_the_setting_after_import(tmp_path):
    script = tmp_path / "quiet_import.py"
    script.write_text(QUIET_IMPORT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2:] == ["quiet 40 ERROR", "verbose 20 INFO"], proc.stdout
    assert " INFO " not in proc.stdout + proc.stderr and " WARNING " not in proc.stdout


# -- selections, numbers, deleted runs, --cfg job ------------------------------------------------------------------
@pytest.fixture()
def finished(tmp_path) -> Path:
    """An output root with one finished toy run of experiment_name=alpha."""
    root = tmp_path / "root"
    run_module("run", *toy(root, "dataset.n=2", "steps=2", "experiment_name=alpha"))
    return root


def test_runs_all_matching_nothing_names_experiment_name(finished):
    line = cli_error("evaluate", toy(finished, "runs=all", "experiment_name=beta"))
    assert "\n" not in line
    assert "runs=all matches no run of experiment_name=beta" in line
    assert "alpha (1 run)" in line and "allowed: experiment_name=" in line


@pytest.mark.parametrize("override,shown", [("steps=1e3", "steps=1e3"), ("steps=2.50", "steps=2.50"),
                                            ("batch_size=-1e2", "batch_size=-1e2"), ("seed=1e1", "seed=1e1")])
def test_number_errors_show_the_value_as_typed(tmp_path, override, shown):
    line = cli_error("run", toy(tmp_path, "dataset.n=2", override))
    assert line.startswith(f"error: {shown} is invalid; allowed: an integer >= "), line


def test_a_stale_typed_value_is_not_shown_for_another_config(tmp_path):
    from qalign_repro.cli import compose_config
    from qalign_repro.config import ConfigError, validate

    cfg = compose_config(toy(tmp_path, "steps=3"))
    with pytest.raises(ConfigError):
        compose_config(toy(tmp_path, "steps=1e3"))
    cfg.steps = 0  # e.g. the Python API changing a composed config: the typed text 1e3 no longer applies
    with pytest.raises(ConfigError, match=r"^steps=0 is invalid"):
        validate(cfg)


DELETING_EVALUATE = '''
import shutil
from qalign_repro.store.storage import RunStore

_lock = RunStore.lock


def lock_after_rm(self):  # another terminal's rm -rf between evaluate opening the store and taking its lock
    shutil.rmtree(self.dir)
    return _lock(self)


RunStore.lock = lock_after_rm
from qalign_repro.stages.evaluate import main  # noqa: E402

main()
'''


def test_evaluate_skips_a_run_deleted_under_it(finished, tmp_path):
    """The run is deleted between evaluate opening its store and taking its lock (another terminal's rm -rf).
    Run as its own process: the stage's Hydra entry point owns the process's streams and logging."""
    (name,) = run_names(finished)
    run_module("evaluate", *toy(finished, "runs=all", "experiment_name=alpha"))
    script = tmp_path / "deleting_evaluate.py"
    script.write_text(DELETING_EVALUATE)
    proc = subprocess.run([sys.executable, str(script), *toy(finished, "runs=all", "experiment_name=alpha")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "already evaluated" not in proc.stdout
    assert f"warning: run '{name}' was deleted while evaluate ran" in proc.stderr, proc.stderr
    assert proc.returncode == 2 and "every selected run" in proc.stderr, proc.stderr
    assert not (finished / "runs" / name).exists()  # the lock did not leave a folder behind


def test_cfg_job_prints_the_config_and_creates_nothing(tmp_path):
    root = tmp_path / "never-created"
    proc = run_module("run", f"output_root={root}", "--cfg", "job")
    assert "experiment_name:" in proc.stdout
    assert not root.exists()
