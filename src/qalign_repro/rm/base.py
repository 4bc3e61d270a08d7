"""The RewardModel protocol: raw scalar scores of full (prompt, completion) conversations.

Scores are raw logits (never sigmoid probabilities) because QAlign's acceptance uses reward differences / β.
Inputs are never silently truncated: a conversation longer than the RM's context is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from qalign_repro.registry import Registry

REWARDS: Registry[Any] = Registry("reward backend", "qalign_repro.rm")


@dataclass
class Scores:
    rewards: np.ndarray  # float64 [n]
    tokens: list[int]  # tokens the RM read per input (for FLOPs)


@runtime_checkable
class RewardModel(Protocol):
    name: str
    n_params: int
    max_context: int

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        """Score each (chat prompt, assistant completion) pair."""

    def close(self) -> None: ...
