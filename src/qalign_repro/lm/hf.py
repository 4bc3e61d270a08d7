"""In-process HF transformers generator with a KV-cached sampling loop of its own.

Why not ``model.generate``: it draws from one global RNG (so a sample depends on its batch-mates and on where
a resumed run restarted) and applies the model's generation_config (top_k=50 by default), which would make
QAlign's proposal differ from the model. Here every row draws from its own ``torch.Generator`` seeded from
``(seed, prompt id, step)`` and the distribution is exactly softmax(logits / temperature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import GENERATORS, Completion, check_budget
from qalign_repro.models.folders import (
    count_parameters,
    inspect_model,
    load_pretrained,
    pick_device,
    resolve_model_path,
    torch_dtype,
)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no chat template; "
            "allowed: a model folder whose tokenizer_config.json or chat_template.jinja defines one"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


@GENERATORS.register("hf")
class HFGenerator:
    name = "hf"

    def __init__(self, model_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        backend_cfg = backend_cfg or {}
        self.path = resolve_model_path(model_cfg, "model")
        spec = inspect_model(model_cfg, self.path, "model", "lm")  # before any weight loads
        self.device = pick_device(str(backend_cfg.get("device", "auto")))
        trust = bool(model_cfg.get("trust_remote_code", False))
        self.tokenizer = load_pretrained(AutoTokenizer, self.path, "model", trust_remote_code=trust)
        self.model = load_pretrained(
            AutoModelForCausalLM, self.path, "model", dtype=torch_dtype(str(model_cfg.get("dtype", "float32"))), trust_remote_code=trust
        ).to(self.device)
        self.model.eval()
        self.n_params = count_parameters(self.model)
        self.max_context, self.max_positions = spec.max_context, spec.positions
        eos = self.model.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    # -- text <-> ids -----------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        seeds: list[int],
        temperature: float = 1.0,
        return_entropies: bool = False,
    ) -> list[Completion]:
        from transformers import DynamicCache

        if not prompts:
            return []
        check_budget(prompts, max_tokens, self.max_context)
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for j, p in enumerate(prompts):
            if p:
                ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[j, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
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
                    out_ent[j].append(float(-(probs[j] * logp[j]).nan_to_num().sum()))
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

    @torch.inference_mode()
    def next_token_logprobs(self, prefixes: list[list[int]]) -> torch.Tensor:
        """Log-probabilities of the next token after each prefix ([batch, vocab]); used by token-level methods."""
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prefixes):
            ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[j, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device)).logits[:, -1, :]
        return torch.log_softmax(logits.float().cpu(), dim=-1)

    def close(self) -> None:
        self.model = None
