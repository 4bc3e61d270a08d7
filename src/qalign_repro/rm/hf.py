"""In-process HF reward model: a ``*ForSequenceClassification`` with one label, raw logit as the reward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qalign_repro.errors import ConfigError
from qalign_repro.models import hf_format as hff
from qalign_repro.rm.base import REWARDS, Scores

if TYPE_CHECKING:
    import torch


@REWARDS.register("hf")
class HFReward:
    """The reward is read at each input's last real token (the completion's closing EOS of the chat template),
    whichever side a batch is padded on (``padding_side``; right by default): ``tests/test_reward_read_position.py``
    checks that a padded batch scores each input as it scores alone."""

    name = "hf"
    padding_side = "right"

    def __init__(self, reward_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        backend_cfg = backend_cfg or {}
        self.path, spec, self.device, self.tokenizer, self.model = hff.load_hf_model(
            "AutoModelForSequenceClassification", reward_cfg, "reward", "rm", backend_cfg)
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"reward model {self.path} has num_labels={self.model.config.num_labels}; allowed: 1 (a scalar RM)"
            )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.pad_id = self.model.config.pad_token_id
        self.n_params = hff.count_parameters(self.model)
        self.max_context, self.max_positions = spec.max_context, spec.positions
        self.batch_size = int(backend_cfg.get("rm_batch_size", 32))

    def encode(self, prompt: list[dict[str, str]], completion: str) -> list[int]:
        return hff.encode_conversation(self.tokenizer, prompt, completion, self.max_context)

    def batch(self, encoded: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, mask, positions, read)`` of one padded batch: ``read`` is the column each row's reward is read
        at (its last real token)."""
        ids, mask, positions = hff.pad_batch(encoded, self.pad_id, self.padding_side)
        return ids, mask, positions, hff.last_token_index(mask)

    @hff.inference_mode
    def score_ids(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        """Raw logits of token-id inputs, ``batch_size`` at a time."""
        import torch

        rewards = np.empty(len(encoded), dtype=np.float64)
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            ids, mask, positions, last = (t.to(self.device) for t in self.batch(chunk))
            # positions from the mask: a left-padded row sees the positions it would see alone
            position_ids = positions if self.padding_side == "left" else None
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask,
                                           position_ids=position_ids).last_hidden_state
            pooled = hidden[torch.arange(len(chunk), device=self.device), last]
            head = getattr(self.model, "score", None) or getattr(self.model, "classifier", None)
            logits = head(pooled) if head is not None else self.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
            rewards[start:start + len(chunk)] = logits.float().reshape(len(chunk), -1)[:, 0].cpu().numpy()
        return rewards

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions)]
        return Scores(rewards=self.score_ids(encoded), tokens=[len(e) for e in encoded])

    def close(self) -> None:
        self.model = None
