"""Server faults with the OpenAI-compatible backends (``backend=openai``: lm/openai.py + rm/openai.py)
against fake servers (fake_openai.py: stdlib http.server processes that start in about a second; a real vLLM
server takes minutes to start on 2 CPU cores). A server SIGKILLed mid-run and restarted on the same port: the
run retries with backoff, says so, and ends with exactly the data of an undisturbed run. A server that stays
down: a clear error after the retry budget, every committed step intact, and the rerun resumes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _helpers import REPO
from crashkit import Fault, dump_store, run_forked, run_names

from qalign_repro.store.fsck import check_store

FAKE = Path(__file__).with_name("fake_openai.py")
KEY = "sk-reliability-SECRET-0123456789"


class Server:
    """One fake server process; ``restart`` brings it back on the same port (the run's config names it)."""

    def __init__(self, kind: str, tmp: Path, die_after: int | None = None, api_key_env: str | None = None,
                 env: dict[str, str] | None = None):
        self.kind, self.tmp, self.api_key_env, self.env = kind, tmp, api_key_env, env
        self.log = tmp / f"{kind}-requests.log"
        self.port = 0
        self.proc = self._start(die_after)
        self.restarts = 0

    def _start(self, die_after: int | None) -> subprocess.Popen:
        port_file = self.tmp / f"{self.kind}.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(FAKE), "--kind", self.kind, "--port", str(self.port), "--port-file", str(port_file),
               "--log", str(self.log)]
        if die_after:
            cmd += ["--die-after", str(die_after)]
        if self.api_key_env:
            cmd += ["--api-key-env", self.api_key_env]
        proc = subprocess.Popen(cmd, env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"fake {self.kind} server did not start"
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return proc

    def restart_when_dead(self, outage: float = 0.5) -> None:
        """``on_poll`` hook: once the server died, wait ``outage`` seconds and start it again (once)."""
        if self.restarts == 0 and self.proc.poll() is not None:
            time.sleep(outage)
            self.proc = self._start(None)
            self.restarts += 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def ready(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2)
            return True
        except OSError:
            return False


def overrides(root: Path, lm: Server, rm: Server, *extra: str) -> list[str]:
    return ["backend=openai", "model=tiny", "reward=tiny", "progress=false", "method=qalign", "dataset.n=3",
            "steps=6", "max_new_tokens=8", f"output_root={root}",
            f"backend.base_url=http://127.0.0.1:{lm.port}/v1", f"backend.rm_base_url=http://127.0.0.1:{rm.port}",
            "backend.retries=8", "backend.backoff_s=0.2", "backend.backoff_max_s=2", "backend.timeout_s=20",
            "backend.connect_timeout_s=2", "backend.concurrency=4", *extra]


@pytest.fixture(scope="module")
def imported(preloaded):
    """The server backends' imports (transformers' tokenizer, httpx, tenacity) once, before any fork."""
    import httpx  # noqa: F401
    import tenacity  # noqa: F401
    import transformers  # noqa: F401

    import qalign_repro.lm.openai  # noqa: F401
    import qalign_repro.rm.openai  # noqa: F401


def _run(args: list[str]):
    from qalign_repro.cli import compose_config
    from qalign_repro.stages.run import execute

    cfg = compose_config(args)
    return lambda: execute(cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, imported) -> dict:
    """The data of an undisturbed run against healthy fake servers."""
    from crashkit import PhaseBoard

    tmp = tmp_path_factory.mktemp("server-ref")
    lm, rm = Server("lm", tmp), Server("rm", tmp)
    try:
        ep = run_forked(_run(overrides(tmp / "root", lm, rm)), Fault(), board=PhaseBoard(), log=tmp / "log")
        assert ep.returncode == 0, ep.log
    finally:
        lm.stop()
        rm.stop()
    (name,) = run_names(tmp / "root")
    return dump_store(tmp / "root", name)


def test_fake_server_speaks_the_tiny_lm_vocabulary():
    from fake_openai import EOS, A, B
    from tokenizers import Tokenizer

    from qalign_repro.models.tiny import assets_dir

    tok = Tokenizer.from_file(str(assets_dir("tiny-lm") / "tokenizer.json"))
    assert (tok.token_to_id("</s>"), tok.token_to_id("a"), tok.token_to_id("b")) == (EOS, A, B)


@pytest.mark.parametrize(("kind", "die_after"), [("lm", 8), ("rm", 4)])
def test_server_killed_and_restarted_mid_run_completes_identically(tmp_path, reference, board, kind, die_after):
    lm = Server("lm", tmp_path, die_after=die_after if kind == "lm" else None)
    rm = Server("rm", tmp_path, die_after=die_after if kind == "rm" else None)
    victim = lm if kind == "lm" else rm
    try:
        ep = run_forked(_run(overrides(tmp_path / "root", lm, rm)), Fault(), board=board, log=tmp_path / "log",
                        on_poll=victim.restart_when_dead)
    finally:
        lm.stop()
        rm.stop()
    assert victim.restarts == 1  # the server really died mid-run and came back
    assert ep.returncode == 0, ep.log
    label = "openai backend" if kind == "lm" else "reward server"
    retries = re.findall(rf"^{label}: POST .*; retry (\d+)/8 in [\d.]+ s$", ep.log, flags=re.M)
    assert retries, ep.log  # visible, one line per retry round
    (name,) = run_names(tmp_path / "root")
    final = dump_store(tmp_path / "root", name)
    assert (final["instances"], final["outputs"]) == (reference["instances"], reference["outputs"])


def test_server_that_stays_down_keeps_the_data_and_rerun_resumes(tmp_path, reference, board):
    lm, rm = Server("lm", tmp_path, die_after=8), Server("rm", tmp_path)
    root = tmp_path / "root"
    try:
        args = overrides(root, lm, rm, "backend.retries=3", "backend.backoff_s=0.1")
        down = run_forked(_run(args), Fault(), board=board, log=tmp_path / "log")
        assert down.returncode != 0
        assert re.search(r"openai backend: POST \S+/completions failed after 4 attempts over \d+ s \(.*\); is the "
                         r"server up \(make serve\)\? Steps already stored are kept: rerun the same command to resume",
                         down.log), down.log
        (name,) = run_names(root)
        stored = dump_store(root, name)
        assert check_store(root, name) == []
        # died mid-run: every chain keeps a prefix of its uninterrupted self (chains advance on their own)
        per: dict[int, list[int]] = {}
        for idx, step, _ in stored["outputs"]:
            per.setdefault(idx, []).append(step)
        assert all(steps == list(range(len(steps))) for steps in per.values())
        assert 3 <= len(stored["outputs"]) < 3 * 6
        ref_rows = {(i, s): v for i, s, v in reference["outputs"]}
        assert all(ref_rows[(i, s)] == v for i, s, v in stored["outputs"])
        lm.restart_when_dead(outage=0.0)  # the server comes back; the same command resumes
        again = run_forked(_run(args), Fault(), board=board, log=tmp_path / "log")
        assert again.returncode == 0, again.log
    finally:
        lm.stop()
        rm.stop()
    assert dump_store(root, name)["outputs"] == reference["outputs"]


def test_server_down_is_one_line_on_the_command_line(tmp_path, imported):
    from badkit import cli_error

    dead = "http://127.0.0.1:9"  # the discard port: nothing listens, connection refused at once
    line = cli_error("run", ["backend=openai", "model=tiny", "reward=tiny", "progress=false", "dataset.n=2",
                             "steps=2", f"output_root={tmp_path}", f"backend.base_url={dead}/v1",
                             f"backend.rm_base_url={dead}", "backend.retries=1", "backend.backoff_s=0.1"])
    # probed once at start, no retries (issue 16): the line names the URL and the setting
    assert "\n" not in line and f"no server answers at {dead}/v1" in line and "backend.base_url" in line


# -- API keys (security basics) ------------------------------------------------------------------------------------
def _grep_tree(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_api_key_is_read_from_the_environment_and_never_written(tmp_path):
    """The real CLI (Hydra's own logs included): the key reaches the server and nothing else."""
    env = {"QALIGN_API_KEY": KEY}
    lm = Server("lm", tmp_path, api_key_env="QALIGN_API_KEY", env=env)
    rm = Server("rm", tmp_path, api_key_env="QALIGN_API_KEY", env=env)
    root = tmp_path / "root"
    try:
        proc = subprocess.run([sys.executable, "-m", "qalign_repro.run", *overrides(root, lm, rm, "steps=2")],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=600)
    finally:
        lm.stop()
        rm.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"auth='Bearer {KEY}'" in lm.log.read_text() and f"auth='Bearer {KEY}'" in rm.log.read_text()
    assert KEY not in proc.stdout + proc.stderr
    assert _grep_tree(root, KEY.encode()) == []  # store (db + WAL), hydra/.hydra/*.yaml, logs
    (name,) = run_names(root)
    assert dump_store(root, name)["meta"]["config"]["backend"]["api_key_env"] == "QALIGN_API_KEY"


def test_wrong_api_key_is_refused_without_echoing_it(tmp_path, imported, board):
    lm = Server("lm", tmp_path, api_key_env="QALIGN_API_KEY", env={"QALIGN_API_KEY": KEY})
    rm = Server("rm", tmp_path)
    root = tmp_path / "root"
    wrong = "sk-wrong-key-ABCDEF"
    try:
        ep = run_forked(_run(overrides(root, lm, rm)), Fault(), board=board, log=tmp_path / "log",
                        env={"QALIGN_API_KEY": wrong})
    finally:
        lm.stop()
        rm.stop()
    assert ep.returncode != 0
    assert re.search(r"HTTP 401 from \S+: .*invalid API key.* \(check the API key in \$QALIGN_API_KEY\)", ep.log), ep.log
    assert wrong not in ep.log and KEY not in ep.log
    assert _grep_tree(root, wrong.encode()) == []


def test_api_key_in_the_config_is_refused():
    from qalign_repro.cli import compose_config
    from qalign_repro.errors import ConfigError

    try:
        compose_config(["backend=openai", f"+backend.api_key={KEY}"])
    except ConfigError as exc:
        assert KEY not in str(exc) and "environment" in str(exc)
        return
    raise AssertionError("a key in the config was accepted")
