"""Run names: a readable slug plus a short hash of everything that changes what a run generates.

``steps`` is left out on purpose: rerunning with a larger ``steps`` extends the same chains instead of
starting over. Output locations, progress bars and later-stage settings are left out too.
"""

from __future__ import annotations

import hashlib
import json
import re

from omegaconf import DictConfig, OmegaConf

#: top-level keys whose value changes the generated data
GENERATION_KEYS = ("model", "reward", "dataset", "method", "backend", "beta", "seed", "max_new_tokens",
                   "temperature")


#: backend keys that change the generated data; URLs, ports, retries, timeouts, concurrency and memory settings
#: do not, so changing them (e.g. a server restarted on another port) resumes the same run
BACKEND_IDENTITY = ("name", "generator", "reward")


def generation_config(cfg: DictConfig) -> dict:
    full = OmegaConf.to_container(cfg, resolve=True)
    out = {k: full[k] for k in GENERATION_KEYS if k in full}
    if isinstance(out.get("backend"), dict):
        out["backend"] = {k: out["backend"].get(k) for k in BACKEND_IDENTITY}
    return out


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(generation_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _slug(value: object) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-") or "x"


def group_name(cfg: DictConfig) -> str:
    """The name of the whole run; shards of it share this name as a prefix."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    parts = [cfg.dataset.name, cfg.method.name, cfg.model.name, f"b{cfg.beta:g}" if cfg.beta != "auto" else "bauto", f"s{cfg.seed}"]
    return "-".join(_slug(p) for p in parts) + "-" + config_hash(cfg)


def run_name(cfg: DictConfig) -> str:
    shard = cfg.get("shard") or {}
    count = int(shard.get("count", 1))
    base = group_name(cfg)
    return base if count <= 1 else f"{base}.shard{int(shard.get('index', 0))}of{count}"
