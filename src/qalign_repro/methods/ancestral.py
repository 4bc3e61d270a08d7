"""Ancestral sampling: output k is the k-th independent sample from the model (the MV/WMV/BoN pool)."""

from __future__ import annotations

from typing import Any

from qalign_repro.lm.base import Completion
from qalign_repro.methods.base import METHODS, Chain, Method, Proposal, RunContext, derive_seed, output_record


@METHODS.register("ancestral")
class Ancestral(Method):
    name = "ancestral"
    kind = "samples"
    per_request = True

    def propose(self, ctx: RunContext, chain: Chain, k: int) -> Proposal:
        return Proposal(chain=chain, k=k, prompt_ids=chain.prompt_ids, max_tokens=ctx.max_new_tokens,
                        seed=derive_seed(ctx.seed, chain.prompt_id, k))

    def decide(self, ctx: RunContext, proposal: Proposal, completion: Completion, text: str, reward: float,
               n_scored: int) -> dict[str, Any]:
        comp = completion
        return output_record(
            comp.token_ids, text, reward, accepted=True, index=0, proposal_len=len(comp.token_ids),
            proposal_reward=reward, tokens_generated=len(comp.token_ids), tokens_prefilled=comp.prompt_tokens,
            # a prefix cache could serve the prompt for every sample after the first
            tokens_cached=comp.cached_tokens if comp.cached_tokens is not None else (
                comp.prompt_tokens if proposal.k else 0),
            tokens_scored=n_scored, finish_reason=comp.finish_reason,
        )
