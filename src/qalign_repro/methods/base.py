"""Method registry, per-request randomness and the record every method stores per output.

Randomness: each (prompt id, step, purpose) gets its own generator derived from the run seed, never from a
global stream, so results do not depend on batching, on the order prompts are processed or on where an
interrupted run resumed.
"""

from __future__ import annotations

import hashlib
import math
import time
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
    """One chain's (or one prompt's sample stream's) state during a run.

    ``prompt_id`` keys the randomness: ``(seed, prompt_id, step)``; extra chains of one prompt
    (``method.chains``) get their own key. ``done`` counts the outputs committed so far, so chains that advance on
    their own (and resume on their own) each know their next step."""

    idx: int
    prompt_id: str
    prompt_ids: list[int]
    messages: list[dict[str, str]]
    last: dict[str, Any] | None = None  # the last stored output
    done: int = 0


@dataclass
class Proposal:
    """One generation request of output ``k`` of ``chain``, plus what the method needs to decide it afterwards
    (``memo``: e.g. the kept prefix of a QAlign proposal). The driver schedules proposals; the method makes and
    decides them, as pure functions of (config, chain state, k).

    ``completion`` set: the output's completion is already known (a warm start's state 0), so no schedule sends
    it to the engine; it goes straight to scoring and ``decide``, exactly like a finished request."""

    chain: Chain
    k: int
    prompt_ids: list[int]
    max_tokens: int
    seed: int
    memo: dict[str, Any] = field(default_factory=dict)
    completion: Completion | None = None


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
        self.check_completions(out)
        return out

    def collect(self, engine: Any) -> list[tuple[Any, Completion]]:
        """Wait for the next finished requests of a request engine (``lm/engine.py``), timed as generation."""
        t0 = time.perf_counter()
        done = engine.wait()
        self.timers["generate"] += time.perf_counter() - t0
        self.check_completions([c for _, c in done])
        return done

    def check_completions(self, comps: list[Completion]) -> None:
        """A completion without a single token (not even EOS) is a backend fault, never a state."""
        empty = [j for j, c in enumerate(comps) if not c.token_ids]
        if empty:
            raise DataError(
                f"the generator returned an empty completion (no tokens, not even EOS) for {len(empty)} request(s); "
                "nothing was stored for this step; check the backend (a server that drops tokens?) and rerun"
            )

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
                  tokens_cached: int, tokens_scored: int, finish_reason: str,
                  alpha: float | None = None) -> dict[str, Any]:
    """The stored schema of one output (see DESIGN.md, "Storage schema"). ``alpha``: an MCMC step's acceptance
    probability (QAlign), stored only when given, so other methods' records and old runs have none."""
    extra = {} if alpha is None else {"alpha": float(alpha)}
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
        **extra,
    }


def one_sample_errors(cur: dict[str, Any]) -> list[str]:
    """fsck's rule for a method that makes each output from one generation request: what was generated is (the
    suffix of) the proposal. A part of ``transition_errors`` of QAlign and ancestral sampling; not a rule for
    methods that count discarded tokens too (CARDS rejects chunks, SSS drops drafted tokens)."""
    if cur["tokens_generated"] > cur["proposal_len"]:
        return [f"tokens_generated={cur['tokens_generated']} > proposal_len={cur['proposal_len']}"]
    return []


