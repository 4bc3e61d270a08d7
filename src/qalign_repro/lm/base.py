"""The Generator protocol every LM backend implements.

Prompts are token ids so QAlign can continue from ``prompt + completion[:i]`` exactly; every request carries
its own seed so that a run's randomness depends only on ``(seed, prompt id, step)`` and not on batching or on
where a resumed run restarted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from qalign_repro.registry import Registry

GENERATORS: Registry[Any] = Registry("generator backend", "qalign_repro.lm")


@dataclass
class Completion:
    """One sampled continuation.

    ``token_ids`` include the EOS token when ``finish_reason == "stop"``. ``prompt_tokens`` is the length of
    the prompt that was sent (which for a QAlign proposal includes the kept prefix of the completion);
    ``cached_tokens`` the part of it the backend served from a prefix cache (None when the backend does not
    report it). ``logprobs`` are the sampled tokens' log-probabilities under the sampling distribution;
    ``entropies`` the next-token entropies at each generated position (only when asked for).
    """

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    cached_tokens: int | None = None  # None: the backend does not report it
    logprobs: list[float] | None = None
    entropies: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_budget(prompts: list[list[int]], max_tokens: list[int], max_context: int) -> None:
    """Every backend refuses a request that cannot fit the context, before sending anything."""
    from qalign_repro.errors import ConfigError

    for p, m in zip(prompts, max_tokens):
        if m < 1:
            raise ValueError(f"max_tokens={m} must be >= 1")
        if len(p) + m > max_context:
            room = max_context - len(p)
            fit = f"at most {room} new tokens for this prompt, " if room >= 1 else ""
            raise ConfigError(
                f"prompt of {len(p)} tokens + {m} new tokens exceeds the model context ({max_context}); "
                f"allowed: {fit}a shorter prompt, a larger model.max_context (up to the model's positions), or a "
                "model with a longer context"
            )


@runtime_checkable
class Generator(Protocol):
    name: str
    #: parameter count (from the model config / weights), used for FLOPs
    n_params: int
    #: the model's context length (prompt + completion)
    max_context: int
    eos_token_ids: list[int]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat-templated prompt with the generation prompt appended."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of completion tokens, special tokens dropped."""

    def sample(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        seeds: list[int],
        temperature: float = 1.0,
        return_entropies: bool = False,
    ) -> list[Completion]:
        """One pure ancestral sample per prompt (no top-k/top-p), ``max_tokens[j]`` new tokens at most."""

    def close(self) -> None: ...
