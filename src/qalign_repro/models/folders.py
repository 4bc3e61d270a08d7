"""Resolving model locations (a shipped asset, a local folder or a hub id) and the checks every local backend runs
on a folder before loading its weights, kept here so that the hf and vllm backends refuse the same folders with
the same line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from qalign_repro.errors import ConfigError
from qalign_repro.models.tiny import assets_dir


def resolve_model_path(cfg: Mapping[str, Any], what: str) -> str:
    """Local folder for ``path: null`` + ``asset``; a local path is checked for weights; anything else is
    treated as a hub id and left to ``from_pretrained``."""
    path = cfg.get("path")
    if path is None:
        asset = cfg.get("asset")
        if not asset:
            raise ConfigError(f"{what}.path is null and no {what}.asset is set; allowed: a folder or hub id")
        path = str(assets_dir(str(asset)))
    p = Path(str(path)).expanduser()
    looks_local = p.is_absolute() or str(path).startswith(".") or p.exists()
    if looks_local:
        if not p.is_dir():
            raise ConfigError(f"{what}.path={path} is not a folder; allowed: a model folder or a hub id")
        if not (p / "config.json").is_file():
            raise ConfigError(f"{what}.path={path} has no config.json; allowed: an HF-format model folder")
        if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise ConfigError(f"{what}.path={path} has no weights (*.safetensors or *.bin); "
                              "allowed: an HF-format model folder with its weights")
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
            raise ConfigError(f"{what}.path={path} has no tokenizer files (tokenizer.json / "
                              "tokenizer.model); allowed: an HF-format model folder with its tokenizer")
        return str(p)
    from qalign_repro.models.hub import offline_reason

    offline_reason()  # a hub id: decide once whether the hub answers; offline, from_pretrained reads the cache only
    return str(path)


def weights_fingerprint(folder: str | Path, edge_bytes: int = 1 << 20) -> str | None:
    """A short hash of a local model folder's config.json and weight files (name, size, first and last MiB of
    each), cheap even for multi-GB checkpoints; None for a hub id. A run stores it so that resuming (or finding
    "nothing to do") with other weights behind the same path is refused instead of silently mixing models."""
    p = Path(folder)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    files = [p / "config.json", *sorted(p.glob("*.safetensors")), *sorted(p.glob("*.bin"))]
    for f in files:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(edge_bytes))
            if size > 2 * edge_bytes:
                fh.seek(size - edge_bytes)
                h.update(fh.read(edge_bytes))
            elif size > edge_bytes:
                h.update(fh.read())
    return h.hexdigest()[:16]


def model_fingerprints(cfg: Any) -> dict[str, str | None]:
    """Validate the configured model and reward folders and return their weight fingerprints (None for a hub id
    or a built-in toy model)."""
    from omegaconf import OmegaConf

    prints: dict[str, str | None] = {"model": None, "reward": None}
    for what in prints:
        node = cast(dict[str, Any], OmegaConf.to_container(cfg[what], resolve=True))
        if node.get("path") is not None or node.get("asset"):
            prints[what] = weights_fingerprint(resolve_model_path(node, what))
    return prints


#: config.json keys that hold a model's number of positions (Llama & most: the first; GPT-2: the second; ...)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
#: what each role needs, for the one-line refusals
ROLES = {"lm": "a causal LM (config.json architectures ending in ForCausalLM)",
         "rm": "a sequence classifier with one label (architectures ending in ForSequenceClassification, "
               "num_labels 1)"}


@dataclass(frozen=True)
class ModelSpec:
    """What a backend knows about a model folder before it loads any weight."""

    config: dict[str, Any]
    #: the model's number of positions (None when its config names none)
    positions: int | None
    #: the context the backend enforces (prompt + completion): ``max_context`` of the config, else the positions
    max_context: int


def read_model_config(path: str, what: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """config.json of a local folder (read as JSON: no weights, no model code), else ``AutoConfig`` for a hub id."""
    local = Path(path) / "config.json"
    if local.is_file():
        try:
            config = json.loads(local.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{what}.path={path}: config.json is not readable JSON ({type(exc).__name__}); "
                              "allowed: an HF-format model folder") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{what}.path={path}: config.json holds a {type(config).__name__}, not an object; "
                              "allowed: an HF-format model folder")
        return config
    from transformers import AutoConfig

    return load_pretrained(AutoConfig, path, what, trust_remote_code=trust_remote_code).to_dict()


def _auto_names(kind: str) -> set[str]:
    """Class names transformers' Auto class for ``kind`` builds (e.g. GPT2LMHeadModel for a causal LM)."""
    from transformers.models.auto import modeling_auto as auto

    table = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if kind == "lm"
             else auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    names: set[str] = set()
    for v in table.values():
        names.update([v] if isinstance(v, str) else v)
    return names


