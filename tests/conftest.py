"""Offline by default: no test may reach a model or dataset hub."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_logging():
    """An entry point run in-process (Hydra's job logging) attaches handlers to the test's captured streams and
    raises the root level to INFO; a later test's log records (httpx, vLLM) would then be written to closed
    streams. Every test gets the logging it started with back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
