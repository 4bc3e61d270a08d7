"""The composed config's ``model`` / ``reward`` / ``backend`` groups turned into a generator and a reward model.

Its own module because every stage that loads models needs it (run, calibrate, evaluate's ``rescore``) and the
benchmarks too: living in the run stage, it made calibrate and run import each other (issue 17).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf


def _backend(cfg: DictConfig) -> dict[str, Any]:
    return cast(dict[str, Any], OmegaConf.to_container(cfg.backend, resolve=True))


def _reward_class(cfg: DictConfig) -> Any:
    from qalign_repro.rm import REWARDS

    return REWARDS.get(str(cfg.backend.reward))


def build_reward_model(cfg: DictConfig, reward: Mapping[str, Any] | None = None, rm_cls: Any = None) -> Any:
    """The reward model of ``reward`` (a reward group node; None = ``cfg.reward``) on ``cfg.backend``'s reward
    backend (``rm_cls``, looked up when None); ``kind: python | mix`` configs are built by
    ``rm.mix.build_reward`` first."""
    from qalign_repro.rm.mix import build_reward

    node = cast(dict[str, Any], OmegaConf.to_container(cfg.reward, resolve=True)) if reward is None else dict(reward)
    return build_reward(node, _backend(cfg), _reward_class(cfg) if rm_cls is None else rm_cls)


def build_backends(cfg: DictConfig) -> tuple[Any, Any]:
    """(generator, reward model) of the config. Both backend names are looked up before anything loads (an
    unknown one fails in one line), the generator is made first, then CPU threads are tuned for both
    (``models.threads``)."""
    from qalign_repro.lm import GENERATORS

    gen_cls = GENERATORS.get(str(cfg.backend.generator))
    rm_cls = _reward_class(cfg)
    generator = gen_cls(OmegaConf.to_container(cfg.model, resolve=True), _backend(cfg))
    reward = build_reward_model(cfg, rm_cls=rm_cls)
    from qalign_repro.models.threads import tune_cpu_threads
    from qalign_repro.rm.mix import thread_backends

    tune_cpu_threads(generator, *thread_backends(reward))  # tiny CPU models: one torch thread (see threads.py)
    return generator, reward
