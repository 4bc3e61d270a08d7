"""Run names: a readable slug plus a short hash of everything that changes what a run generates.

``steps`` is left out on purpose: rerunning with a larger ``steps`` extends the same chains instead of
starting over. Output locations, progress bars and later-stage settings are left out too.

Names and labels come from the model actually loaded: a model/reward config names itself with
``name: ${model_label:<name>[,<its own path>]}``, which gives ``<name>`` while the config's own model is used
(``path`` null = its shipped asset, or the path it was written for) and the folder's / hub repo's name when
``model.path`` points elsewhere; an explicit ``model.name=...`` replaces the interpolation and wins. A config with
a literal ``name`` (e.g. ``task_bt_rm``, whose path is always the user's) keeps it for any path.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

#: top-level keys whose value changes the generated data
GENERATION_KEYS = ("model", "reward", "dataset", "method", "backend", "beta", "seed", "max_new_tokens",
                   "temperature")


#: model / reward keys that describe a model without changing what it generates (left out of the hash)
MODEL_NON_IDENTITY = ("trained_on", "allow_long_context")

#: backend keys that change the generated data; URLs, ports, retries, timeouts, concurrency and memory settings
#: do not, so changing them (e.g. a server restarted on another port) resumes the same run
BACKEND_IDENTITY = ("name", "generator", "reward")


def generation_config(cfg: DictConfig) -> dict:
    full = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    out = {k: full[k] for k in GENERATION_KEYS if k in full}
    if isinstance(out.get("backend"), dict):
        out["backend"] = {k: out["backend"].get(k) for k in BACKEND_IDENTITY}
    for what in ("model", "reward"):
        if isinstance(out.get(what), dict):
            out[what] = {k: v for k, v in out[what].items() if k not in MODEL_NON_IDENTITY}
    if isinstance(out.get("method"), dict) and out["method"].get("chains", 1) == 1:
        out["method"] = {k: v for k, v in out["method"].items() if k != "chains"}  # one chain: as before the option
    if isinstance(out.get("method"), dict):  # default index and start: named as before those options existed
        from qalign_repro.methods.proposal_index import without_default_index
        from qalign_repro.methods.warm_start import without_default_init

        out["method"] = without_default_init(without_default_index(out["method"]))
    return out


def model_label(name: str, own_path: str | None = None, *, _parent_: Any) -> str:
    """The ``${model_label:...}`` resolver: ``name`` while the config's own model is loaded, else the name of
    the folder (or hub repo) ``path`` points to, so that a run on other weights is never named after the
    config's model."""
    path = _parent_.get("path")
    if path is None or str(path) == str(own_path) or str(path) == "???":
        return str(name)
    p = Path(str(path)).expanduser()
    return p.name or p.resolve().name or str(path)


if not OmegaConf.has_resolver("model_label"):
    OmegaConf.register_new_resolver("model_label", model_label)


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
