"""Method registry, per-request randomness and the record every method stores per output.

Randomness: each (prompt id, step, purpose) gets its own generator derived from the run seed, never from a
global stream, so results do not depend on batching, on the order prompts are processed or on where an
interrupted run resumed.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qalign_repro.errors import DataError
from qalign_repro.lm.base import Completion, Generator
from qalign_repro.registry import Registry
from qalign_repro.rm.base import RewardModel

METHODS: Registry[type[Method]] = Registry("method", "qalign_repro.methods")

# purposes: separate streams for different random choices of one (prompt, step)
PURPOSE_GENERATE = 0
PURPOSE_INDEX = 1
PURPOSE_ACCEPT = 2


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def derive_rng(seed: int, prompt_id: str, step: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _stable_hash(prompt_id), step, purpose]))


def derive_seed(seed: int, prompt_id: str, step: int, purpose: int = PURPOSE_GENERATE) -> int:
    return int(derive_rng(seed, prompt_id, step, purpose).integers(0, 2**63 - 1))


class NonFiniteRewardError(DataError):
    """The reward model returned NaN/inf: never accepted silently."""


def check_rewards(rewards: np.ndarray, texts: list[str]) -> None:
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(float(r))]
    if bad:
        i = bad[0]
        raise NonFiniteRewardError(
            f"reward model returned {rewards[i]} for {len(bad)} output(s) (first: {texts[i][:60]!r}); "
            "nothing was stored for this step; check the reward model (dtype overflow?) and rerun to resume"
        )


@dataclass
class Chain:
    """One prompt's state during a run."""

    idx: int
    prompt_id: str
    prompt_ids: list[int]
    messages: list[dict[str, str]]
    last: dict[str, Any] | None = None  # the last stored output


@dataclass
class RunContext:
    generator: Generator
    reward: RewardModel
    seed: int
    beta: float
    max_new_tokens: int
    temperature: float
    batch_size: int
    method_cfg: Mapping[str, Any] = field(default_factory=dict)
    #: wall-clock seconds spent inside the generator / RM (orchestration overhead = the rest)
    timers: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "reward": 0.0})

    def sample(self, prompts: list[list[int]], max_tokens: list[int], seeds: list[int],
               **kwargs: Any) -> list[Completion]:
        out: list[Completion] = []
        t0 = time.perf_counter()
        for s in range(0, len(prompts), self.batch_size):
            out.extend(self.generator.sample(prompts[s:s + self.batch_size], max_tokens[s:s + self.batch_size],
                                             seeds[s:s + self.batch_size], temperature=self.temperature,
                                             **kwargs))
        self.timers["generate"] += time.perf_counter() - t0
        empty = [j for j, c in enumerate(out) if not c.token_ids]
        if empty:
            raise DataError(
                f"the generator returned an empty completion (no tokens, not even EOS) for {len(empty)} request(s); "
                "nothing was stored for this step; check the backend (a server that drops tokens?) and rerun"
            )
        return out

    def score(self, messages: list[list[dict[str, str]]], texts: list[str]) -> tuple[np.ndarray, list[int]]:
        t0 = time.perf_counter()
        rewards: list[float] = []
        tokens: list[int] = []
        for s in range(0, len(texts), self.batch_size):
            res = self.reward.score(messages[s:s + self.batch_size], texts[s:s + self.batch_size])
            rewards.extend(float(r) for r in res.rewards)
            tokens.extend(res.tokens)
        self.timers["reward"] += time.perf_counter() - t0
        arr = np.asarray(rewards, dtype=np.float64)
        check_rewards(arr, texts)
        return arr, tokens


def output_record(completion_ids: list[int], text: str, reward: float, *, accepted: bool, index: int,
                  proposal_len: int, proposal_reward: float, tokens_generated: int, tokens_prefilled: int,
                  tokens_cached: int, tokens_scored: int, finish_reason: str) -> dict[str, Any]:
    """The stored schema of one output (see DESIGN.md, "Storage schema")."""
    return {
        "completion_ids": list(map(int, completion_ids)),
        "text": text,
        "reward": float(reward),
        "accepted": bool(accepted),
        "index": int(index),
        "proposal_len": int(proposal_len),
        "proposal_reward": float(proposal_reward),
        "tokens_generated": int(tokens_generated),
        "tokens_prefilled": int(tokens_prefilled),
        "tokens_cached": int(tokens_cached),
        "tokens_scored": int(tokens_scored),
        "finish_reason": finish_reason,
    }


class Method(ABC):
    """A test-time method: produces output ``step`` for every chain, one step at a time.

    ``step(ctx, chains, k)`` must be a pure function of (config, chain states, k): the runner commits its
    result atomically, so a resumed run recomputes exactly the step that was lost.
    """

    name: str = ""

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        self.cfg = dict(cfg or {})

    @abstractmethod
    def step(self, ctx: RunContext, chains: list[Chain], k: int) -> list[dict[str, Any]]:
        """Output number ``k`` for each chain (same order)."""

    def postfix(self, outputs: list[dict[str, Any]]) -> dict[str, str]:
        """Extra progress-bar fields for one step."""
        return {}
