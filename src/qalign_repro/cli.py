"""Shared Hydra entry-point plumbing for the stages.

Hydra reports a bad override with a multi-line trace; users get one line instead: before handing control to
``hydra.main`` the overrides are composed once with the compose API and every failure is turned into
``error: <what is wrong>; allowed: <options>`` (exit 2), before any model is loaded.
"""

from __future__ import annotations

import difflib
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig

from qalign_repro.errors import (
    BackendRequestError,
    BackendUnavailableError,
    ConfigError,
    DataError,
    StorageError,
)
from qalign_repro.store import run_names as naming  # noqa: F401  registers ${model_label:} (model configs name the loaded model)

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("model", "reward", "dataset", "method", "backend", "experiment")
_USER_ERRORS = (ConfigError, DataError, StorageError, BackendUnavailableError, BackendRequestError)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        name = f"{prefix}{cast(str, k)}"  # a composed config's keys are yaml keys: str
        keys.append(name)
        if isinstance(v, DictConfig):
            keys.extend(_config_keys(v, name + "."))
    return keys


def _hydra_error_to_line(exc: Exception, overrides: list[str]) -> str:
    msg = str(exc)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", msg)
    if m:
        group, value = m.group(1), m.group(2)
        return f"{group}={value} is not a known option; allowed: {', '.join(group_options(group))}"
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        base = _compose([o for o in overrides if not o.split("=")[0].lstrip("+~").startswith(key)])
        known = _config_keys(base) if base is not None else []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown config key '{key}'{hint} (add a new key with +{key}=...)"
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return first


def _compose(overrides: list[str]) -> DictConfig | None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose and validate the config (for tests and the Python API); raises ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qalign_repro.config import remember_typed, validate

    overrides = list(overrides or [])
    remember_typed(overrides)  # errors then show numbers as typed (steps=1e3, not 1000.0)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as exc:
        raise ConfigError(_hydra_error_to_line(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def _user_overrides(argv: list[str]) -> list[str]:
    """The plain config overrides in argv (Hydra's own flags and hydra.* keys are Hydra's business)."""
    out = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
                 "--package", "-p", "--info", "-i"):
            skip = a not in ("--info", "-i")
            continue
        if a.startswith("-") or a.lstrip("+~").startswith("hydra.") or a.startswith("hydra/"):
            continue
        out.append(a)
    return out


#: Hydra flags that print (the config, help, info) and exit: they must not create the output folder
_PRINT_ONLY = frozenset({"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--resolve",
                         "--shell-completion", "-sc"})


def preflight(argv: list[str]) -> None:
    """Compose + validate the CLI overrides; exit 2 with one line on any problem."""
    if "-m" in argv or "--multirun" in argv:
        # a sweep value list (beta=0.5,1.0) is not a single config; Hydra validates each job itself
        return
    try:
        cfg = compose_config(_user_overrides(argv))
        if not any(a in _PRINT_ONLY or a.startswith(("--cfg=", "--info=")) for a in argv):
            check_output_root(Path(str(cfg.output_root)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check_output_root(root: Path) -> None:
    """Hydra writes its logs under output_root before our code runs: check it first, in one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"output_root={root} is not writable ({exc.strerror}); allowed: a writable folder") from None


def entry_point(fn: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """Turn ``fn(cfg)`` into a Hydra main with one-line errors for bad input."""
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _hydra_main(cfg: DictConfig) -> Any:
        from qalign_repro.config import validate

        try:
            validate(cfg)
            return fn(cfg)
        except _USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    def main() -> None:
        try:
            preflight(sys.argv[1:])
            _hydra_main()
        except KeyboardInterrupt:
            interrupted()

    main.__doc__ = fn.__doc__
    return main


#: the shell's exit status for a process ended by SIGINT (128 + 2)
INTERRUPTED_EXIT = 130


def interrupted() -> None:
    """Ctrl-C: one line instead of a traceback, and exit 130. Every stage writes in transactions, so what was
    stored before the interrupt is whole; the line says how far it got (``progress_note``) and how to go on."""
    from qalign_repro import progress_note

    done = progress_note.last()
    print(f"interrupted{f' after {done}' if done else ''}; the stored data are intact; rerun the same command "
          "to resume", file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_EXIT)