class Method:
    """A test-time method: produces output ``k`` of every chain, as a pure function of (config, chain state, k).

    Two ways to say how, and the step driver (``methods/driver.py``) schedules either:
    - per request (``per_request = True``): ``propose`` makes one generation request for output k of one chain
      and ``decide`` turns its completion and reward into the output. The driver then submits requests as
      chains become ready (all at once for independent samples, each chain on its own for chains) and scores
      finished ones in micro-batches; ``step`` below is the lock-step reference built from the same two calls.
    - batched only: override ``step(ctx, chains, k)`` (methods with several rounds of generation and scoring
      per output, e.g. CARDS and SSS); the driver runs them in lock-step.
    ``kind`` says whether output k depends on output k-1 of the same chain ("chain") or not ("samples").
    """

    name: str = ""
    kind: str = "samples"
    per_request: bool = False

    # -- what the rest of the pipeline knows about a method: only these declarations, never its name ----------
    #: the method targets its distribution exactly only when the LM samples at temperature 1 (QAlign's MH ratio
    #: uses the model's own probabilities); other temperatures then need ``allow_inexact=true``
    exact_only_at_temperature_one: bool = False
    #: the predict rules a run of this method gets when ``predict.rules`` is unset; None = the sample-pool rules
    #: (mv, wmv, bon; or mbr, wmbr, bon under ROUGE), which apply to any pool of outputs
    default_rules: tuple[str, ...] | None = None
    #: rules that only runs of this method support (an explicit ``predict.rules`` list drops them elsewhere)
    own_rules: tuple[str, ...] = ()
    #: what prefixes this method's series labels in tables and figures; None = ``"<NAME>+"`` (e.g. "CARDS+ BoN")
    label_prefix: str | None = None
    #: whether making the outputs calls the reward model (QAlign, CARDS and SSS do; plain sampling does not, so a
    #: reward-free rule such as MV over its pool is charged no RM FLOPs in predict)
    reward_in_generation: bool = True

    @classmethod
    def series_prefix(cls) -> str:
        return f"{cls.name.upper()}+" if cls.label_prefix is None else cls.label_prefix

    @classmethod
    def expected_tokens(cls, steps: int, lengths: Any) -> dict[str, float] | None:
        """Total tokens (``tokens_generated`` / ``_prefilled`` / ``_cached`` / ``_scored``, summed over prompts) of
        ``steps`` outputs per prompt, mirroring what the run stage stores, for ``plan``. ``lengths`` is plan's
        ``Lengths``: ``n_prompts``, mean ``prompt_tokens`` P, ``completion_tokens`` L and ``rm_tokens`` R, and
        the measured ``length_samples`` (may be empty). None = no cost model (plan says so in one line)."""
        return None

    @classmethod
    def request_lengths(cls, lengths: Any) -> list[float]:
        """Draws of the tokens one generation request makes, for plan's lock-step occupancy model; by default
        the pilot's completion lengths (one request = one whole completion)."""
        return [float(x) for x in lengths.length_samples]

    #: every stored output is an independent sample of the model itself, so ``plan`` measures completion lengths
    #: on all of a run's outputs (on other runs only on output 0, a chain's ancestral start). Not ``kind``: CARDS
    #: and SSS outputs are independent of each other, but samples of an aligned distribution, not of the model
    model_samples: bool = False

    @staticmethod
    def transition_errors(prev: dict[str, Any] | None, cur: dict[str, Any]) -> list[str]:
        """What ``fsck`` checks on a stored output: one message per violated invariant; none by default (the
        method has no rules of its own and fsck checks only the generic schema). ``prev`` is the previous
        state of the same chain for a ``kind = "chain"`` method; None for output 0, and for every output of a
        ``"samples"`` method (each is checked on its own)."""
        return []

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        self.cfg = dict(cfg or {})

    def propose(self, ctx: RunContext, chain: Chain, k: int) -> Proposal:
        """The generation request of output ``k`` of ``chain`` (per-request methods)."""
        raise NotImplementedError(f"method {self.name!r} has no per-request form; use step()")

    def decide(self, ctx: RunContext, proposal: Proposal, completion: Completion, text: str, reward: float,
               n_scored: int) -> dict[str, Any]:
        """The output record for a finished, scored proposal (per-request methods)."""
        raise NotImplementedError(f"method {self.name!r} has no per-request form; use step()")

    def scored_text(self, ctx: RunContext, proposal: Proposal, completion: Completion) -> str:
        """The text the reward model reads for a finished proposal: the whole completion it makes."""
        return completion.text

    def step(self, ctx: RunContext, chains: list[Chain], k: int) -> list[dict[str, Any]]:
        """Output number ``k`` for each chain (same order): one batched generator call, one batched RM call."""
        props = [self.propose(ctx, c, k) for c in chains]
        todo = [p for p in props if p.completion is None]  # known completions (warm starts) need no generation
        sampled = iter(ctx.sample([p.prompt_ids for p in todo], [p.max_tokens for p in todo], [p.seed for p in todo])
                       if todo else [])
        comps = [p.completion if p.completion is not None else next(sampled) for p in props]
        texts = [self.scored_text(ctx, p, comp) for p, comp in zip(props, comps)]
        rewards, scored = ctx.score([c.messages for c in chains], texts)
        return [self.decide(ctx, p, comp, text, float(r), n)
                for p, comp, text, r, n in zip(props, comps, texts, rewards, scored)]

    def postfix(self, outputs: list[dict[str, Any]]) -> dict[str, str]:
        """Extra progress-bar fields for one step."""
        return {}
