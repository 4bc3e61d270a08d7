"""QAlign: Metropolis-Hastings over completions with the Quest suffix proposal.

Target: pi(y) ∝ p(y|x) · exp(r(x, y) / beta). From state y (completion ids incl. EOS), pick i ~ U{0..|y|-1},
keep y[:i] and resample the suffix from the model itself (temperature 1, no top-k/top-p, ``max_new - i`` new
tokens so every completion has the same length limit), then accept with
    alpha = min(1, exp((r(y') - r(y)) / beta) · |y| / |y'|).
The length ratio is the ratio of the uniform index probabilities of the forward and reverse moves; dropping it
(as some implementations do) biases the chain towards longer outputs. State 0 is an ancestral sample.
"""

from __future__ import annotations

import math
from typing import Any

from qalign_repro.methods.base import (
    METHODS,
    PURPOSE_ACCEPT,
    PURPOSE_INDEX,
    Chain,
    Method,
    RunContext,
    derive_rng,
    derive_seed,
    output_record,
)


def acceptance_probability(r_new: float, r_old: float, len_old: int, len_new: int, beta: float,
                           length_ratio: bool = True) -> float:
    log_alpha = (r_new - r_old) / beta
    if length_ratio:
        log_alpha += math.log(len_old) - math.log(len_new)
    return 1.0 if log_alpha >= 0 else math.exp(log_alpha)


@METHODS.register("qalign")
class QAlign(Method):
    name = "qalign"

    def step(self, ctx: RunContext, chains: list[Chain], k: int) -> list[dict[str, Any]]:
        if k == 0:
            from qalign_repro.methods.ancestral import Ancestral

            return Ancestral(self.cfg).step(ctx, chains, 0)
        length_ratio = bool(self.cfg.get("length_ratio", True))
        indices, prompts, budgets, seeds = [], [], [], []
        for c in chains:
            y = c.last["completion_ids"]
            i = int(derive_rng(ctx.seed, c.prompt_id, k, PURPOSE_INDEX).integers(0, len(y)))
            indices.append(i)
            prompts.append(c.prompt_ids + y[:i])
            budgets.append(ctx.max_new_tokens - i)
            seeds.append(derive_seed(ctx.seed, c.prompt_id, k))
        comps = ctx.sample(prompts, budgets, seeds)
        proposals = [c.last["completion_ids"][:i] + comp.token_ids for c, i, comp in zip(chains, indices, comps)]
        texts = [ctx.generator.decode(p) for p in proposals]
        rewards, scored = ctx.score([c.messages for c in chains], texts)

        outputs = []
        for c, i, comp, prop, text, r_new, n_scored in zip(chains, indices, comps, proposals, texts, rewards, scored):
            old = c.last
            alpha = acceptance_probability(float(r_new), old["reward"], len(old["completion_ids"]), len(prop),
                                           ctx.beta, length_ratio)
            u = float(derive_rng(ctx.seed, c.prompt_id, k, PURPOSE_ACCEPT).random())
            accepted = u < alpha
            cost = dict(
                index=i, proposal_len=len(prop), proposal_reward=float(r_new),
                tokens_generated=len(comp.token_ids), tokens_prefilled=comp.prompt_tokens,
                # the prompt and the kept prefix were processed in earlier steps of this chain
                tokens_cached=comp.cached_tokens if comp.cached_tokens is not None else comp.prompt_tokens,
                tokens_scored=n_scored,
            )
            if accepted:
                outputs.append(output_record(prop, text, float(r_new), accepted=True,
                                             finish_reason=comp.finish_reason, **cost))
            else:
                outputs.append(output_record(old["completion_ids"], old["text"], old["reward"], accepted=False,
                                             finish_reason=old["finish_reason"], **cost))
        return outputs

    def postfix(self, outputs: list[dict[str, Any]]) -> dict[str, str]:
        acc = sum(o["accepted"] for o in outputs) / max(len(outputs), 1)
        return {"step_acc": f"{acc:.2f}"}
