"""Ancestral sampling: output k is the k-th independent sample from the model (the MV/WMV/BoN pool)."""

from __future__ import annotations

from typing import Any

from qalign_repro.lm.base import Completion
from qalign_repro.methods.base import (
    METHODS,
    Chain,
    Method,
    Proposal,
    RunContext,
    derive_seed,
    one_sample_errors,
    output_record,
)


@METHODS.register("ancestral")
class Ancestral(Method):
    name = "ancestral"
    kind = "samples"
    reward_in_generation = False
    per_request = True
    label_prefix = ""  # its rules name the series: "MV", "WMV", "BoN"
    model_samples = True

    @classmethod
    def expected_tokens(cls, steps: int, lengths: Any) -> dict[str, float]:
        """Per output: generated L, prefilled P, cached P after the first sample (a prefix cache), RM R."""
        n, p, length, r = lengths.n_prompts, lengths.prompt_tokens, lengths.completion_tokens, lengths.rm_tokens
        return {"tokens_generated": n * steps * length, "tokens_prefilled": n * steps * p,
                "tokens_cached": n * (steps - 1) * p, "tokens_scored": n * steps * r}

    @staticmethod
    def transition_errors(prev: dict[str, Any] | None, cur: dict[str, Any]) -> list[str]:
        """Every output is one whole sample, so fsck checks each on its own (``prev`` is always None)."""
        bad = one_sample_errors(cur)
        if cur["accepted"] is not True or cur["index"] != 0:
            bad.append("an independent sample must have accepted=true and index=0")
        if cur["proposal_len"] != len(cur["completion_ids"]):
            bad.append(f"proposal_len={cur['proposal_len']} differs from the completion length "
                       f"{len(cur['completion_ids'])}")
        return bad

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
