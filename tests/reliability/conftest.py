"""Shared fixtures of the reliability suite: imports done once before forking, and the phase board that
forked children report to (see crashkit.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # crashkit, badkit, fake_openai

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def preloaded() -> None:
    """Import what a run imports once, in the parent, so forked children do not pay for it each time
    (provenance imports torch). Nothing here starts threads, so forking afterwards is safe."""
    import torch  # noqa: F401

    import qalign_repro.lm.toy  # noqa: F401
    import qalign_repro.rm.toy  # noqa: F401
    import qalign_repro.stages.evaluate  # noqa: F401
    import qalign_repro.stages.predict  # noqa: F401
    import qalign_repro.stages.run  # noqa: F401


@pytest.fixture()
def board():
    from crashkit import PhaseBoard

    return PhaseBoard()