def num_labels(config: Mapping[str, Any]) -> int:
    """Labels as transformers counts them: ``id2label`` wins, then ``num_labels``; a config without either is the
    2-label default (transformers writes ``id2label`` only when it differs from that default)."""
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels") or 2)


def check_architecture(config: Mapping[str, Any], path: str, what: str, kind: str) -> None:
    """Refuse, before any weight loads, a folder that is not what its role needs: an RM loaded as the policy
    "works" (transformers drops its head and adds a random LM head) and only produces garbage."""
    archs = [str(a) for a in (config.get("architectures") or [])]
    suffix = "ForCausalLM" if kind == "lm" else "ForSequenceClassification"
    fits = any(a.endswith(suffix) for a in archs) or bool(set(archs) & _auto_names(kind))
    if not archs and kind == "lm":  # no architectures recorded: trust the model type's causal-LM class
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        fits = config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not fits:
        found = ", ".join(archs) or f"no architectures, model_type {config.get('model_type')!r}"
        if any(a.endswith("ForSequenceClassification") for a in archs):
            found = f"a sequence classifier / reward model ({found})"
        elif any(a.endswith("ForCausalLM") for a in archs):
            found = f"a causal LM ({found})"
        raise ConfigError(f"{what}.path={path} is {found}, not {ROLES[kind].split(' (')[0]}; allowed: {ROLES[kind]}")
    if kind == "rm" and num_labels(config) != 1:
        raise ConfigError(f"{what}.path={path} has num_labels={num_labels(config)}; allowed: 1 (a scalar RM)")


def model_positions(config: Mapping[str, Any]) -> int | None:
    for node in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = node.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def context_length(cfg: Mapping[str, Any], config: Mapping[str, Any], path: str, what: str) -> int:
    """``{what}.max_context``, refused above the model's positions unless ``{what}.allow_long_context`` is set
    (positions past training give untrained outputs; with RoPE nothing else stops them); else the positions."""
    positions = model_positions(config)
    wanted = cfg.get("max_context")
    if wanted is None:
        return positions or 2048
    if positions is not None and int(wanted) > positions and not cfg.get("allow_long_context", False):
        raise ConfigError(
            f"{what}.max_context={wanted} exceeds the {positions} positions of {path}; allowed: "
            f"{what}.max_context <= {positions}, or {what}.allow_long_context=true to use positions the model was "
            "not trained on")
    return int(wanted)


def inspect_model(cfg: Mapping[str, Any], path: str, what: str, kind: str) -> ModelSpec:
    """The checks every local backend runs before loading weights: the architecture fits the role (``kind``:
    ``lm`` or ``rm``) and the configured context fits the model's positions."""
    if kind not in ROLES:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(ROLES)}")
    config = read_model_config(path, what, bool(cfg.get("trust_remote_code", False)))
    check_architecture(config, path, what, kind)
    return ModelSpec(config=config, positions=model_positions(config),
                     max_context=context_length(cfg, config, path, what))


def load_pretrained(loader: Any, path: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with a one-line error for broken folders (truncated weights, no tokenizer).
    transformers' per-load "Loading weights" bar is turned off: a run prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(path, **kwargs)
    except Exception as exc:  # safetensors, tokenizers and torch raise their own types for a damaged folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{what}.path={path}: could not load it with {loader.__name__} ({type(exc).__name__}: "
                          f"{first[:200]}); allowed: a complete HF model folder or hub id") from None


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "auto": "auto"}
    if name not in table:
        raise ConfigError(f"dtype={name} is invalid; allowed: {', '.join(table)}")
    return table[name]


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"backend.device={name} is invalid; allowed: auto, cpu, cuda, cuda:N")
    return name
