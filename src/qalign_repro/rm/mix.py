"""A weighted sum of named rewards: ``reward=mix`` (e.g. the RM + a length penalty + a verifier).

Why a mix and not a new RM: QAlign's target p(y|x)·exp(r/β) takes any scalar r, so r = Σ w_c·r_c shapes the
target with rules and verifiers next to the learned RM, and each part stays a reward of its own, testable alone.
The sum is computed in float64 in component order, so it equals Σ w_c·r_c exactly.

``build_reward`` is the one place a reward config becomes a reward object (run.build_backends, api.load_reward):
``kind: python`` -> rm/python.py, ``kind: mix`` -> this module, otherwise (``kind: model`` or no kind) the
backend's reward class (``backend.reward``: hf, vllm, openai, toy), so a mix runs with any backend and its model
components are built with that backend's class.

FLOPs: the stored ``tokens_scored`` of a mix counts only what its model components read. With one model
component it is exactly that component's tokens and the mix's ``n_params`` is its parameters; with several,
each one's tokens are scaled by ``n_params_c / n_params`` (the largest component's), so 2·n_params·tokens is
their summed cost (rounded to whole tokens). Python components add 0; ``describe`` records each component's
kind, weight and parameters in the run meta, so tables can say "python: 0 FLOPs".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from qalign_repro.errors import ConfigError
from qalign_repro.rm.base import Scores
from qalign_repro.rm.python import checked_value

KINDS = ("model", "python", "mix")


def build_reward(reward_cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None, model_cls: Any) -> Any:
    """The reward object for a reward config; ``model_cls`` builds ``kind: model`` rewards (the backend's)."""
    kind = reward_cfg.get("kind") or "model"
    if kind not in KINDS:
        raise ConfigError(f"reward.kind={kind!r} is not a known reward kind; allowed: {', '.join(KINDS)}")
    if kind == "python":
        from qalign_repro.rm.python import PythonReward

        return PythonReward(reward_cfg, backend_cfg)
    if kind == "mix":
        return MixReward.from_config(reward_cfg, backend_cfg, model_cls)
    return model_cls(reward_cfg, backend_cfg)


def component_config(spec: Any) -> dict[str, Any]:
    """A component's reward config: a ``conf/reward`` entry by name, or an inline mapping."""
    if isinstance(spec, Mapping):
        return dict(spec)
    from omegaconf import OmegaConf

    from qalign_repro.cli import CONF_DIR

    path = CONF_DIR / "reward" / f"{spec}.yaml"
    if not isinstance(spec, str) or spec in ("mix", "python") or not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "reward").glob("*.yaml") if p.stem not in ("mix", "python"))
        raise ConfigError(f"reward.components: reward={spec!r} is not a reward config; allowed: an inline "
                          f"mapping or one of {', '.join(known)}")
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(path), resolve=True))


@dataclass
class Component:
    label: str
    weight: float
    reward: Any


class MixReward:
    """Σ weight_c · reward_c over its components (see the module docstring)."""

    name = "mix"
    kind = "mix"

    def __init__(self, components: Sequence[tuple[Any, float]], label: str = "mix"):
        """``components``: (reward object, weight) pairs; also the Python API's constructor."""
        if not components:
            raise ConfigError("reward.components is empty; allowed: a list of {reward: <name or mapping>, "
                              "weight: <number>}")
        self.components = []
        for reward, weight in components:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise ConfigError(f"reward.components: weight={weight!r} is invalid; allowed: a finite number")
            part = str(getattr(reward, "label", None) or getattr(reward, "name", "?"))
            self.components.append(Component(part, float(weight), reward))
        self.label = label
        sizes = [int(c.reward.n_params) for c in self.components if self._is_model(c)]
        self.n_params = max(sizes, default=0)
        self.max_context = min(int(c.reward.max_context) for c in self.components)
        self.path = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], backend_cfg: Mapping[str, Any] | None, model_cls: Any
                    ) -> MixReward:
        specs = cfg.get("components")
        if not isinstance(specs, Sequence) or isinstance(specs, str) or not specs:
            raise ConfigError(f"reward.components={specs!r} is invalid; allowed: a non-empty list of "
                              "{reward: <name or mapping>, weight: <number>}")
        parsed = []
        for spec in specs:
            if not isinstance(spec, Mapping) or "reward" not in spec or "weight" not in spec:
                raise ConfigError(f"reward.components entry {spec!r} is invalid; allowed: {{reward: <a conf/reward "
                                  "name or an inline mapping>, weight: <number>}")
            sub = component_config(spec["reward"])
            weight = spec["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"reward.components: weight={weight!r} of {sub.get('name')!r} is not a number; "
                                  "allowed: a finite number")
            parsed.append((sub, weight))
        built: list[tuple[Any, float]] = []
        try:
            for sub, weight in parsed:
                reward = build_reward(sub, backend_cfg, model_cls)
                if getattr(reward, "kind", "model") == "model" and sub.get("name"):
                    reward.label = str(sub["name"])
                built.append((reward, weight))
        except BaseException:
            for reward, _ in built:
                reward.close()
            raise
        return cls(built, label=str(cfg.get("name") or "mix"))

    @staticmethod
    def _is_model(c: Component) -> bool:
        return getattr(c.reward, "kind", "model") == "model" or isinstance(c.reward, MixReward)

    def score(self, prompts: list[list[dict[str, str]]], completions: list[str]) -> Scores:
        total = np.zeros(len(completions), dtype=np.float64)
        tokens = np.zeros(len(completions), dtype=np.float64)
        for c in self.components:
            res = c.reward.score(prompts, completions)
            values = [checked_value(c.label, v, t) for v, t in zip(res.rewards, completions)]
            total += c.weight * np.asarray(values, dtype=np.float64)
            if self.n_params and c.reward.n_params:
                tokens += np.asarray(res.tokens, dtype=np.float64) * (float(c.reward.n_params) / self.n_params)
        return Scores(rewards=total, tokens=[int(round(t)) for t in tokens])

    def describe(self) -> dict[str, Any]:
        """The run meta's record of the mix: per component its kind, weight and parameters (python: 0 FLOPs)."""
        parts = []
        for c in self.components:
            info = c.reward.describe() if hasattr(c.reward, "describe") else {
                "kind": "model", "name": c.label, "n_params": int(c.reward.n_params),
                "path": getattr(c.reward, "path", None)}
            parts.append({**info, "weight": c.weight})
        return {"kind": "mix", "name": self.label, "n_params": self.n_params, "components": parts}

    def backends(self) -> list[Any]:
        """The model components (for CPU thread tuning)."""
        out = []
        for c in self.components:
            out += c.reward.backends() if isinstance(c.reward, MixReward) else (
                [c.reward] if self._is_model(c) else [])
        return out

    def close(self) -> None:
        for c in self.components:
            c.reward.close()


def describe_reward(reward: Any) -> dict[str, Any]:
    """Extra run-meta fields for python and mix rewards ({} for a plain model)."""
    return reward.describe() if getattr(reward, "kind", "model") in ("python", "mix") else {}


def thread_backends(reward: Any) -> list[Any]:
    """The objects that run a model on the CPU: the reward itself, a mix's model components, or none."""
    kind = getattr(reward, "kind", "model")
    return reward.backends() if kind == "mix" else ([] if kind == "python" else [reward])
