"""Reward model on vLLM (``backend.reward=vllm``): a ``*ForSequenceClassification`` RM with one label, served by
an in-process ``vllm.LLM(runner="pooling")``.

The reward is the raw logit. ``LLM.classify`` applies the model's activation by default, which for one label is
a sigmoid; QAlign's acceptance uses reward differences / beta, so the sigmoid would change the target. The
request therefore carries ``PoolingParams(use_activation=False)``; the result equals the HF RM's logit (the
tests check it within 1e-3).

Inputs are the RM's chat template over (prompt, assistant completion), tokenized by the RM's HF tokenizer as
the ``hf`` backend does, and never truncated: a too-long conversation is an error. The engine set-up is the
generator half's (``lm/vllm.py``); the reward is pooled at the last token, the completion's closing EOS, as the
``hf`` RM reads it (``tests/vllm_backends/test_vllm_engine.py`` compares the two per sequence).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qalign_repro.lm.vllm import allow_long_context, engine_kwargs, require_vllm, start_engine, stop_engine
from qalign_repro.models import hf_format as hff
from qalign_repro.models.folders import inspect_model, resolve_model_path
from qalign_repro.rm.base import REWARDS, Scores


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
        self.tokenizer = hff.load_tokenizer(self.path, "reward", bool(reward_cfg.get("trust_remote_code", False)))
        self.n_params = hff.params_of(self.path, reward_cfg)
        kwargs = engine_kwargs(self.path, reward_cfg, backend_cfg.get("rm_engine"), "rm", self.max_context)
        kwargs["runner"] = "pooling"
        self.llm = start_engine(vllm, kwargs, backend_cfg, f"reward model {self.path} (pooling runner)")

    def encode(self, prompt: list[dict[str, str]], completion: str) -> list[int]:
        return hff.encode_conversation(self.tokenizer, prompt, completion, self.max_context)

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
        stop_engine(llm)
