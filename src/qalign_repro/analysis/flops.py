"""Measured inference FLOPs from the token counts the run stage stored with every output.

Cost model (DESIGN.md, "FLOPs"): a forward pass costs 2·P FLOPs per token for a model with P parameters.
    policy  = 2 · P_policy · (tokens_prefilled + tokens_generated)  [- tokens_cached with a prefix cache]
    reward  = 2 · P_rm · tokens_scored
The cost of budget n is the sum over the first n outputs (for QAlign, output k is the proposal made at step
k, paid for even when rejected). Token counts always come from storage, never from a constant, and parameter
counts from the run meta (``model.n_params``, written from the loaded model) - never parsed from a name.
``params_from_hf_config`` fills the gap for runs that lack it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from qalign_repro.errors import DataError

#: per-output token fields read from storage
TOKEN_FIELDS = ("tokens_prefilled", "tokens_generated", "tokens_cached", "tokens_scored")


def policy_tokens(prefilled: np.ndarray, generated: np.ndarray, cached: np.ndarray | None = None,
                  count_prefix_cache: bool = False) -> np.ndarray:
    """Tokens the policy LM processed per output; with ``count_prefix_cache`` the cached prefill is free."""
    tokens = np.asarray(prefilled, dtype=np.int64) + np.asarray(generated, dtype=np.int64)
    if count_prefix_cache and cached is not None:
        tokens = tokens - np.asarray(cached, dtype=np.int64)
    return tokens


def forward_flops(n_params: float, tokens: np.ndarray | float) -> np.ndarray | float:
    """2 · P · tokens: one forward pass over ``tokens`` tokens of a ``n_params``-parameter transformer."""
    return 2.0 * float(n_params) * np.asarray(tokens, dtype=np.float64)


def cumulative_at(costs: np.ndarray, budgets: list[int] | np.ndarray) -> np.ndarray:
    """Cost of the first n outputs for every n in ``budgets``: ``[..., N] -> [..., len(budgets)]``."""
    c = np.cumsum(np.asarray(costs, dtype=np.int64), axis=-1)
    return c[..., np.asarray(budgets, dtype=np.int64) - 1]


def n_params_of(meta: Mapping[str, Any], which: str = "model") -> float:
    """Parameter count of the run's policy (``which="model"``) or RM (``"reward"``) from the run meta, else
    counted from the HF ``config.json`` next to the recorded model path."""
    info = meta.get(which) or {}
    if isinstance(info, Mapping) and info.get("n_params"):
        return float(info["n_params"])
    if isinstance(info, Mapping) and info.get("kind") in ("python", "mix") and info.get("n_params") == 0:
        return 0.0  # a Python reward (or a mix of them only): no model reads the text
    path = info.get("path") if isinstance(info, Mapping) else None
    if path and (Path(path) / "config.json").is_file():
        return float(params_from_hf_config(Path(path) / "config.json")["total"])
    raise DataError(
        f"run {meta.get('run_name', '?')!r}: meta has no {which}.n_params and no readable config.json at "
        f"{which}.path={path!r}; cannot compute FLOPs (rerun with a current version or set the meta)"
    )


def reward_label(meta: Mapping[str, Any]) -> str:
    """The RM's name for tables, saying what each part of a python / mix reward costs: ``"python:len (0
    FLOPs)"``, ``"mix(1×tiny + 0.01×len [python, 0 FLOPs])"``; a model reward is just its name. Read from the
    run meta (``reward.kind`` / ``components``, written by run.py from ``rm/mix.describe_reward``)."""
    info = meta.get("reward") or {}
    if not isinstance(info, Mapping):
        return "?"
    name = str(info.get("name") or "?")
    kind = info.get("kind")
    if kind == "python":
        return f"python:{name} (0 FLOPs)"
    if kind != "mix":
        return name
    parts = []
    for c in info.get("components") or []:
        label = f"{c.get('weight', 1.0):g}×{c.get('name', '?')}"
        if c.get("kind") == "python":
            label += " [python, 0 FLOPs]"
        elif c.get("kind") == "mix":
            label = f"{c.get('weight', 1.0):g}×{reward_label({'reward': c})}"
        parts.append(label)
    return f"{name}({' + '.join(parts)})"


def params_from_hf_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, int]:
    """Count parameters of a decoder-only HF model (Llama, Mistral, Qwen2/3, Gemma-style, GPT-2) from its
    ``config.json`` alone, without loading weights.

    Returns ``{"embedding", "non_embedding", "total"}``:
      * ``embedding`` - the input token embedding (vocab × hidden) plus GPT-2's position table;
      * ``non_embedding`` - attention, MLP, norms and the output head (lm_head, or the ``score`` head of a
        ``...ForSequenceClassification`` reward model); a lm_head tied to the embedding is counted here
        too, because it is a real matmul per token even when it shares storage;
      * ``total`` - distinct parameters, as ``model.num_parameters()`` reports them (a tied head counted
        once). ``n_params_of`` uses ``total`` to match what the run stage records from the loaded model.
    """
    if not isinstance(config, Mapping):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read model config {str(path)!r} ({exc})") from None
    c = dict(cast(Mapping[str, Any], config))  # a config.json is an object (json.loads is typed Any)
    archs = " ".join(c.get("architectures") or [])
    classifier = "SequenceClassification" in archs
    if "n_embd" in c and "hidden_size" not in c:  # GPT-2 naming
        return _gpt2_params(c, classifier)
    try:
        h = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        vocab = int(c["vocab_size"])
        inter = int(c["intermediate_size"])
        heads = int(c["num_attention_heads"])
    except KeyError as exc:
        raise DataError(f"model config lacks {exc.args[0]!r}; cannot count parameters") from None
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or h // heads)
    qkv_bias = bool(c.get("attention_bias", False)) or c.get("model_type") in ("qwen2", "qwen2_moe")
    attn = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
    if qkv_bias:
        attn += heads * head_dim + 2 * kv_heads * head_dim
    if c.get("attention_bias", False):
        attn += h  # o_proj bias
    mlp = 3 * h * inter + (2 * inter + h if c.get("mlp_bias", False) else 0)
    qk_norm = 2 * head_dim if c.get("model_type") in ("qwen3", "olmo2") else 0
    per_layer = attn + mlp + 2 * h + qk_norm
    embedding = vocab * h
    head = int(c.get("num_labels", 1)) * h if classifier else vocab * h
    tied = bool(c.get("tie_word_embeddings", False)) and not classifier
    non_embedding = layers * per_layer + h + head
    total = embedding + non_embedding - (head if tied else 0)
    return {"embedding": embedding, "non_embedding": non_embedding, "total": total}


def _gpt2_params(c: dict[str, Any], classifier: bool) -> dict[str, int]:
    h, layers, vocab = int(c["n_embd"]), int(c["n_layer"]), int(c["vocab_size"])
    inner = int(c.get("n_inner") or 4 * h)
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h) + 4 * h
    embedding = vocab * h + int(c.get("n_positions", 1024)) * h
    head = int(c.get("num_labels", 1)) * h if classifier else vocab * h
    tied = not classifier and bool(c.get("tie_word_embeddings", True))
    non_embedding = layers * per_layer + 2 * h + head
    return {"embedding": embedding, "non_embedding": non_embedding,
            "total": embedding + non_embedding - (head if tied else 0)}
