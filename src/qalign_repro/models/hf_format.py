"""Helpers for HF-format model folders that every backend shares: chat rendering with the tokenizer's own
template, tokenizer / config loading, EOS ids, parameter counts, padded batches and entropies.

Why one module: the hf, vllm and openai backends must send the same prompt ids, stop on the same EOS ids, score
the same reward inputs and report the same parameter count (FLOPs), whichever backend runs. Each backend
(``lm/X.py`` + ``rm/X.py``) imports its helpers from here, never from another backend's module, so choosing a
backend imports only what that backend needs. Nothing here imports torch, transformers or vLLM at import time:
the stages that only read stored runs (evaluate, predict, plot) may look a backend up without loading them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qalign_repro.errors import ConfigError
from qalign_repro.models.folders import (
    ModelSpec,
    inspect_model,
    load_pretrained,
    pick_device,
    read_model_config,
    resolve_model_path,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

F = TypeVar("F", bound=Callable[..., Any])
#: which side of a batch the pads go: generation pads on the left (every row's next token is the last column),
#: the RM on the right; the reward read position handles both
PAD_SIDES = ("left", "right")


# -- text <-> ids ---------------------------------------------------------------------------------------------
def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The tokenizer's own chat template applied to ``messages``; a tokenizer without one is refused (guessing a
    template would silently change what the model reads)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')} has no chat template; "
            "allowed: a model folder whose tokenizer_config.json or chat_template.jinja defines one"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-templated prompt with the generation prompt appended (every generator's prompt)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    """Text of completion tokens, special tokens dropped."""
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def conversation(prompt: list[dict[str, str]], completion: str) -> list[dict[str, str]]:
    """What a reward model reads: the prompt's messages and the completion as the assistant's turn."""
    return [*prompt, {"role": "assistant", "content": completion}]


def encode_conversation(tokenizer: Any, prompt: list[dict[str, str]], completion: str, max_context: int) -> list[int]:
    """Token ids an RM reads for one (prompt, completion), never truncated: a conversation longer than the RM's
    context is an error, because a cut one would be scored as something else."""
    text = render_chat(tokenizer, conversation(prompt, completion), add_generation_prompt=False)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) > max_context:
        raise ConfigError(
            f"reward input of {len(ids)} tokens exceeds the reward model context ({max_context}); "
            "inputs are never truncated silently: lower max_new_tokens or use an RM with a longer context"
        )
    return ids


# -- tokenizer, config, EOS, parameters -----------------------------------------------------------------------
def load_tokenizer(path: str, what: str = "model", trust_remote_code: bool = False) -> Any:
    """The folder's HF tokenizer, one ConfigError line for a broken folder (``what``: model or reward)."""
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, path, what, trust_remote_code=trust_remote_code)


