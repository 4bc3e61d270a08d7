"""Series of the prediction table: which stored runs are one line in a figure, and what their label says.

A run's identity (``run_identity``) is every stored config value that changes what it generated or how it is
scored; runs that differ in any of it are separate series, and ``assign_variants`` appends the differing values
to the label (``series_label``: the method's declared prefix + the rule's family, e.g. "CARDS+BoN"), so a sweep
never merges into one line. Pure functions of run metas and the table; predict calls them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from qalign_repro.analysis import selection as sel
from qalign_repro.errors import DataError
from qalign_repro.methods.base import METHODS, Method
from qalign_repro.registry import UnknownNameError


def method_of(name: str) -> type[Method]:
    """The declarations of a stored run's method: its registered class, or, for a name no longer registered (or
    "unknown" when the meta has none), the base declarations: the sample-pool rules and a "<NAME>+" label."""
    try:
        return METHODS.get(name)
    except UnknownNameError:
        return type(f"Unregistered_{name}", (Method,), {"name": name})


def series_label(method: str, rule: str) -> str:
    """Legend / Table 1 row name before the run's distinguishing values: the paper's method name. The policy
    model belongs in titles and captions, and in the label only when runs differ in it (``assign_variants``)."""
    return f"{method_of(method).series_prefix()}{sel.RULES[rule].family}"


def numeric_beta(meta: Mapping[str, Any]) -> float:
    for value in (meta.get("beta"), cfg_get(meta, "beta")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return math.nan



def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(node, (list, tuple)):
        out[prefix] = json.dumps(node, sort_keys=True, default=str)
    else:
        out[prefix] = node


def run_identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Every stored config value that changes what a run generated or how it is scored, flattened to dotted
    keys: the keys the run name hashes (``naming.GENERATION_KEYS``), with the backend reduced to what changes
    the data, the β actually used (a calibrated ``beta=auto`` run stores it) and the model actually loaded. Two
    runs with different identities are different series; shards of one run share one."""
    from qalign_repro.store.run_names import BACKEND_IDENTITY, GENERATION_KEYS

    cfg = meta.get("config") or {}
    out: dict[str, Any] = {}
    for key in GENERATION_KEYS:
        if key not in cfg:
            continue
        value = cfg[key]
        if key == "backend" and isinstance(value, Mapping):
            value = {k: value.get(k) for k in BACKEND_IDENTITY}
        _flatten(value, key, out)
    beta = numeric_beta(meta)
    if not math.isnan(beta):
        out["beta"] = beta
    stored = meta.get("weights")
    weights: Mapping[str, Any] = stored if isinstance(stored, Mapping) else {}
    for part in ("model", "reward"):
        loaded = (meta.get(part) or {}).get("name") if isinstance(meta.get(part), Mapping) else None
        if loaded:
            out[f"{part}.name"] = loaded
        if weights.get(part):  # the weights themselves, not where they lay (runs merged from two machines)
            out.pop(f"{part}.path", None)
            out[f"{part}.weights"] = weights[part]
    # chains per prompt as the run stored them (meta or config), 1 for runs from before the option existed
    out["method.chains"] = meta.get("chains") or out.get("method.chains") or 1
    return out


#: how a distinguishing key reads in a label, and its place (keys not listed come after, alphabetically)
_LABEL_KEYS = {"beta": "β", "model.name": "model", "reward.name": "RM", "method.chains": "chains", "seed": "seed",
               "temperature": "T", "max_new_tokens": "max_new_tokens", "dataset.n": "prompts",
               "backend.name": "backend"}


