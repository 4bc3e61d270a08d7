"""In-process HF transformers generator with a KV-cached sampling loop of its own.

Why not ``model.generate``: it draws from one global RNG (so a sample depends on its batch-mates and on where
a resumed run restarted) and applies the model's generation_config (top_k=50 by default), which would make
QAlign's proposal differ from the model. Here every row draws from its own ``torch.Generator`` seeded from
``(seed, prompt id, step)`` and the distribution is exactly softmax(logits / temperature).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qalign_repro.lm.base import GENERATORS, Completion, check_budget
from qalign_repro.models import hf_format as hff

if TYPE_CHECKING:
    import torch


@GENERATORS.register("hf")
class HFGenerator:
    name = "hf"

    def __init__(self, model_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        self.path, spec, self.device, self.tokenizer, self.model = hff.load_hf_model(
            "AutoModelForCausalLM", model_cfg, "model", "lm", backend_cfg)
        self.n_params = hff.count_parameters(self.model)
        self.max_context, self.max_positions = spec.max_context, spec.positions
        self.eos_token_ids = hff.eos_ids({"eos_token_id": self.model.config.eos_token_id}, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    # -- text <-> ids -----------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return hff.encode_chat(self.tokenizer, messages)

    def decode(self, token_ids: list[int]) -> str:
        return hff.decode(self.tokenizer, token_ids)

    # -- sampling ---------------------------------------------------------------------------------------------
    @hff.inference_mode
    def sample(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        seeds: list[int],
        temperature: float = 1.0,
        return_entropies: bool = False,
    ) -> list[Completion]:
        import torch
        from transformers import DynamicCache

        if not prompts:
            return []
        check_budget(prompts, max_tokens, self.max_context)
        batch = len(prompts)
        ids, mask, positions = hff.left_pad(prompts, self.pad_id)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        eos = torch.tensor(self.eos_token_ids)

        out_ids: list[list[int]] = [[] for _ in range(batch)]
        out_lp: list[list[float]] = [[] for _ in range(batch)]
        out_ent: list[list[float]] = [[] for _ in range(batch)]
        finish = ["length"] * batch
        active = torch.ones(batch, dtype=torch.bool)

        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True).logits[:, -1, :]
        for _ in range(max(max_tokens)):
            logp = torch.log_softmax(logits.float().cpu() / temperature, dim=-1)
            probs = logp.exp()
            u = torch.stack([torch.rand((), generator=g) for g in generators])
            cdf = probs.cumsum(-1)
            tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1).clamp(max=probs.shape[-1] - 1)
            for j in torch.nonzero(active).flatten().tolist():
                k = int(tok[j])
                out_ids[j].append(k)
                out_lp[j].append(float(logp[j, k]))
                if return_entropies:
                    out_ent[j].append(hff.token_entropy(probs[j], logp[j]))
            stopped = torch.isin(tok, eos) & active
            for j in torch.nonzero(stopped).flatten().tolist():
                finish[j] = "stop"
            active &= ~stopped
            active &= torch.tensor([len(o) < int(m) for o, m in zip(out_ids, max_tokens)])
            if not bool(active.any()):
                break
            feed = torch.where(active, tok, torch.full_like(tok, self.pad_id)).unsqueeze(-1).to(self.device)
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=self.device)], dim=-1)
            positions = positions[:, -1:] + 1
            logits = self.model(input_ids=feed, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1, :]

        return [
            Completion(
                token_ids=out_ids[j],
                text=self.decode(out_ids[j]),
                finish_reason=finish[j],
                prompt_tokens=len(prompts[j]),
                cached_tokens=None,
                logprobs=out_lp[j],
                entropies=out_ent[j] if return_entropies else None,
            )
            for j in range(batch)
        ]

    @hff.inference_mode
    def next_token_logprobs(self, prefixes: list[list[int]]) -> torch.Tensor:
        """Log-probabilities of the next token after each prefix ([batch, vocab]); used by token-level methods."""
        import torch

        ids, mask, positions = hff.left_pad(prefixes, self.pad_id)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device)).logits[:, -1, :]
        return torch.log_softmax(logits.float().cpu(), dim=-1)

    @hff.inference_mode
    def next_token_logprob_rows(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                                n_rows: Sequence[int], temperature: float = 1.0, batch_size: int = 64
                                ) -> list[np.ndarray]:
        """The protocol's full next-token distributions (lm/base.py): one forward pass per sequence over
        ``prompt + completion`` keeping the last ``n_rows[j]`` positions' logits (no KV cache across calls)."""
        import torch

        seqs = [list(p) + list(y) for p, y in zip(prompts, completions)]
        out: list[np.ndarray] = []
        for s in range(0, len(seqs), batch_size):
            chunk, rows = seqs[s:s + batch_size], n_rows[s:s + batch_size]
            ids, mask, positions = hff.left_pad(chunk, self.pad_id)
            keep = max(rows)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float().cpu() / temperature, dim=-1).double().numpy()
            for j, n in enumerate(rows):
                out.append(logp[j, keep - n:])
        return out

    def like(self, model_cfg: Mapping[str, Any]) -> HFGenerator:
        """Another model on this backend and device (SSS's draft), float32 unless ``model_cfg`` says otherwise."""
        spec = {"name": "draft", "dtype": "float32", "trust_remote_code": False, **dict(model_cfg)}
        return type(self)(spec, {"device": self.device})

    def close(self) -> None:
        self.model = None
