"""QAlign: Metropolis-Hastings over completions with the Quest suffix proposal.

Target: pi(y) ∝ p(y|x) · exp(r(x, y) / beta). From state y (completion ids incl. EOS), pick i ~ U{0..|y|-1},
keep y[:i] and resample the suffix from the model itself (temperature 1, no top-k/top-p, ``max_new - i`` new
tokens so every completion has the same length limit), then accept with
    alpha = min(1, exp((r(y') - r(y)) / beta) · |y| / |y'|).
The length ratio is the ratio of the uniform index probabilities of the forward and reverse moves; dropping it
biases the chain towards longer outputs (tests/test_qalign_exact.py). The index ranges over the completion only
and the suffix is a fresh sample of any length: llm-samplers' QAlignSampler gets both wrong (its index ranges over
the prompt too, index 0 calling the model on an empty input, and its proposals never change the completion's
length). State 0 is an ancestral sample, or a given completion with ``method.init`` (warm_start.py).
``method.index`` swaps the uniform cut for another (block, fixed), each with its own reverse-move term in alpha
(``proposal_index.py``); every output stores its ``alpha``, so acceptance can be Rao-Blackwellised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import Completion
from qalign_repro.methods.base import (
    METHODS,
    PURPOSE_ACCEPT,
    PURPOSE_INDEX,
    Chain,
    Method,
    Proposal,
    RunContext,
    derive_rng,
    derive_seed,
    one_sample_errors,
    output_record,
)
from qalign_repro.methods.proposal_index import IndexRule


def acceptance_probability(r_new: float, r_old: float, len_old: int, len_new: int, beta: float,
                           length_ratio: bool = True, log_reverse: float | None = None) -> float:
    """min(1, ...) of one move. ``log_reverse``: the index rule's reverse-move term (``proposal_index``;
    None = the uniform index's |y|/|y'|); ``length_ratio=False`` drops it (a deliberately wrong control)."""
    log_alpha = (r_new - r_old) / beta
    if length_ratio:
        log_alpha += math.log(len_old) - math.log(len_new) if log_reverse is None else log_reverse
    return 1.0 if log_alpha >= 0 else math.exp(log_alpha)


# -- cost model (plan) -------------------------------------------------------------------------------------------
def suffix_model(lengths: Any) -> tuple[float, float]:
    """Expected (cut position i, regenerated suffix length) of one QAlign proposal.

    The state y is cut at i ~ U{0..|y|-1} and the model continues from y[:i]; the continuation's length is that
    of a fresh completion that has already reached i tokens: E[L' - i | L' > i]. With measured lengths this is
    computed from their empirical distribution (states assumed distributed like independent samples); with a
    single length L it is exactly L - i, which averages to (L+1)/2, the paper's "≈ L/2 per step" (App. D)."""
    if not lengths.length_samples:
        length = lengths.completion_tokens
        return (length - 1) / 2, (length + 1) / 2
    samples = sorted(int(x) for x in lengths.length_samples)
    k, idx, running = len(samples), 0, sum(samples)
    prefix = [0.0]  # prefix[j] = sum over i < j of E[L' - i | L' > i]
    for i in range(samples[-1]):
        while idx < k and samples[idx] <= i:  # drop the samples that are not longer than i
            running -= samples[idx]
            idx += 1
        prefix.append(prefix[-1] + (running / (k - idx) - i))
    cut = sum((y - 1) / 2 for y in samples) / len(samples)
    suffix = sum(prefix[y] / y for y in samples if y > 0) / len(samples)
    return cut, suffix


def suffix_samples(lengths: Any, n: int = 4000) -> list[float]:
    """Lengths of regenerated QAlign suffixes drawn from the measured completion lengths (a seeded Monte Carlo of
    ``suffix_model``'s assumptions: state and continuation distributed like independent samples)."""
    import numpy as np

    xs = np.asarray(sorted(int(x) for x in lengths.length_samples if int(x) > 0))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        y = int(xs[rng.integers(len(xs))])
        i = int(rng.integers(y))
        longer = xs[xs > i]
        out.append(float(longer[rng.integers(len(longer))] - i))
    return out


