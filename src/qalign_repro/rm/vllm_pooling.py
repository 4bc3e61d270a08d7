"""Reward model on vLLM (``backend.reward=vllm``): a ``*ForSequenceClassification`` RM with one label, served by
an in-process ``vllm.LLM(runner="pooling")``.

The reward is the raw logit. ``LLM.classify`` applies the model's activation by default, which for one label is
a sigmoid; QAlign's acceptance uses reward differences / beta, so the sigmoid would change the target. The
request therefore carries ``PoolingParams(use_activation=False)``; the result equals the HF RM's logit (the
tests check it within 1e-3).

Inputs are the RM's chat template over (prompt, assistant completion), tokenized by the RM's HF tokenizer as
the ``hf`` backend does, and never truncated: a too-long conversation is an error.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from qalign_repro.errors import ConfigError
from qalign_repro.lm.hf import render_chat
from qalign_repro.lm.vllm_engine import (
    allow_long_context,
    configure_process,
    engine_kwargs,
    load_tokenizer,
    params_of,
    require_vllm,
)
from qalign_repro.models.folders import check_architecture, inspect_model, resolve_model_path
from qalign_repro.rm.base import REWARDS, Scores
from qalign_repro.rm.hf import conversation


def check_scalar_rm(path: str, cfg: Mapping[str, Any]) -> None:
    """A one-label sequence classifier (the shared check of every local backend, models_io)."""
    check_architecture(cfg, path, "reward", "rm")


def encode_conversation(tokenizer: Any, prompt: list[dict[str, str]], completion: str, max_context: int) -> list[int]:
    """Token ids the RM reads for one (prompt, completion), with the no-truncation rule."""
    text = render_chat(tokenizer, conversation(prompt, completion), add_generation_prompt=False)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) > max_context:
        raise ConfigError(
            f"reward input of {len(ids)} tokens exceeds the reward model context ({max_context}); "
            "inputs are never truncated silently: lower max_new_tokens or use an RM with a longer context"
        )
    return ids


@REWARDS.register("vllm")
class VLLMReward:
    name = "vllm"

    def __init__(self, reward_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        backend_cfg = dict(backend_cfg or {})
        vllm = require_vllm("backend.reward=vllm", backend_cfg)
        self.path = resolve_model_path(reward_cfg, "reward")
        spec = inspect_model(reward_cfg, self.path, "reward", "rm")  # before the engine loads any weight
        self.max_context, self.max_positions = spec.max_context, spec.positions
        allow_long_context(reward_cfg, spec)
        self.tokenizer = load_tokenizer(self.path, bool(reward_cfg.get("trust_remote_code", False)))
        self.n_params = params_of(self.path, reward_cfg)
        kwargs = engine_kwargs(self.path, reward_cfg, backend_cfg.get("rm_engine"), "rm", self.max_context)
        kwargs.update(configure_process(backend_cfg))
        kwargs["runner"] = "pooling"
        print(f"vllm: loading reward model {self.path} (pooling runner)", file=sys.stderr, flush=True)
        self.llm = vllm.LLM(**kwargs)

    def encode(self, prompt: list[dict[str, str]], completion: str) -> list[int]:
        return encode_conversation(self.tokenizer, prompt, completion, self.max_context)

    def score_ids(self, encoded: list[list[int]]) -> np.ndarray:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        outs = self.llm.classify([TokensPrompt(prompt_token_ids=e) for e in encoded],
                                 pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return np.asarray([float(o.outputs.probs[0]) for o in outs], dtype=np.float64)

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        if not encoded:
            return Scores(rewards=np.zeros(0), tokens=[])
        return Scores(rewards=self.score_ids(encoded), tokens=[len(e) for e in encoded])

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
