"""Where a QAlign proposal cuts the current completion (``method.index``), and the reverse-move term it puts
into the acceptance ratio.

The Quest proposal keeps ``y[:i]`` and resamples the rest from the model. Treating ``i`` as part of the move,
the move y -> y' with cut i has the reverse move y' -> y with the *same* cut, so detailed balance needs
``q(i | y') / q(i | y)`` in the ratio; the model terms cancel because both suffixes come from the model itself.
Any index distribution is exact as long as that term is the right one for it, which is why the draw and the
term live together here:

- ``uniform`` (the paper): i ~ U{0..|y|-1}; term ``|y| / |y'|``.
- ``block``: i on the engine's prefix-cache block boundaries, so the prefix a proposal sends is served from
  whole cached blocks. A prefix cache stores blocks of the *whole* sequence (prompt + completion) and vLLM
  recomputes the last prompt token (so at most prompt_len - 1 tokens are a hit), so the useful cuts are those with
  ``(prompt_len + i - 1) % b == 0``; cut 0 is always allowed as well, so the chain can change every token (it
  is irreducible). With ``m(y)`` such choices, i is uniform over them and the term is ``m(y) / m(y')``. For
  a 1-token prompt (the toy) these are the multiples of b and m(y) = floor((|y|-1)/b) + 1. Cutting on
  multiples of b counted from the completion start instead would gain nothing: the prompt length is arbitrary,
  so those cuts land at arbitrary offsets inside a block, like uniform ones.
- ``fixed``: i(y) = min(p, |y|-1), a deterministic function of the state (ablations). The reverse move exists
  only when i(y') == i(y) (term 1), otherwise the proposal is rejected (term 0). Exact, but with p > 0 not
  irreducible: a state longer than p never changes its first p tokens, so the chain samples the target
  restricted to the first state's prefix. p = 0 is an independence sampler (every proposal is a fresh sample).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from qalign_repro.errors import ConfigError

INDEX_KINDS = ("uniform", "block", "fixed")
#: block size when ``method.block_size`` is null and the backend has no prefix cache of its own (hf, toy, servers)
DEFAULT_BLOCK_SIZE = 16


def without_default_index(method: dict[str, Any]) -> dict[str, Any]:
    """The ``method`` config node as a run's identity (run name hash) sees it: the paper's uniform index (the
    default) drops ``index`` / ``block_size`` / ``index_position``, so such runs keep the names they had before
    ``method.index`` existed."""
    if method.get("index", "uniform") == "uniform":
        return {k: v for k, v in method.items() if k not in ("index", "block_size", "index_position")}
    return method


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class IndexRule:
    kind: str = "uniform"
    block_size: int | None = None  # block: None = the backend's (``prefix_block_size``), else DEFAULT_BLOCK_SIZE
    position: int = 0              # fixed: the cut position p

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> IndexRule:
        """The rule of a method config; bad values are one-line ConfigErrors (checked before any run folder)."""
        kind = cfg.get("index", "uniform")
        if kind not in INDEX_KINDS:
            raise ConfigError(f"method.index={kind!r} is not a known option; allowed: {', '.join(INDEX_KINDS)}")
        block = cfg.get("block_size")
        if block is not None and (not _is_int(block) or block < 1):
            raise ConfigError(f"method.block_size={block!r} is invalid; allowed: null (the backend's prefix-cache "
                              "block size) or an integer >= 1")
        position = cfg.get("index_position", 0)
        if position is None:
            position = 0
        if not _is_int(position) or position < 0:
            raise ConfigError(f"method.index_position={position!r} is invalid; allowed: an integer >= 0 "
                              "(the fixed cut position of method.index=fixed)")
        return cls(kind=str(kind), block_size=block, position=int(position))

    def resolved_block(self, generator: Any) -> int:
        """``block_size``, or the generator's prefix-cache block size (vLLM), or DEFAULT_BLOCK_SIZE."""
        if self.block_size is not None:
            return int(self.block_size)
        own = getattr(generator, "prefix_block_size", None)
        return int(own) if own else DEFAULT_BLOCK_SIZE

    # -- block: the choice set {0} ∪ {i in (0, n) : (prompt_len + i - 1) % b == 0} ---------------------------------
    @staticmethod
    def _first_boundary(prompt_len: int, b: int) -> int:
        return (1 - prompt_len) % b or b

    def block_choices(self, n: int, prompt_len: int, b: int) -> int:
        """m(y) for a state of ``n`` tokens."""
        return 1 + len(range(self._first_boundary(prompt_len, b), n, b))

    # -- the two things the chain needs ----------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator, n: int, prompt_len: int, generator: Any) -> int:
        """The cut of a state of ``n`` tokens (0 <= i < n), from the step's own index stream ``rng``."""
        if self.kind == "uniform":
            return int(rng.integers(0, n))
        if self.kind == "fixed":
            return min(self.position, n - 1)
        b = self.resolved_block(generator)
        j = int(rng.integers(0, self.block_choices(n, prompt_len, b)))
        return 0 if j == 0 else self._first_boundary(prompt_len, b) + (j - 1) * b

    def log_reverse_ratio(self, i: int, len_old: int, len_new: int, prompt_len: int, generator: Any) -> float:
        """log q(i | y') - log q(i | y) for the move y -> y' cut at i (-inf: no reverse move, always rejected)."""
        if self.kind == "uniform":
            return math.log(len_old) - math.log(len_new)
        if self.kind == "fixed":
            return 0.0 if min(self.position, len_new - 1) == i else -math.inf
        b = self.resolved_block(generator)
        return math.log(self.block_choices(len_old, prompt_len, b)) - math.log(
            self.block_choices(len_new, prompt_len, b))