# -- stored-chain invariants (fsck) ------------------------------------------------------------------------------
def transition_errors(prev: dict[str, Any] | None, cur: dict[str, Any]) -> list[str]:
    """What breaks the chain rules between two consecutive stored states (empty: none), for fsck.

    Why here: these are the rules of ``QAlign.step`` itself, so they live next to it; the class declares this
    function as its ``transition_errors`` and fsck calls it for every transition. ``prev`` None: ``cur`` is
    state 0, an ancestral sample (or a warm start's given completion). Otherwise ``cur`` kept ``prev``'s first
    ``index`` tokens and resampled the rest: an accepted state is that proposal (same prefix, the proposal's
    length and reward), a rejected one repeats ``prev`` exactly. Both also obey ``one_sample_errors`` (one
    generation request per output). Token counts and types are checked by fsck before this is called.
    """
    ids = cur["completion_ids"]
    if prev is None:
        bad = one_sample_errors(cur)
        if cur["accepted"] is not True or cur["index"] != 0:
            bad.append("state 0 (an ancestral sample) must have accepted=true and index=0")
        if cur["proposal_len"] != len(ids):
            bad.append(f"proposal_len={cur['proposal_len']} differs from the completion length {len(ids)}")
        return bad
    old, i = prev["completion_ids"], cur["index"]
    bad = one_sample_errors(cur)
    if i >= len(old):
        bad.append(f"index={i} is outside the previous state (length {len(old)})")
    if cur["proposal_len"] != i + cur["tokens_generated"]:
        bad.append(f"proposal_len={cur['proposal_len']} != index + tokens_generated ({i} + {cur['tokens_generated']})")
    alpha = cur.get("alpha")  # absent in runs stored before it existed; the coin u is in [0, 1)
    if isinstance(alpha, (int, float)) and (alpha >= 1.0 and not cur["accepted"] or alpha <= 0.0 and cur["accepted"]):
        bad.append(f"accepted={cur['accepted']} contradicts the stored acceptance probability alpha={alpha}")
    if cur["accepted"]:
        if ids[:i] != old[:i]:
            first = next((j for j, (a, b) in enumerate(zip(ids, old[:i])) if a != b), min(len(ids), i))
            bad.append(f"accepted state does not share y[:index] (index={i}) with the previous state "
                       f"(first difference at token {first})")
        if len(ids) != cur["proposal_len"]:
            bad.append(f"accepted state has {len(ids)} tokens but its proposal had {cur['proposal_len']}")
        if "proposal_reward" in cur and cur["reward"] != cur["proposal_reward"]:
            bad.append("accepted state's reward differs from its proposal's reward")
    elif (ids, cur["text"], cur["reward"]) != (old, prev["text"], prev["reward"]):
        bad.append("rejected step does not repeat the previous state")
    return bad


