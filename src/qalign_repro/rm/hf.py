"""In-process HF reward model: a ``*ForSequenceClassification`` with one label, raw logit as the reward."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from qalign_repro.errors import ConfigError
from qalign_repro.lm.hf import render_chat
from qalign_repro.models.folders import (
    count_parameters,
    inspect_model,
    load_pretrained,
    pick_device,
    resolve_model_path,
    torch_dtype,
)
from qalign_repro.rm.base import REWARDS, Scores


def conversation(prompt: list[dict[str, str]], completion: str) -> list[dict[str, str]]:
    return [*prompt, {"role": "assistant", "content": completion}]


@REWARDS.register("hf")
class HFReward:
    name = "hf"

    def __init__(self, reward_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        backend_cfg = backend_cfg or {}
        self.path = resolve_model_path(reward_cfg, "reward")
        spec = inspect_model(reward_cfg, self.path, "reward", "rm")  # before any weight loads
        self.device = pick_device(str(backend_cfg.get("device", "auto")))
        trust = bool(reward_cfg.get("trust_remote_code", False))
        self.tokenizer = load_pretrained(AutoTokenizer, self.path, "reward", trust_remote_code=trust)
        self.model = load_pretrained(
            AutoModelForSequenceClassification, self.path, "reward", dtype=torch_dtype(str(reward_cfg.get("dtype", "float32"))), trust_remote_code=trust
        ).to(self.device)
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"reward model {self.path} has num_labels={self.model.config.num_labels}; allowed: 1 (a scalar RM)"
            )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.pad_id = self.model.config.pad_token_id
        self.n_params = count_parameters(self.model)
        self.max_context, self.max_positions = spec.max_context, spec.positions
        self.batch_size = int(backend_cfg.get("rm_batch_size", 32))

    def encode(self, prompt: list[dict[str, str]], completion: str) -> list[int]:
        text = render_chat(self.tokenizer, conversation(prompt, completion), add_generation_prompt=False)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if len(ids) > self.max_context:
            raise ConfigError(
                f"reward input of {len(ids)} tokens exceeds the reward model context ({self.max_context}); "
                "inputs are never truncated silently: lower max_new_tokens or use an RM with a longer context"
            )
        return ids

    @torch.inference_mode()
    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        rewards = np.empty(len(encoded), dtype=np.float64)
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, e in enumerate(chunk):
                ids[j, :len(e)] = torch.tensor(e, dtype=torch.long)
                mask[j, :len(e)] = 1
            hidden = self.model.base_model(input_ids=ids.to(self.device),
                                           attention_mask=mask.to(self.device)).last_hidden_state
            last = mask.sum(-1).to(self.device) - 1
            pooled = hidden[torch.arange(len(chunk), device=self.device), last]
            head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
            logits = head(pooled) if head is not None else self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            rewards[start:start + len(chunk)] = logits.float().reshape(len(chunk), -1)[:, 0].cpu().numpy()
        return Scores(rewards=rewards, tokens=[len(e) for e in encoded])

    def close(self) -> None:
        self.model = None
