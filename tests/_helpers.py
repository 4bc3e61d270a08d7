"""Helpers shared by test modules (importable as ``_helpers`` via pytest's pythonpath)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TOY = ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false"]


def run_module(module: str, *overrides: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m qalign_repro.<module>`` with overrides, as a user would."""
    proc = subprocess.run([sys.executable, "-m", f"qalign_repro.{module}", *overrides], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {overrides} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
