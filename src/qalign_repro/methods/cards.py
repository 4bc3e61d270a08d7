"""CARDS: cascade reward sampling, i.e. segment-level (quasi-)rejection sampling with an item-level RM.

One output = one CARDS sample, built segment by segment:

1. **Propose a segment** from the LM, continuing ``prompt + prefix``. With ``segmentation: entropy`` the
   segment ends *before* the first token whose next-token distribution has entropy above
   ``entropy_threshold`` (uncertainty marks the start of a new semantic unit), once the segment has at least
   ``min_segment_tokens`` tokens; it also ends at EOS, at ``max_segment_tokens`` (the fallback cut) and at the
   completion limit. With ``segmentation: fixed`` every segment is ``max_segment_tokens`` long (or ends at
   EOS / the limit).
2. **Score** ``prefix + segment`` with the RM (an item-level RM read on a partial answer, as in the paper).
3. **Accept** with the quasi-rejection rule: always if ``r >= tau``, else with probability
   ``exp((r - tau) / beta)``. The threshold follows the published code: it rises linearly with the length of
   the completion, from ``tau_0 = (1 - alpha) * r(prompt) + alpha * reward_threshold`` at length 0 to
   ``reward_threshold`` at ``max_new_tokens`` (``threshold_schedule: linear``; ``constant`` keeps
   ``reward_threshold`` throughout and skips the prompt-only RM call, which the linear schedule makes once per
   prompt and stores as ``prompt_reward`` for the prompt's later outputs).
4. On acceptance the segment extends the prefix; on rejection a new candidate is drawn from the same
   prefix. After ``max_candidates`` rejected candidates for one segment the retries are **exhausted** and the
   segment is taken anyway: the best-scoring candidate (``on_exhausted: best``, the published code's choice)
   or the last one (``on_exhausted: last``, which keeps the output distribution in closed form - the exactness
   test uses it).
5. Repeat until the accepted prefix ends in EOS or reaches ``max_new_tokens``.

Why a candidate is never truncated "after the fact": the cut rule looks only at the entropy of the
distribution a token is drawn from, which is a function of the prefix, so stopping before an uncertain token
and drawing it again in the next segment leaves the model's distribution intact. Consequently with
``reward_threshold -> -inf`` every candidate is accepted and CARDS is exactly ancestral sampling (tested).

Generation: the generator has no "stop when the entropy exceeds t" option, so a candidate is sampled in
chunks of ``chunk_tokens`` tokens (with entropies) and cut at the first boundary; the tokens sampled after the
cut are wasted but counted (``tokens_wasted`` and ``tokens_generated``). Smaller chunks waste fewer tokens but
re-send the prefix more often (counted in ``tokens_prefilled``; a prefix cache would serve it, see
``tokens_cached``).

Accounting: every LM request and RM call is counted (``lm_calls``, ``rm_calls``), and every token any model
processed (all candidates, rejected or not, the wasted tails, the prompt-only RM call) is in the token fields.
Randomness: per (prompt, output k) one stream for generation seeds and one for acceptance decisions, drawn
in the chain's own order, so an output does not depend on batching or on other prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from qalign_repro.errors import ConfigError
from qalign_repro.methods.base import (
    METHODS,
    PURPOSE_ACCEPT,
    PURPOSE_GENERATE,
    Chain,
    Method,
    RunContext,
    derive_rng,
    output_record,
)

DEFAULTS: dict[str, Any] = {
    "segmentation": "entropy",
    "entropy_threshold": 1.0,
    "min_segment_tokens": 4,
    "max_segment_tokens": 32,
    "chunk_tokens": 16,
    "reward_threshold": 0.0,
    "threshold_schedule": "linear",
    "alpha": 0.5,
    "beta": None,
    "max_candidates": 20,
    "on_exhausted": "best",
}


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix: the part of a new request a KV/prefix cache already holds."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cut_segment(tokens: Sequence[int], entropies: Sequence[float] | None, start: int, *, min_len: int,
                threshold: float | None, eos_ids: Sequence[int]) -> tuple[int, str | None]:
    """Where a freshly sampled chunk ends the current segment.

    ``start`` is the segment's length before the chunk; ``entropies[i]`` the entropy of the distribution token
    ``i`` was drawn from. Returns ``(take, reason)``: keep ``tokens[:take]``; ``reason`` is "entropy" (cut
    before the first uncertain token at segment position >= ``min_len``), "eos" (EOS kept), or None (no
    boundary in this chunk). ``threshold=None`` disables the entropy rule (fixed-length segmentation).
    """
    ents = cast(Sequence[float], entropies)  # read only with a threshold, which comes with entropies
    for i, tok in enumerate(tokens):
        if threshold is not None and start + i >= min_len and ents[i] > threshold:
            return i, "entropy"
        if tok in eos_ids:
            return i + 1, "eos"
    return len(tokens), None


def accept_probability(reward: float, threshold: float, beta: float) -> float:
    """Quasi-rejection: 1 when ``reward >= threshold``, else ``exp((reward - threshold) / beta)``."""
    if reward >= threshold:
        return 1.0
    return math.exp((reward - threshold) / beta)


def reward_threshold(length: int, r_prompt: float | None, *, final: float, alpha: float, max_new: int,
                     schedule: str) -> float:
    """Threshold for a candidate that makes the completion ``length`` tokens long (see module docstring)."""
    if schedule == "constant" or math.isinf(final) or r_prompt is None:
        return final
    start = (1.0 - alpha) * r_prompt + alpha * final
    return min(final, start + length * (final - start) / max_new)


@dataclass
class _Candidate:
    tokens: list[int]
    reward: float
    at_limit: bool  # the backend could not continue (model/context limit)


@dataclass
class _State:
    """One CARDS sample in progress."""

    chain: Chain
    gen_rng: np.random.Generator
    acc_rng: np.random.Generator
    seen: list[int]  # what this chain's requests already sent through the LM (prefix-cache model)
    prefix: list[int] = field(default_factory=list)
    cand: list[int] = field(default_factory=list)
    cand_complete: bool = False
    cand_at_limit: bool = False
    tried: list[_Candidate] = field(default_factory=list)
    r_prompt: float | None = None
    done: bool = False
    final_reward: float = float("nan")
    finish: str = "length"
    segments: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("lm_calls", "rm_calls", "generated", "prefilled", "cached", "scored", "wasted", "candidates",
         "rejected", "exhausted", "entropy_cuts"), 0))


@METHODS.register("cards")
class CARDS(Method):
    name = "cards"

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        super().__init__(cfg)
        c = {**DEFAULTS, **{k: v for k, v in self.cfg.items() if k != "name"}}
        unknown = sorted(set(c) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"method=cards: unknown key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
        if c["segmentation"] not in ("entropy", "fixed"):
            raise ConfigError(f"method.segmentation={c['segmentation']!r}; allowed: entropy, fixed")
        if c["threshold_schedule"] not in ("linear", "constant"):
            raise ConfigError(f"method.threshold_schedule={c['threshold_schedule']!r}; allowed: linear, constant")
        if c["on_exhausted"] not in ("best", "last"):
            raise ConfigError(f"method.on_exhausted={c['on_exhausted']!r}; allowed: best, last")
        for key in ("min_segment_tokens", "max_segment_tokens", "chunk_tokens", "max_candidates"):
            if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
                raise ConfigError(f"method.{key}={c[key]!r}; allowed: an integer >= 1")
        if c["min_segment_tokens"] > c["max_segment_tokens"]:
            raise ConfigError("method.min_segment_tokens must be <= method.max_segment_tokens")
        for key in ("entropy_threshold", "reward_threshold", "alpha") + (("beta",) if c["beta"] is not None else ()):
            if isinstance(c[key], bool) or not isinstance(c[key], (int, float)) or math.isnan(c[key]):
                raise ConfigError(f"method.{key}={c[key]!r} is not a number (on the command line write -inf, "
                                  "not -.inf)")
        if c["beta"] is not None and not float(c["beta"]) > 0:
            raise ConfigError(f"method.beta={c['beta']!r}; allowed: null (= the run's beta) or a number > 0")
        if not 0.0 <= float(c["alpha"]) <= 1.0:
            raise ConfigError(f"method.alpha={c['alpha']!r}; allowed: a number in [0, 1]")
        self.c = c

    # -- one output per chain ---------------------------------------------------------------------------------
    def step(self, ctx: RunContext, chains: list[Chain], k: int) -> list[dict[str, Any]]:
        c = self.c
        beta = float(c["beta"]) if c["beta"] is not None else ctx.beta
        final = float(c["reward_threshold"])
        states = [
            _State(chain=ch, gen_rng=derive_rng(ctx.seed, ch.prompt_id, k, PURPOSE_GENERATE),
                   acc_rng=derive_rng(ctx.seed, ch.prompt_id, k, PURPOSE_ACCEPT),
                   # as for ancestral sampling: the prompt is in the cache from this chain's earlier outputs
                   seen=list(ch.prompt_ids) if k else [])
            for ch in chains
        ]
        if c["threshold_schedule"] == "linear" and not math.isinf(final):
            self._score_prompts(ctx, states)
        while True:
            active = [s for s in states if not s.done]
            if not active:
                break
            self._extend_candidates(ctx, active)
            ready = [s for s in active if s.cand_complete]
            if ready:
                self._judge(ctx, ready, beta, final)
        return [self._record(ctx, s) for s in states]

    def _score_prompts(self, ctx: RunContext, states: list[_State]) -> None:
        """r(prompt) for the linear threshold schedule: the RM on an empty answer, one counted RM call per
        prompt; later outputs reuse the value stored with the chain's previous output."""
        todo = []
        for s in states:
            last = s.chain.last or {}
            if isinstance(last.get("prompt_reward"), float):
                s.r_prompt = last["prompt_reward"]
            else:
                todo.append(s)
        if not todo:
            return
        rewards, scored = ctx.score([s.chain.messages for s in todo], [""] * len(todo))
        for s, r, n in zip(todo, rewards, scored):
            s.r_prompt = float(r)
            s.counts["rm_calls"] += 1
            s.counts["scored"] += n

    def _extend_candidates(self, ctx: RunContext, states: list[_State]) -> None:
        """One LM request per state: the next chunk of its current candidate, cut at the segment boundary."""
        c = self.c
        entropy_mode = c["segmentation"] == "entropy"
        chunk = int(c["chunk_tokens"]) if entropy_mode else int(c["max_segment_tokens"])
        prompts, budgets, seeds = [], [], []
        for s in states:
            room = min(int(c["max_segment_tokens"]) - len(s.cand), ctx.max_new_tokens - len(s.prefix) - len(s.cand))
            prompts.append(s.chain.prompt_ids + s.prefix + s.cand)
            budgets.append(min(chunk, room))
            seeds.append(int(s.gen_rng.integers(0, 2**63 - 1)))
        comps = ctx.sample(prompts, budgets, seeds, return_entropies=entropy_mode)
        eos = ctx.generator.eos_token_ids
        for s, prompt, budget, comp in zip(states, prompts, budgets, comps):
            if entropy_mode and comp.entropies is None:
                raise ConfigError(
                    f"generator backend {ctx.generator.name!r} returns no next-token entropies; "
                    "allowed: a backend that does (hf, toy, vllm), or method.segmentation=fixed"
                )
            toks = list(comp.token_ids)
            s.counts["lm_calls"] += 1
            s.counts["generated"] += len(toks)
            s.counts["prefilled"] += comp.prompt_tokens
            s.counts["cached"] += (comp.cached_tokens if comp.cached_tokens is not None
                                   else common_prefix_len(s.seen, prompt))
            # the backend fed every sampled token but the last one through the model
            s.seen = prompt + toks[:-1]
            take, reason = cut_segment(toks, comp.entropies, len(s.cand), min_len=int(c["min_segment_tokens"]),
                                       threshold=float(c["entropy_threshold"]) if entropy_mode else None,
                                       eos_ids=eos)
            s.cand.extend(toks[:take])
            s.counts["wasted"] += len(toks) - take
            s.counts["entropy_cuts"] += reason == "entropy"
            at_limit = reason is None and comp.finish_reason == "length" and len(toks) < budget
            s.cand_at_limit = at_limit
            s.cand_complete = (reason is not None or at_limit or len(s.cand) >= int(c["max_segment_tokens"])
                               or len(s.prefix) + len(s.cand) >= ctx.max_new_tokens)

    def _judge(self, ctx: RunContext, states: list[_State], beta: float, final: float) -> None:
        """Score the finished candidates (one batched RM call) and accept, reject or fall back."""
        c = self.c
        texts = [ctx.generator.decode(s.prefix + s.cand) for s in states]
        rewards, scored = ctx.score([s.chain.messages for s in states], texts)
        for s, r, n in zip(states, rewards, scored):
            r = float(r)
            s.counts["rm_calls"] += 1
            s.counts["scored"] += n
            s.counts["candidates"] += 1
            tau = reward_threshold(len(s.prefix) + len(s.cand), s.r_prompt, final=final, alpha=float(c["alpha"]),
                                   max_new=ctx.max_new_tokens, schedule=str(c["threshold_schedule"]))
            cand = _Candidate(list(s.cand), r, s.cand_at_limit)
            if float(s.acc_rng.random()) < accept_probability(r, tau, beta):
                self._take(ctx, s, cand)
                continue
            s.counts["rejected"] += 1
            s.tried.append(cand)
            if len(s.tried) >= int(c["max_candidates"]):
                s.counts["exhausted"] += 1
                fallback = max(s.tried, key=lambda t: t.reward) if c["on_exhausted"] == "best" else s.tried[-1]
                self._take(ctx, s, fallback)
            else:
                s.cand, s.cand_complete, s.cand_at_limit = [], False, False

    @staticmethod
    def _take(ctx: RunContext, s: _State, cand: _Candidate) -> None:
        s.prefix.extend(cand.tokens)
        s.segments.append(len(cand.tokens))
        s.cand, s.cand_complete, s.cand_at_limit, s.tried = [], False, False, []
        if s.prefix and s.prefix[-1] in ctx.generator.eos_token_ids:
            s.done, s.finish, s.final_reward = True, "stop", cand.reward
        elif cand.at_limit or len(s.prefix) >= ctx.max_new_tokens:
            s.done, s.finish, s.final_reward = True, "length", cand.reward

    @staticmethod
    def _record(ctx: RunContext, s: _State) -> dict[str, Any]:
        n = s.counts
        rec = output_record(
            s.prefix, ctx.generator.decode(s.prefix), s.final_reward, accepted=True, index=0,
            proposal_len=len(s.prefix), proposal_reward=s.final_reward, tokens_generated=n["generated"],
            tokens_prefilled=n["prefilled"], tokens_cached=n["cached"], tokens_scored=n["scored"],
            finish_reason=s.finish,
        )
        rec.update(
            lm_calls=n["lm_calls"], rm_calls=n["rm_calls"], segments=list(s.segments), candidates=n["candidates"],
            rejected=n["rejected"], exhausted=n["exhausted"], entropy_cuts=n["entropy_cuts"],
            tokens_wasted=n["wasted"],
        )
        if s.r_prompt is not None:
            rec["prompt_reward"] = s.r_prompt
        return rec

    def postfix(self, outputs: list[dict[str, Any]]) -> dict[str, str]:
        cands = sum(o.get("candidates", 0) for o in outputs)
        rej = sum(o.get("rejected", 0) for o in outputs)
        segs = sum(len(o.get("segments", [])) for o in outputs)
        return {"seg_acc": f"{(cands - rej) / max(cands, 1):.2f}", "segs": f"{segs / max(len(outputs), 1):.1f}"}
