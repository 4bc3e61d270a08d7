"""Ancestral sampling: output k is the k-th independent sample from the model (the MV/WMV/BoN pool)."""

from __future__ import annotations

from typing import Any

from qalign_repro.methods.base import METHODS, Chain, Method, RunContext, derive_seed, output_record


@METHODS.register("ancestral")
class Ancestral(Method):
    name = "ancestral"

    def step(self, ctx: RunContext, chains: list[Chain], k: int) -> list[dict[str, Any]]:
        seeds = [derive_seed(ctx.seed, c.prompt_id, k) for c in chains]
        comps = ctx.sample([c.prompt_ids for c in chains], [ctx.max_new_tokens] * len(chains), seeds)
        rewards, scored = ctx.score([c.messages for c in chains], [c.text for c in comps])
        return [
            output_record(
                comp.token_ids, comp.text, r, accepted=True, index=0, proposal_len=len(comp.token_ids),
                proposal_reward=r, tokens_generated=len(comp.token_ids), tokens_prefilled=comp.prompt_tokens,
                # a prefix cache could serve the prompt for every sample after the first
                tokens_cached=comp.cached_tokens if comp.cached_tokens is not None else (comp.prompt_tokens if k else 0),
                tokens_scored=n_scored, finish_reason=comp.finish_reason,
            )
            for c, comp, r, n_scored in zip(chains, comps, rewards, scored)
        ]
