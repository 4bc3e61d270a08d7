"""A toy reward: a fixed pseudo-random score per completion text (seeded), for exactness tests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from qalign_repro.rm.base import REWARDS, Scores


@REWARDS.register("toy")
class ToyReward:
    name = "toy"

    def __init__(self, reward_cfg: Mapping[str, Any] | None = None, backend_cfg: Mapping[str, Any] | None = None):
        cfg = dict(reward_cfg or {})
        self.seed = int(cfg.get("seed", 0))
        self.scale = float(cfg.get("scale", 2.0))
        self.n_params = 1
        self.max_context = 10**9
        self.path = None

    def value(self, text: str) -> float:
        digest = hashlib.sha256(f"{self.seed}:{text}".encode()).digest()
        return self.scale * int.from_bytes(digest[:8], "little") / 2**64

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        return Scores(rewards=np.array([self.value(c) for c in completions], dtype=np.float64),
                      tokens=[len(c) + 1 for c in completions])

    def close(self) -> None:
        pass