@METHODS.register("qalign")
class QAlign(Method):
    name = "qalign"
    kind = "chain"
    per_request = True
    exact_only_at_temperature_one = True  # the MH ratio assumes proposals from the model itself
    default_rules = ("qalign",)  # the chain's last state (after burn-in)
    own_rules = ("qalign",)
    label_prefix = ""  # the "qalign" rule names the series "QAlign"
    transition_errors = staticmethod(transition_errors)

    @classmethod
    def expected_tokens(cls, steps: int, lengths: Any) -> dict[str, float]:
        """State 0 is an ancestral sample; step k > 0 generates S, prefills P + C (cached: all of it, the prompt
        and the kept prefix were processed in earlier steps of the chain) and scores R - L + C + S, with
        C = E[i] the mean cut and S the mean regenerated suffix (``suffix_model``)."""
        n, p, length, r = lengths.n_prompts, lengths.prompt_tokens, lengths.completion_tokens, lengths.rm_tokens
        later = steps - 1
        cut, suffix = suffix_model(lengths)
        return {"tokens_generated": n * (length + later * suffix),
                "tokens_prefilled": n * (p + later * (p + cut)),
                "tokens_cached": n * later * (p + cut),
                # a proposal is scored in full: the RM's share of the prompt/template plus i + suffix tokens
                "tokens_scored": n * (r + later * (r - length + cut + suffix))}

    @classmethod
    def request_lengths(cls, lengths: Any) -> list[float]:
        """One request of step k > 0 regenerates a suffix: its length distribution, not the completions'."""
        return suffix_samples(lengths)

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        super().__init__(cfg)
        chains = self.cfg.get("chains", 1)
        if isinstance(chains, bool) or not isinstance(chains, int) or chains < 1:
            raise ConfigError(f"method.chains={chains!r} is invalid; allowed: an integer >= 1 (chains per prompt)")
        if not isinstance(self.cfg.get("length_ratio", True), bool):
            raise ConfigError(f"method.length_ratio={self.cfg['length_ratio']!r}; allowed: true or false")
        self.index_rule = IndexRule.from_cfg(self.cfg)  # method.index / block_size / index_position
        from qalign_repro.methods.warm_start import parse_init

        self.init = parse_init(self.cfg.get("init", "ancestral"), self.cfg.get("init_output", 0))
        #: chain key -> state 0 of a warm start (``warm_start.attach`` fills it before the run; None: ancestral)
        self.init_states: dict[str, dict[str, Any]] | None = None

    def propose(self, ctx: RunContext, chain: Chain, k: int, state: dict[str, Any] | None = None) -> Proposal:
        """Output 0 is an ancestral sample; output k > 0 a Quest suffix proposal from ``state`` (default: the
        chain's last state)."""
        seed = derive_seed(ctx.seed, chain.prompt_id, k)
        if k == 0 and self.init[0] != "ancestral":  # a warm start: state 0 is given, only scored
            from qalign_repro.methods.warm_start import initial_proposal

            return initial_proposal(self, ctx, chain, seed)
        if k == 0:
            return Proposal(chain=chain, k=0, prompt_ids=chain.prompt_ids, max_tokens=ctx.max_new_tokens, seed=seed)
        # k > 0: the chain has stored output k - 1, so ``last`` is set
        old = cast(dict[str, Any], chain.last) if state is None else state
        y = old["completion_ids"]
        i = self.index_rule.draw(derive_rng(ctx.seed, chain.prompt_id, k, PURPOSE_INDEX), len(y),
                                 len(chain.prompt_ids), ctx.generator)
        return Proposal(chain=chain, k=k, prompt_ids=chain.prompt_ids + y[:i], max_tokens=ctx.max_new_tokens - i,
                        seed=seed, memo={"index": i, "old": old})

    def scored_text(self, ctx: RunContext, proposal: Proposal, completion: Completion) -> str:
        if proposal.k == 0:
            return completion.text
        i = proposal.memo["index"]
        return ctx.generator.decode(proposal.memo["old"]["completion_ids"][:i] + completion.token_ids)

    def decide(self, ctx: RunContext, proposal: Proposal, completion: Completion, text: str, reward: float,
               n_scored: int) -> dict[str, Any]:
        comp = completion
        if proposal.k == 0:  # the ancestral start, or a warm start (nothing generated; scored by this run's RM)
            warm = "init" in proposal.memo
            rec = output_record(
                comp.token_ids, text, reward, accepted=True, index=0, proposal_len=len(comp.token_ids),
                proposal_reward=reward, tokens_generated=0 if warm else len(comp.token_ids),
                tokens_prefilled=comp.prompt_tokens,
                tokens_cached=comp.cached_tokens if comp.cached_tokens is not None else 0,
                tokens_scored=n_scored, finish_reason=comp.finish_reason)
            rec["alpha"] = 1.0  # the stored acceptance probability: state 0 is always taken
            return {**rec, "init": proposal.memo["init"]} if warm else rec
        i, old = proposal.memo["index"], proposal.memo["old"]
        prop = old["completion_ids"][:i] + comp.token_ids
        length_ratio = bool(self.cfg.get("length_ratio", True))
        log_reverse = self.index_rule.log_reverse_ratio(i, len(old["completion_ids"]), len(prop),
                                                        len(proposal.chain.prompt_ids), ctx.generator)
        alpha = acceptance_probability(reward, old["reward"], len(old["completion_ids"]), len(prop), ctx.beta,
                                       length_ratio, log_reverse)
        u = float(derive_rng(ctx.seed, proposal.chain.prompt_id, proposal.k, PURPOSE_ACCEPT).random())
        cost = dict(
            index=i, proposal_len=len(prop), proposal_reward=reward,
            tokens_generated=len(comp.token_ids), tokens_prefilled=comp.prompt_tokens,
            # the prompt and the kept prefix were processed in earlier steps of this chain
            tokens_cached=comp.cached_tokens if comp.cached_tokens is not None else comp.prompt_tokens,
            tokens_scored=n_scored, alpha=alpha,  # stored: Rao-Blackwellised acceptance = mean alpha
        )
        if u < alpha:
            return output_record(prop, text, reward, accepted=True, finish_reason=comp.finish_reason, **cost)
        return output_record(old["completion_ids"], old["text"], old["reward"], accepted=False,
                             finish_reason=old["finish_reason"], **cost)

