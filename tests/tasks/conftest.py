"""Shared fixtures for the benchmark tests: dataset configs from conf/dataset, and no network at all."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The hub path is tested on local files only: make `datasets` / `huggingface_hub` refuse any download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def dataset_cfg(name: str, **overrides) -> dict:
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text(encoding="utf-8"))
    cfg = copy.deepcopy(cfg)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def cfg_of():
    """``cfg_of("gsm8k", n=4)``: the dataset config from conf/dataset/<name>.yaml with overrides."""
    return dataset_cfg


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Any attempt to reach the network (hub, nltk downloader) fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError(f"network download attempted: {args} {kwargs}")

    nltk = sys.modules.get("nltk")  # slow to import: patched where a test imported it (tests/tasks/test_ifeval.py)
    if nltk is not None:
        monkeypatch.setattr(nltk, "download", no_download)
    config = sys.modules.get("datasets.config")  # read at import time: patch it when already imported
    if config is not None:
        monkeypatch.setattr(config, "HF_HUB_OFFLINE", True, raising=False)
