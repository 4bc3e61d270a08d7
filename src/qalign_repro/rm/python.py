"""A reward the user writes in Python: ``reward=python reward.target=pkg.module:function``.

Why: length penalties, verifiers and rule-based scores are a few lines of Python, and QAlign's target
p(y|x)·exp(r/β) accepts any scalar r. Such a reward reads no tokens with a model, so it costs 0 model FLOPs
(``n_params = 0``, ``tokens = 0``) and the FLOPs tables charge it nothing, honestly.

The target is ``callable(messages, completion_text) -> float``; with ``batched: true`` it is
``callable(list of messages, list of texts) -> list of floats`` (one call per micro-batch, for rewards that are
cheaper in bulk); with ``args`` (a mapping) the target is a factory, called once as ``target(**args)``, that
returns the callable. A bad target is a ConfigError at construction (before a run folder exists); a value that
is not a real number, or is NaN/inf, stops the step before anything is stored.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.methods.base import NonFiniteRewardError
from qalign_repro.rm.base import Scores

TARGET_FORM = "'package.module:function' naming an importable callable"


def resolve_target(target: Any, args: Mapping[str, Any] | None = None, key: str = "reward.target") -> Callable:
    """The callable behind ``target`` (a ``module:attr`` string or a callable), one ConfigError line otherwise."""
    if callable(target) and not isinstance(target, str):
        fn = target
    else:
        text = str(target) if target is not None else ""
        module, sep, attr = text.partition(":")
        if not sep or not module or not attr:
            raise ConfigError(f"{key}={target!r} is not of the form {TARGET_FORM}")
        try:
            obj: Any = importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{key}={text!r}: module {module!r} cannot be imported ({exc}); allowed: "
                              f"{TARGET_FORM}") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"{key}={text!r}: module {module!r} has no attribute {attr!r}; allowed: "
                                  f"{TARGET_FORM}")
            obj = getattr(obj, part)
        fn = obj
    if not callable(fn):
        raise ConfigError(f"{key}={target!r} is a {type(fn).__name__}, not callable; allowed: {TARGET_FORM}")
    if args is not None:
        if not isinstance(args, Mapping):
            raise ConfigError(f"reward.args={args!r} is not a mapping; allowed: null or keyword arguments of the "
                              "factory named by reward.target")
        fn = fn(**dict(args))
        if not callable(fn):
            raise ConfigError(f"{key}={target!r} called with reward.args returned a {type(fn).__name__}, not a "
                              "callable; allowed: a factory that returns callable(messages, text) -> float")
    return fn


def checked_value(label: str, value: Any, text: str) -> float:
    """A reward value as a float: a real number (bools count as 0/1), finite; else one line naming the reward."""
    if not isinstance(value, numbers.Real):
        raise DataError(f"reward {label!r} returned {value!r:.60} ({type(value).__name__}) for {text[:60]!r}; "
                        "allowed: a finite real number; nothing was stored for this step")
    out = float(value)
    if not math.isfinite(out):
        raise NonFiniteRewardError(f"reward {label!r} returned {out} for {text[:60]!r}; allowed: a finite real "
                                   "number; nothing was stored for this step; fix the reward and rerun to resume")
    return out


class PythonReward:
    """A reward model protocol object around a user callable; see the module docstring."""

    name = "python"
    kind = "python"

    def __init__(self, reward_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None = None):
        cfg = dict(reward_cfg or {})
        self.target = cfg.get("target")
        self.fn = resolve_target(self.target, cfg.get("args"))
        self.batched = bool(cfg.get("batched", False))
        named = cfg.get("name") not in (None, "", "python")  # the yaml's default name says less than the target
        self.label = str(cfg["name"] if named else self.target if isinstance(self.target, str)
                         else getattr(self.fn, "__name__", "python"))
        self.n_params = 0  # no model reads the text: 0 model FLOPs
        self.max_context = 10**9
        self.path = None

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        if self.batched:
            values = self.fn(list(prompts), list(completions))
            if isinstance(values, np.ndarray):
                values = values.tolist()
            if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(completions):
                got = f"{len(values)} values" if isinstance(values, Sequence) else f"a {type(values).__name__}"
                raise DataError(f"batched reward {self.label!r} returned {got} for {len(completions)} completions; "
                                "allowed: a list of one real number per completion; nothing was stored for this step")
        else:
            values = [self.fn(p, c) for p, c in zip(prompts, completions)]
        rewards = np.array([checked_value(self.label, v, c) for v, c in zip(values, completions)], dtype=np.float64)
        return Scores(rewards=rewards, tokens=[0] * len(completions))

    def describe(self) -> dict[str, Any]:
        """What the run meta records: the target, and that it costs no model FLOPs."""
        target = self.target if isinstance(self.target, str) else getattr(self.target, "__qualname__", "?")
        return {"kind": "python", "name": self.label, "target": target, "n_params": 0, "flops": 0}

    def close(self) -> None:
        pass
