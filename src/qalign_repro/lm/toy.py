"""A toy generator with explicit next-token probabilities over a tiny vocabulary.

It exists for exactness tests: its completion space is small enough to enumerate, so the target distribution
of a sampler can be computed exactly and compared with what the sampler produces. Token 0 is EOS; tokens
1..V-1 decode to letters. The next-token distribution depends on the position and the previous token through
a fixed random logit table (seeded), not on the prompt.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from qalign_repro.lm.base import GENERATORS, Completion

EOS = 0
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@GENERATORS.register("toy")
class ToyGenerator:
    name = "toy"

    def __init__(self, model_cfg: Mapping[str, Any] | None = None, backend_cfg: Mapping[str, Any] | None = None):
        cfg = dict(model_cfg or {})
        self.vocab = int(cfg.get("vocab", 3))
        self.max_len = int(cfg.get("max_len", 8))
        self.max_context = int(cfg.get("max_context", 64))
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        # logits[pos, prev] over the vocabulary; prev = vocab means "start"
        logits = rng.normal(0.0, float(cfg.get("scale", 1.0)), size=(self.max_len, self.vocab + 1, self.vocab))
        self.probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        self.n_params = int(self.probs.size)
        self.eos_token_ids = [EOS]
        self.path = None
        # backend.continuous: emulate an engine that batches continuously (requests finish out of order)
        self.continuous = bool((backend_cfg or {}).get("continuous", False))

    def request_engine(self, temperature: float = 1.0) -> Any:
        from qalign_repro.lm.engine import ShuffledEngine

        return ShuffledEngine(self, temperature, seed=len(self.probs)) if self.continuous else None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [1]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(LETTERS[t - 1] for t in token_ids if t != EOS)

    def next_probs(self, completion: list[int]) -> np.ndarray:
        prev = completion[-1] if completion else self.vocab
        return self.probs[len(completion), prev]

    def next_token_logprob_rows(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                                n_rows: Sequence[int], temperature: float = 1.0, batch_size: int = 64
                                ) -> list[np.ndarray]:
        """The protocol's full next-token distributions from the explicit table (the toy model conditions on the
        completion only, so ``prompts`` are not read)."""
        out = []
        for y, n in zip(completions, n_rows):
            rows = np.stack([self.next_probs(list(y[:len(y) - n + 1 + i])) for i in range(n)])
            out.append(_temper(np.log(rows), temperature))
        return out

    def like(self, model_cfg: Mapping[str, Any]) -> ToyGenerator:
        """Another toy model (e.g. SSS's draft: another ``seed``/``scale``) with this one's vocabulary and limits
        unless ``model_cfg`` sets them."""
        spec = {"vocab": self.vocab, "max_len": self.max_len, "max_context": self.max_context, **dict(model_cfg)}
        return type(self)(spec)

    def sample(self, prompts: list[list[int]], max_tokens: list[int], seeds: list[int], temperature: float = 1.0,
               return_entropies: bool = False, prefixes: list[list[int]] | None = None) -> list[Completion]:
        out = []
        for j, (prompt, m, seed) in enumerate(zip(prompts, max_tokens, seeds)):
            rng = np.random.default_rng(seed)
            # the toy model conditions on the completion so far: the part of the prompt after the chat prompt
            y = list(prompt[1:]) if prefixes is None else list(prefixes[j])
            new: list[int] = []
            logps: list[float] = []
            ents: list[float] = []
            finish = "length"
            while len(new) < m and len(y) < self.max_len:
                p = self.next_probs(y)
                if temperature != 1.0:
                    p = p ** (1.0 / temperature)
                    p = p / p.sum()
                tok = int(rng.choice(self.vocab, p=p))
                logps.append(float(np.log(p[tok])))
                ents.append(float(-(p * np.log(p)).sum()))
                new.append(tok)
                y.append(tok)
                if tok == EOS:
                    finish = "stop"
                    break
            out.append(Completion(token_ids=new, text=self.decode(new), finish_reason=finish,
                                  prompt_tokens=len(prompt), logprobs=logps,
                                  entropies=ents if return_entropies else None))
        return out

    def sequence_prob(self, y: list[int]) -> float:
        p = 1.0
        for t in range(len(y)):
            p *= float(self.next_probs(y[:t])[y[t]])
        return p

    def enumerate_completions(self, max_new: int) -> Iterator[tuple[int, ...]]:
        """Every completion reachable with ``max_new`` tokens: ending in EOS, or cut at the limit."""
        limit = min(max_new, self.max_len)
        for n in range(1, limit + 1):
            for body in itertools.product(range(1, self.vocab), repeat=n - 1):
                yield (*body, EOS)
        for body in itertools.product(range(1, self.vocab), repeat=limit):
            yield body

    def close(self) -> None:
        pass


def _temper(logp: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(log p / T): the tempered distribution, as the HF backend tempers its logits."""
    if temperature == 1.0:
        return logp
    z = logp / temperature
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