def _label_part(key: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    if key.endswith(".path") and isinstance(value, str):
        value = Path(value).name or value
    if key.endswith(".weights") and isinstance(value, str):
        value = value[:8]
    name = _LABEL_KEYS.get(key) or (key.split(".", 1)[1] if key.startswith("method.") else key)
    return f"{name}={value}"


def distinguishing_keys(identities: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys whose values differ between the given runs (a key absent from a run is not a difference: an
    older run may lack an option that newer configs spell out at its default), in label order. When a model's
    name differs its other keys (path, revision, ...) are left out: the name already tells the runs apart (the
    same for the RM and the backend)."""
    keys = sorted({k for ident in identities for k in ident})
    differ = [k for k in keys if len({json.dumps(i[k], sort_keys=True, default=str)
                                      for i in identities if k in i}) > 1]
    for part in ("model", "reward", "backend"):
        if f"{part}.name" in differ:
            differ = [k for k in differ if not k.startswith(f"{part}.") or k == f"{part}.name"]
    rank = {k: i for i, k in enumerate(_LABEL_KEYS)}
    return sorted(differ, key=lambda k: (rank.get(k, len(rank)), k))


def sweep_key(identity: Mapping[str, Any]) -> str:
    """Short hash of a run's identity without β: runs that share it differ in β only (a β sweep)."""
    rest = {k: v for k, v in identity.items() if k != "beta"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _is_primary(key: str) -> bool:
    """Keys a reader compares runs by (β, models, seed, method options, ...); the others (weights fingerprints,
    context sizes, backend details, dataset paths) go into a label only when needed to tell two runs apart."""
    return key in _LABEL_KEYS or key.startswith("method.")


def assign_variants(table: pd.DataFrame, identities: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Fill ``variant`` (the run's values of the keys that differ among the runs of its method, e.g.
    "β=0.005") and append it to ``label``, so that a sweep's runs are separate series everywhere. The keys are
    found per (dataset, method) and pooled per method, so a series keeps one label across datasets. Secondary
    keys (``_is_primary``) are added only to runs whose labels would otherwise clash; runs that still share a
    label (the same values under different run names) get their run name appended."""
    table = table.copy()
    runs = table[["dataset", "method", "run"]].drop_duplicates()
    keys_of: dict[str, set[str]] = {}
    for (_ds, method), g in runs.groupby(["dataset", "method"], sort=True):
        keys_of.setdefault(method, set()).update(distinguishing_keys([identities.get(r, {}) for r in g["run"]]))
    rank = {k: i for i, k in enumerate(_LABEL_KEYS)}

    def parts(run: str, method: str, primary: bool) -> list[str]:
        ident = identities.get(run, {})
        keys = sorted(keys_of.get(method, set()), key=lambda k: (rank.get(k, len(rank)), k))
        return [_label_part(k, ident[k]) for k in keys if k in ident and _is_primary(k) == primary]

    variant = {r.run: " ".join(parts(r.run, r.method, True)) for r in runs.itertuples(index=False)}
    method_of = dict(zip(runs["run"], runs["method"]))

    def apply(v: Mapping[str, str]) -> None:
        table["variant"] = table["run"].map(v).fillna("")
        table["label"] = [f"{b} {x}" if x else b for b, x in zip(base, table["variant"])]

    base = table["label"].astype(str).tolist()
    apply(variant)
    table["sweep_key"] = table["run"].map({r: sweep_key(identities.get(r, {})) for r in runs["run"]})
    for extra in ("secondary", "run"):
        clash = table.groupby(["dataset", "label", "order", "rule"])["run"].transform("nunique") > 1
        if not clash.any():
            break
        for run in set(table.loc[clash, "run"]):
            more = parts(run, method_of[run], False) if extra == "secondary" else [run]
            variant[run] = " ".join([variant[run], *more]).strip()
        apply(variant)
    return table


def cfg_get(meta: Mapping[str, Any], *keys: str) -> Any:
    node: Any = meta.get("config") or {}
    for k in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(k)
    return node


def run_chains(meta: Mapping[str, Any], name: str) -> int:
    """Chains per prompt of a run: ``meta["chains"]``, else the stored config's ``method.chains``, else 1."""
    k = meta.get("chains")
    if k is None:
        k = cfg_get(meta, "method", "chains")
    if k is None:
        return 1
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"run {name!r} has chains={k!r} in its meta; allowed: an integer >= 1")
    return k


def required_beta(meta: Mapping[str, Any], name: str) -> float:
    """The run's beta (a calibrated ``beta=auto`` run stores the number in meta once it has one)."""
    beta = numeric_beta(meta)
    if not math.isnan(beta):
        return beta
    raise DataError(f"run {name!r} has no numeric beta in its meta (beta={meta.get('beta')!r}); "
                    "set predict.wmv_beta")