def model_config(path: str, what: str = "model", trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's config.json as a dict (a local folder without loading anything, else the hub's)."""
    return read_model_config(path, what, trust_remote_code)


def eos_ids(cfg: Mapping[str, Any], tokenizer: Any) -> list[int]:
    """The model config's EOS id(s) (what every generator stops on), else the tokenizer's."""
    eos = cfg.get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the model defines no eos_token_id (config.json or tokenizer); allowed: a model with one")
    return sorted({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})


def count_parameters(model: Any) -> int:
    """Parameters of a loaded torch model (tied embeddings once)."""
    return int(sum(t.numel() for t in model.parameters()))


def params_of(path: str, cfg: Mapping[str, Any]) -> int:
    """The checkpoint's parameter count without loading it; a config's ``n_params`` (written for cost planning)
    is only the fallback when the checkpoint cannot be inspected."""
    try:
        return count_weight_params(path)
    except ConfigError:
        if cfg.get("n_params"):
            return int(cfg["n_params"])
        raise


def count_weight_params(path: str) -> int:
    """Parameter count from the checkpoint's safetensors headers, without loading weights.

    Why not an engine's modules: vLLM pads vocabularies and fuses layers, so its parameter count differs from
    the model's; FLOPs use the HF count (the same number the ``hf`` backend reports; tied embeddings are stored
    once).
    """
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if files:
        from safetensors import safe_open

        total = 0
        for f in files:
            with safe_open(str(f), framework="numpy") as st:
                for key in st.keys():
                    n = 1
                    for d in st.get_slice(key).get_shape():
                        n *= int(d)
                    total += n
        return total
    if not folder.exists():
        try:
            from huggingface_hub import get_safetensors_metadata

            from qalign_repro.models.hub import offline_reason

            offline_reason()  # offline: the call below fails at once instead of retrying
            meta = get_safetensors_metadata(path)
            return int(sum(meta.parameter_count.values()))
        except Exception as exc:  # offline, private repo, .bin-only checkpoint
            raise ConfigError(
                f"cannot count the parameters of {path} ({type(exc).__name__}: {exc}); allowed: a local folder "
                "with *.safetensors, or set model.n_params / reward.n_params"
            ) from None
    raise ConfigError(f"{path} has no *.safetensors; allowed: a safetensors checkpoint, or set n_params")


# -- in-process HF models -------------------------------------------------------------------------------------
def load_hf_model(loader_name: str, cfg: Mapping[str, Any], what: str, kind: str,
                  backend_cfg: Mapping[str, Any] | None) -> tuple[str, ModelSpec, str, Any, Any]:
    """``(path, spec, device, tokenizer, model)`` of a model/ or reward/ config on the in-process HF backend:
    the folder is resolved and checked for its role (``kind``: lm or rm) before any weight loads, then the
    tokenizer and the model (``loader_name``: a transformers Auto class) load in the configured dtype, in eval
    mode on the configured device."""
    import transformers

    path = resolve_model_path(cfg, what)
    spec = inspect_model(cfg, path, what, kind)  # before any weight loads
    device = pick_device(str((backend_cfg or {}).get("device", "auto")))
    trust = bool(cfg.get("trust_remote_code", False))
    tokenizer = load_pretrained(transformers.AutoTokenizer, path, what, trust_remote_code=trust)
    model = load_pretrained(getattr(transformers, loader_name), path, what,
                            dtype=torch_dtype(str(cfg.get("dtype", "float32"))), trust_remote_code=trust).to(device)
    model.eval()
    return path, spec, device, tokenizer, model


def inference_mode(fn: F) -> F:
    """``torch.inference_mode`` as a decorator that imports torch only when the function runs, so that a backend
    module imports (and registers) without torch."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention mask, position ids)`` of token sequences padded to one width on ``side``.

    Positions come from the mask (0 at each row's first real token), so a left-padded row sees the positions it
    would see alone; pads get position 0 (left) or repeat the last one (right), and the mask hides them. Every
    in-process batch (generation, SSS's scoring passes, the RM, the tiny-model trainer) is built here."""
    import torch

    if side not in PAD_SIDES:
        raise ValueError(f"side={side!r}; allowed: {', '.join(PAD_SIDES)}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[j, cols] = torch.tensor(list(s), dtype=torch.long)
            mask[j, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pad_batch`` on the left: every row's next token comes from the last column."""
    return pad_batch(seqs, pad_id, "left")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, whichever side the pads are on: where a sequence classifier reads
    its reward (the completion's closing EOS of the chat template)."""
    import torch

    cols = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), cols, torch.full_like(cols, -1)).max(-1).values


def token_entropy(probs: torch.Tensor, logp: torch.Tensor) -> float:
    """Exact entropy of one next-token distribution (``probs = exp(logp)``; 0·log 0 counts as 0)."""
    return float(-(probs * logp).nan_to_num().sum())


def topk_entropy(logprobs: list[float]) -> float:
    """Entropy from the top-k log-probabilities of one position, a lower bound of the exact entropy (what a
    server or vLLM returns instead of the whole distribution).

    The tail (tokens outside the top k, total mass m) contributes at least -m log m, so
    H >= -sum_topk p log p - m log m; the bound is exact when k covers the vocabulary (``entropy_top_k: -1``).
    """
    import math

    probs = [math.exp(lp) for lp in logprobs if lp > -float("inf")]
    h = -sum(p * math.log(p) for p in probs if p > 0)
    tail = max(0.0, 1.0 - sum(probs))
    if tail > 1e-12:
        h -= tail * math.log(tail)
    return h

