"""Rewards of a second reward model, stored next to a run: what ``evaluate.rescore`` writes and
``predict.reward`` reads ("BoN under another RM" studies: select with one RM, judge the choice by the grades).

A rescore is the eval ``reward:<RM name>`` of the run: one entry per instance, ``{"id", "reward": [one float
per stored output, in step order], "tokens": [RM tokens read per output]}``, shaped like ``grades`` so fsck
checks it the same way. The run's meta key ``rescored`` records, per eval, which reward config, weights
(fingerprint) and reward backend made it: a rerun with the same RM scores only outputs it has not scored yet
(the run gained steps, or the previous rescore was interrupted) and a rerun with other weights starts over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qalign_repro.errors import ConfigError, DataError

#: the eval names of rescores start with this; the rest is the RM's name
PREFIX = "reward:"
#: the run meta key that records how each rescore was made
META_KEY = "rescored"


def eval_name(reward_name: str) -> str:
    """The eval that holds the rewards of the reward model called ``reward_name``."""
    return f"{PREFIX}{reward_name}"


def rescored_folder(name: str | None) -> str | None:
    """``reward:<RM>`` -> ``reward-<RM>``: the folder and file suffix of predict tables selected with the rescore
    eval ``name`` (None: the run's own rewards, the usual paths)."""
    return None if name is None else name.replace(PREFIX, PREFIX[:-1] + "-", 1)


def rescores_of(meta: Mapping[str, Any]) -> list[str]:
    """The rescore evals a run's meta records (sorted)."""
    return sorted((meta.get(META_KEY) or {}).keys())


def selection_reward(value: Any) -> str | None:
    """``predict.reward`` checked: None (the run's own rewards) or the name of a rescore eval."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(PREFIX) or value == PREFIX:
        raise ConfigError(f"predict.reward={value!r} is invalid; allowed: null or a rescore eval {PREFIX}<RM name> "
                          "(written by evaluate.rescore=<RM>)")
    return value


def read_rescored(store: Any, name: str, n: int) -> np.ndarray:
    """Rewards ``[instances, n]`` (float64) of the first ``n`` outputs of every instance from the rescore eval
    ``name`` (a ``RunStore`` or a merged sharded run); a one-line DataError when the run has no such eval or it
    covers fewer outputs (the run gained steps since: rerun evaluate with the same ``evaluate.rescore``)."""
    run = getattr(store, "name", "?")
    if not store.has_eval(name):
        held = rescores_of(store.meta)
        raise DataError(f"run {run!r} has no rescore eval {name!r}; allowed: "
                        f"{', '.join(held) if held else 'none yet (python -m qalign_repro.evaluate evaluate.rescore=<RM>)'}")
    entries = store.read_eval(name)
    if len(entries) != store.n_instances():
        raise DataError(f"run {run!r}: eval {name!r} covers {len(entries)} prompts, the store has "
                        f"{store.n_instances()}; rerun evaluate with the same evaluate.rescore")
    short = [i for i, e in enumerate(entries) if len(e.get("reward") or []) < n]
    if short:
        raise DataError(f"run {run!r}: eval {name!r} scores {len(entries[short[0]].get('reward') or [])} outputs of "
                        f"instance {short[0]}, predict needs {n}; rerun evaluate with the same evaluate.rescore")
    return np.array([[np.nan if v is None else v for v in e["reward"][:n]] for e in entries], dtype=np.float64)
