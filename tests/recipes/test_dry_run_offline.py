"""The paper recipe's dry run offline: the hub is asked at most once, the plan prints in seconds with one line
naming the estimated figures, and the commands show the calibration stage and the calibrated β.

"Offline" is a hub endpoint that accepts connections and never answers (the worst case: a firewall that drops
packets), or HF_HUB_OFFLINE=1. Before the fix the first case took 27 minutes of retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _helpers import REPO

from qalign_repro.models import hub as hub_access


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts every connection, counts it and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.connections:
            c.close()


@pytest.fixture()
def hole():
    server = BlackHole()
    yield server
    server.close()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in hub_access.OFFLINE_VARIABLES}
    # an empty HF cache: what a fresh machine has (the user's cache must not make the test pass)
    return {**env, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", **extra}


def _dry_run(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qalign_repro.recipes", "experiment=general", "--dry-run",
                           f"output_root={tmp_path / 'root'}"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    return proc, time.monotonic() - t0


def _check_plan(proc: subprocess.CompletedProcess, reason: str) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retry" not in (proc.stdout + proc.stderr).lower(), proc.stderr[-3000:]
    estimates = [ln for ln in proc.stdout.splitlines() if ln.startswith("Estimates:")]
    assert len(estimates) == 1, proc.stdout
    line = estimates[0]
    assert "P (" in line and "L (" in line and "parameter counts" in line and reason in line, line
    commands = [ln.strip()[2:] for ln in proc.stdout.split("\ncommands:\n", 1)[1].splitlines() if ln.strip()]
    assert commands[0].startswith("python -m qalign_repro.calibrate "), commands
    assert commands[1].startswith("BETA=$(") and "calibration/general.json" in commands[1]
    later = commands[2:]
    assert len(later) == 3 * 5 + 3 and all('beta="$BETA"' in c for c in later), later
    assert not any("beta=0.5" in c for c in commands)


@pytest.mark.slow
def test_dry_run_with_a_hub_that_never_answers_asks_once_and_takes_seconds(tmp_path, hole):
    proc, wall = _dry_run(tmp_path, _env(tmp_path, HF_ENDPOINT=hole.url))
    _check_plan(proc, f"{hole.url} is unreachable")
    assert wall < 30, f"dry run took {wall:.1f} s"
    assert len(hole.connections) == 1  # the probe; after it nothing touched the hub


@pytest.mark.slow
def test_dry_run_with_hf_hub_offline_never_asks(tmp_path, hole):
    proc, wall = _dry_run(tmp_path, _env(tmp_path, HF_ENDPOINT=hole.url, HF_HUB_OFFLINE="1"))
    _check_plan(proc, "HF_HUB_OFFLINE=1 is set")
    assert wall < 30, f"dry run took {wall:.1f} s"
    assert hole.connections == []


def test_probe_is_done_once_and_switches_the_libraries_offline(monkeypatch, hole):
    for name in hub_access.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hole.url)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_access, "_reason", None)
    t0 = time.monotonic()
    assert "no answer within" in hub_access.offline_reason()
    assert hub_access.offline_reason() is not None and hub_access.hub_offline()
    assert time.monotonic() - t0 < hub_access.PROBE_TIMEOUT_S + 1.5
    assert len(hole.connections) == 1
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True


def test_a_hub_that_answers_is_online(monkeypatch):
    """Any HTTP answer, an error status included, means the hub is there."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in hub_access.OFFLINE_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(hub_access, "_reason", None)
        assert hub_access.offline_reason() is None
        assert "HF_HUB_OFFLINE" not in os.environ
    finally:
        server.shutdown()
        server.server_close()
