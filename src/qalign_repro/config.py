"""Validation of the composed config: every bad value stops the program with one line, before any model loads.

Hydra checks structure (unknown groups/keys, see cli.py); this module checks values and cross-field rules
such as exactness (QAlign targets p(y|x)·exp(r/β) only when proposals are drawn from the model itself at
temperature 1).
"""

from __future__ import annotations

import math
import re
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from qalign_repro.errors import ConfigError
from qalign_repro.registry import Registry, UnknownNameError


def _number(cfg: DictConfig, key: str) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number" + ("; allowed: a number > 0, or auto" if key == "beta" else ""))
    return float(value)


#: the command line's values as typed (key -> text): Hydra parses ``steps=1e3`` to 1000.0, and an error that
#: says "steps=1000.0 is invalid" names a value the user never wrote
_TYPED: dict[str, str] = {}


def remember_typed(overrides: list[str]) -> None:
    """Record the override texts of the config about to be validated (cli.compose_config)."""
    _TYPED.clear()
    for o in overrides:
        key, sep, text = o.partition("=")
        if sep:
            _TYPED[key.lstrip("+~")] = text


def shown(key: str, value: Any) -> str:
    """``key=value`` for a message, the number as the user typed it when it came from the command line."""
    typed = _TYPED.get(key)
    if typed is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            if float(typed) == float(value):
                return f"{key}={typed}"
        except ValueError:
            pass
    return f"{key}={value!r}"


def positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{shown(key, value)} is invalid; allowed: an integer >= {minimum}")
    return value


def _check_name(registry_name: str, name: Any) -> None:
    from qalign_repro.lm import GENERATORS
    from qalign_repro.methods import METHODS
    from qalign_repro.rm import REWARDS
    from qalign_repro.tasks import TASKS

    registries: dict[str, Registry[Any]] = {"method": METHODS, "dataset": TASKS, "backend.generator": GENERATORS,
                                            "backend.reward": REWARDS}
    registry = registries[registry_name]
    try:
        registry.get(str(name))
    except UnknownNameError as exc:
        raise ConfigError(f"{registry_name}={name}: {exc}") from None


def _check_method_options(cfg: DictConfig) -> None:
    """Constructing a method loads no model, and its constructor rejects bad options: do it before a run
    folder is created."""
    from qalign_repro.methods import METHODS

    try:
        METHODS.get(str(cfg.method.name))(cast(dict[str, Any], OmegaConf.to_container(cfg.method, resolve=True)))
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"method.{cfg.method.name}: {exc}") from None


_SECRET = re.compile(r"(^|_)(api_key|apikey|secret|password|token)$", re.IGNORECASE)


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _walk(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _walk(v, f"{path}[{i}]")]
    return [(path, node)]


def _check_values_everywhere(cfg: DictConfig) -> None:
    """NaN/inf anywhere would poison a run; a secret in the config would be stored in the run's meta."""
    for path, value in _walk(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value} is not a finite number; allowed: a finite number")
        key = path.rsplit(".", 1)[-1]
        if _SECRET.search(key) and value not in (None, "", "???"):
            raise ConfigError(
                f"{path} holds a secret in the config, which would be stored with the run; "
                f"allowed: put it in an environment variable and name it in {key}_env"
            )


def validate(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = "pkg.module:function" if missing[0].endswith("target") else "/path/or/hub-id"
        raise ConfigError(f"{missing[0]} must be set (it is ??? in the config); e.g. {missing[0]}={example}")
    if cfg.beta != "auto":
        beta = _number(cfg, "beta")
        if not math.isfinite(beta) or beta <= 0:
            raise ConfigError(f"{shown('beta', cfg.beta)} is invalid; allowed: a finite number > 0, or auto")
    temperature = _number(cfg, "temperature")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"{shown('temperature', cfg.temperature)} is invalid; allowed: a finite number > 0")
    positive_int(cfg.steps, "steps")
    positive_int(cfg.max_new_tokens, "max_new_tokens")
    positive_int(cfg.batch_size, "batch_size")
    schedule = cfg.get("schedule", "auto")
    if schedule not in ("auto", "lockstep", "async"):
        raise ConfigError(f"schedule={schedule!r} is not a known option; allowed: auto, lockstep, async")
    for key in ("in_flight", "rm_batch"):
        if cfg.get(key) is not None:
            positive_int(cfg.get(key), key)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"{shown('seed', cfg.seed)} is invalid; allowed: an integer >= 0")
    n = cfg.dataset.get("n")
    if n is not None:
        positive_int(n, "dataset.n")

    shard = cfg.get("shard") or {"index": 0, "count": 1}
    count = positive_int(shard.get("count", 1), "shard.count")
    index = shard.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"shard.index={index!r} is invalid; allowed: 0..{count - 1} for shard.count={count}")

    _check_name("method", cfg.method.name)
    _check_method_options(cfg)
    from qalign_repro.methods import METHODS

    method = METHODS.get(str(cfg.method.name))  # its declarations (methods/base.py), never its name
    if schedule == "async":
        if not method.per_request:
            raise ConfigError(f"schedule=async needs a method that makes one request per output; method="
                              f"{cfg.method.name} runs batched steps only; allowed: schedule=lockstep or schedule=auto")
    _check_name("dataset", cfg.dataset.name)
    _check_name("backend.generator", cfg.backend.generator)
    _check_name("backend.reward", cfg.backend.reward)

    if method.exact_only_at_temperature_one and temperature != 1.0 and not cfg.allow_inexact:
        raise ConfigError(
            f"temperature={cfg.temperature} with method={cfg.method.name} breaks exactness (the proposal must be "
            "the model at temperature 1); allowed: temperature=1.0, or set allow_inexact=true"
        )
    context = cfg.model.get("max_context")
    if context is not None and cfg.max_new_tokens >= int(context):
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} does not fit the model context ({context} tokens); "
            f"allowed: < {context} minus the prompt length"
        )
    if cfg.get("run_name") is not None:
        from qalign_repro.errors import StorageError
        from qalign_repro.store.storage import check_run_name

        try:
            check_run_name(str(cfg.run_name))
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
    _check_values_everywhere(cfg)


def plain_dict(node: Any) -> dict[str, Any]:
    """A config mapping as a plain, resolved ``dict`` (``OmegaConf.to_container`` is typed as any container; the
    groups this package reads are mappings, so a non-mapping here is a bug, not user input)."""
    out: Any = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(out, dict):
        raise TypeError(f"expected a config mapping, got {type(out).__name__}")
    return out
