"""Resolving model locations: a shipped asset, a local folder or a hub id (users with internet)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qalign_repro.errors import ConfigError
from qalign_repro.tiny import assets_dir


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
        node = OmegaConf.to_container(cfg[what], resolve=True)
        if node.get("path") is not None or node.get("asset"):
            prints[what] = weights_fingerprint(resolve_model_path(node, what))
    return prints


def load_pretrained(loader: Any, path: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with a one-line error for broken folders (truncated weights, no tokenizer)."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except Exception as exc:  # safetensors, tokenizers and torch raise their own types for a damaged folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{what}.path={path}: could not load it with {loader.__name__} ({type(exc).__name__}: "
                          f"{first[:200]}); allowed: a complete HF model folder or hub id") from None


def count_parameters(model: Any) -> int:
    return int(sum(t.numel() for t in model.parameters()))


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
