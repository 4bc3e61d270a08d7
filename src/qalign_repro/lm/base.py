"""The Generator protocol every LM backend implements.

Prompts are token ids so QAlign can continue from ``prompt + completion[:i]`` exactly; every request carries
its own seed so that a run's randomness depends only on ``(seed, prompt id, step)`` and not on batching or on
where a resumed run restarted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qalign_repro.registry import Registry

if TYPE_CHECKING:
    import numpy as np

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

    def next_token_logprob_rows(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                                n_rows: Sequence[int], temperature: float = 1.0, batch_size: int = 64
                                ) -> list[np.ndarray]:
        """Full next-token log-probabilities (float64 ``[n_rows[j], vocab]``, tempered: log softmax(logits / T))
        at the last ``n_rows[j]`` positions of ``prompts[j] + completions[j]``: row i is the distribution after
        ``completions[j][:len - n_rows[j] + 1 + i]``. Token-level methods (SSS's acceptance rule) need whole
        distributions; a backend that returns only top-k log-probs raises ``unsupported(...)``."""

    def like(self, model_cfg: Mapping[str, Any]) -> Generator:
        """Another model (a model/ config mapping) on this backend with this one's settings, e.g. SSS's draft."""

    def close(self) -> None: ...


#: the generator backends whose ``next_token_logprob_rows`` and ``like`` work (the rest raise ``unsupported``)
FULL_DISTRIBUTION_BACKENDS = ("hf", "toy")


def unsupported(backend: str, what: str) -> Exception:
    """The one-line error of a backend asked for something it cannot do: names it and what is allowed."""
    from qalign_repro.errors import ConfigError

    return ConfigError(f"generator backend {backend!r} cannot {what}; allowed: backend="
                       f"{' or backend='.join(FULL_DISTRIBUTION_BACKENDS)}")
