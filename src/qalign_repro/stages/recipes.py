"""``python -m qalign_repro.recipes experiment=general``: the paper's experiments as one resumable command.

Behind ``make reproduce-general`` / ``make reproduce-task``. Stages, in order:
    1. calibrate  ``python -m qalign_repro.calibrate`` picks beta for ~50 % acceptance on the calibration
                  prompts (``recipe.calibrate.overrides``) and writes <output_root>/calibration/<experiment>.json;
                  skipped when that file (or one shipped with the RM) passes the reuse rule of every stage
                  (``calibrate.reusable_calibration``: same policy, RM, dataset, weights and calibrate settings),
                  or when beta=<number> is given.
                  Without a usable file the config's beta is used, with a warning.
    2. run        every ``recipe.jobs`` entry (ancestral SFT, ancestral DPO, QAlign ...) over every
                  ``recipe.datasets`` entry, with the calibrated beta; ``recipe.shards`` > 1 turns each into a
                  Hydra multirun over ``shard.index`` on ``recipe.launcher`` (submitit_slurm, ray, ...).
    3. evaluate, 4. predict, 5. plot   over ``runs=all`` of the experiment.
Every stage is its own subprocess (a vLLM engine frees its GPU memory only when its process exits) and is
idempotent, so rerunning the command after a failure or a kill continues where it stopped: finished runs say
"nothing to do" without loading a model, partial ones resume from their last committed step.

``--dry-run`` prints the cost plan (qalign_repro.stages.plan) and the commands, and runs nothing.
``--stages run,evaluate`` runs a subset. Everything else is a Hydra override passed to every stage.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.stages.overrides import merge_overrides, recipe_stages, split_overrides, stage_overrides

STAGES = ("calibrate", "run", "evaluate", "predict", "plot")


@dataclass
class Step:
    stage: str
    label: str
    argv: list[str]
    optional_module: bool = False   # skip with a notice when the stage's module is not installed
    env: dict[str, str] = field(default_factory=dict)

    def command(self) -> str:
        return shlex.join(["python", *self.argv[1:]])


def _explicit_beta(user: Sequence[str]) -> float | None:
    for o in reversed(list(user)):
        key, _, value = o.partition("=")
        if key.lstrip("+") == "beta" and value != "auto":
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"beta={value} is invalid; allowed: a number > 0") from None
    return None


def calibration_file(cfg: DictConfig) -> Path:
    from qalign_repro.stages.calibrate import calibration_path

    return calibration_path(cfg)


def calibration_config(cfg: DictConfig, user: Sequence[str]) -> DictConfig:
    """The config the calibrate stage composes (the user's overrides, then ``recipe.calibrate.overrides``): a
    stored calibration is judged against it, not against the runs' config (their datasets differ)."""
    from qalign_repro.cli import compose_config

    return compose_config(calibrate_overrides(cfg, user))


def read_calibration(cfg: DictConfig, user: Sequence[str]) -> dict[str, Any] | None:
    """The stored calibration this recipe may use, by the one reuse rule of ``calibrate.reusable_calibration``
    (same policy, RM and dataset, same weights, same ``calibrate`` settings): the experiment's calibration file,
    else one shipped with the RM; None (with a warning for a refused file) when there is none."""
    from qalign_repro.stages.calibrate import reusable_calibration

    def refused(why: str) -> None:
        print(f"warning: {why}; not reused", file=sys.stderr)

    return reusable_calibration(calibration_config(cfg, user), on_mismatch=refused)


def pick_backend(cfg: DictConfig, user: Sequence[str]) -> str | None:
    """``recipe.backend`` when its config exists (vllm is added by its own module), else None (keep the config's)."""
    if any(o.split("=", 1)[0].lstrip("+") == "backend" for o in user):
        return None
    wanted = (cfg.get("recipe") or {}).get("backend")
    if not wanted or wanted == cfg.backend.name:
        return None
    from qalign_repro.cli import group_options

    if wanted not in group_options("backend"):
        print(f"warning: recipe.backend={wanted} is not available (conf/backend/{wanted}.yaml missing); "
              f"using backend={cfg.backend.name}", file=sys.stderr)
        return None
    if wanted == "vllm" and importlib.util.find_spec("vllm") is None:
        print(f"warning: recipe.backend=vllm but vllm is not installed (make install-vllm); using "
              f"backend={cfg.backend.name}", file=sys.stderr)
        return None
    return str(wanted)


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", f"qalign_repro.{name}"]


#: a multirun is started through the importable module, not ``-m``: launchers pickle the task function, and a
#: function of ``__main__`` is pickled by value together with module-level objects such as the method registry,
#: which then arrive empty in the submitit / Ray worker ("unknown method 'qalign'; allowed: ")
MULTIRUN_SHIM = "from qalign_repro.stages.run import main; main()"


def _beta_text(beta: float | str) -> str:
    return beta if isinstance(beta, str) else f"{beta:.6g}"


def run_steps(cfg: DictConfig, user: Sequence[str], beta: float | str) -> list[Step]:
    """One step per job x dataset (a multirun over shards when ``recipe.shards`` > 1 or a launcher is set)."""
    recipe = cfg.recipe
    base = stage_overrides(user)
    backend = pick_backend(cfg, user)
    extra = [f"beta={_beta_text(beta)}"] + ([f"backend={backend}"] if backend else [])
    shards = int(recipe.get("shards") or 1)
    launcher = recipe.get("launcher")
    steps = []
    for st in recipe_stages(cfg, base):
        if st.stage != "run":
            continue
        overrides = merge_overrides(st.overrides, extra)
        if shards > 1 or launcher:
            overrides = merge_overrides(overrides, [f"shard.count={shards}",
                                                    "shard.index=" + ",".join(str(i) for i in range(shards))])
            argv = [sys.executable, "-c", MULTIRUN_SHIM, "-m", *overrides] + (
                [f"hydra/launcher={launcher}"] if launcher else [])
        else:
            argv = [*_module("run"), *overrides]
        steps.append(Step("run", f"{st.label} / {_value(overrides, 'dataset')}", argv))
    return steps


def _value(overrides: Sequence[str], key: str) -> str:
    for o in overrides:
        k, _, v = o.partition("=")
        if k == key:
            return v
    return "?"


def later_steps(cfg: DictConfig, user: Sequence[str], beta: float | str) -> list[Step]:
    base = merge_overrides(stage_overrides(user), ["runs=all", f"beta={_beta_text(beta)}"])
    return [Step("evaluate", "grade every run", [*_module("evaluate"), *base]),
            Step("predict", "accuracy vs FLOPs tables", [*_module("predict"), *base]),
            Step("plot", "figures", [*_module("plot"), *base], optional_module=True)]


def _run(step: Step) -> None:
    if step.optional_module and importlib.util.find_spec(f"qalign_repro.{step.stage}") is None:
        print(f"[recipe] {step.stage}: qalign_repro.{step.stage} is not installed; skipped", flush=True)
        return
    print(f"[recipe] {step.stage}: {step.label}\n  $ {step.command()}", flush=True)
    try:
        proc = subprocess.run(step.argv, check=False)
    except KeyboardInterrupt:  # Ctrl-C reached the stage too, which printed its own one line
        from qalign_repro.cli import INTERRUPTED_EXIT

        raise SystemExit(INTERRUPTED_EXIT) from None
    if proc.returncode != 0:
        raise SystemExit(
            f"error: recipe stage {step.stage!r} ({step.label}) failed with exit code {proc.returncode}; fix the "
            "cause and rerun the same command: finished work is kept and skipped"
        )


def calibrate_overrides(cfg: DictConfig, user: Sequence[str]) -> list[str]:
    """Stage 1's overrides: ``recipe.calibrate.overrides`` on top of the user's (the backend aside)."""
    cal = (cfg.get("recipe") or {}).get("calibrate") or {}
    return merge_overrides(stage_overrides(user), list(cal.get("overrides") or []))


def calibrate_step(cfg: DictConfig, user: Sequence[str]) -> Step:
    """Stage 1's command: ``calibrate_overrides``, on the recipe's backend."""
    backend = pick_backend(cfg, user)
    overrides = merge_overrides(calibrate_overrides(cfg, user), [f"backend={backend}"] if backend else [])
    return Step("calibrate", "beta for the target acceptance", [*_module("calibrate"), *overrides],
                optional_module=True)


def uses_hub(cfg: DictConfig) -> bool:
    """Whether the recipe names a hub model (a path that is not a local folder) or a hub dataset."""
    for node in (cfg.model, cfg.reward):
        path = node.get("path")
        if path is not None and not Path(str(path)).expanduser().is_dir():
            return True
    text = OmegaConf.to_yaml(cfg.get("recipe") or {})
    return "source=hub" in text or cfg.dataset.get("source") == "hub"


#: what the dry run prints for the β of the later stages when stage 1 has not calibrated it yet
BETA_PLACEHOLDER = "$BETA"


def dry_run_commands(cfg: DictConfig, user: Sequence[str], beta: float | None, wanted: set[str]) -> list[str]:
    """The commands the recipe would run, in order. ``beta`` None (stage 1 will calibrate it): the list starts
    with the calibrate stage and the later commands read its result into ``$BETA``, so the plan never shows a β
    that the runs will not use."""
    pending = beta is None
    value: float | str = BETA_PLACEHOLDER if beta is None else beta
    lines = []
    if pending and "calibrate" in wanted:
        lines.append(calibrate_step(cfg, user).command())
    if pending:
        lines.append(f"BETA=$(python -c \"import json; print(json.load(open('{calibration_file(cfg)}'))['beta'])\")"
                     "   # the β the calibrate stage wrote")
    for step in run_steps(cfg, user, value) + later_steps(cfg, user, value):
        if step.stage in wanted:
            lines.append(step.command().replace(f"'beta={BETA_PLACEHOLDER}'", f'beta="{BETA_PLACEHOLDER}"'))
    return lines


def calibrate(cfg: DictConfig, user: Sequence[str], execute: bool, dry: bool = False) -> float | None:
    """Stage 1: the beta every later stage uses (see the module docstring for the fallbacks); in a dry run None
    when stage 1 would calibrate it."""
    explicit = _explicit_beta(user)
    if explicit is not None:
        print(f"[recipe] calibrate: beta={explicit:g} given on the command line; calibration skipped")
        return explicit
    recipe = cfg.get("recipe") or {}
    cal = recipe.get("calibrate") or {}
    found = read_calibration(cfg, user)
    if found is not None:
        beta = float(found["beta"])
        print(f"[recipe] calibrate: using beta={beta:.6g} from {found.get('shipped') or calibration_file(cfg)}")
        return beta
    if cal.get("enabled", True) and execute:
        _run(calibrate_step(cfg, user))
        found = read_calibration(cfg, user)
        if found is not None:
            return float(found["beta"])
    if dry and cal.get("enabled", True):
        print(f"[recipe] calibrate: not calibrated yet; the calibrate stage (the first command below) writes β to "
              f"{calibration_file(cfg)} and every later command reads it into $BETA")
        return None
    if cfg.beta == "auto":
        raise ConfigError(f"beta=auto needs a calibration in {calibration_file(cfg)}; allowed: run the calibrate "
                          "stage, or give beta=<number>")
    fallback = float(cfg.beta)
    print(f"warning: no calibration in {calibration_file(cfg)}; using beta={fallback:g} from the config",
          file=sys.stderr)
    return fallback


def main(argv: list[str] | None = None) -> None:
    """Run (or with --dry-run, plan) the recipe of the composed experiment."""
    from qalign_repro.cli import compose_config
    from qalign_repro.stages.plan import build_plan, render

    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in args
    only = None
    rest = []
    for a in args:
        if a == "--dry-run":
            continue
        if a.startswith("--stages="):
            only = [s for s in a.split("=", 1)[1].split(",") if s]
            unknown = sorted(set(only) - set(STAGES))
            if unknown:
                raise SystemExit(f"error: unknown stage(s) {unknown}; allowed: {', '.join(STAGES)}")
            continue
        rest.append(a)
    overrides, own = split_overrides(rest)
    try:
        cfg = compose_config(overrides)
        if cfg.get("recipe") is None:
            raise ConfigError(f"experiment {cfg.experiment_name!r} has no recipe section; allowed: "
                              "experiment=general, task_specific, general_smoke, recipe_tiny")
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set (e.g. reward.path=/path/to/trained/rm)")
        wanted = set(only or STAGES)
        if not dry and uses_hub(cfg):
            from qalign_repro.models.hub import offline_reason

            offline = offline_reason()  # once here; the stages inherit the offline mode and fail fast
            if offline:
                print(f"[recipe] the hub is offline ({offline}): hub models and datasets come from the local HF "
                      "cache only", file=sys.stderr)
        if dry:
            planned = calibrate(cfg, overrides, execute=False, dry=True)
            table, opts = build_plan(cfg, stage_overrides(overrides), own)
            shown = "calibrated by stage 1" if planned is None else f"{planned:g}"
            print(f"cost plan: experiment {cfg.experiment_name}, beta {shown} (dry run: nothing is run)\n")
            print(render(table, opts))
            print("\ncommands:")
            for line in dry_run_commands(cfg, overrides, planned, wanted):
                print(f"  $ {line}")
            return
        beta = calibrate(cfg, overrides, execute="calibrate" in wanted)
        assert beta is not None  # None only in a dry run (returned above)
        for step in run_steps(cfg, overrides, beta) + later_steps(cfg, overrides, beta):
            if step.stage in wanted:
                _run(step)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        from qalign_repro.cli import interrupted

        interrupted()
    print(f"[recipe] {cfg.experiment_name}: all stages done (beta={beta:g}); outputs under {cfg.output_root}")


if __name__ == "__main__":
    main()
