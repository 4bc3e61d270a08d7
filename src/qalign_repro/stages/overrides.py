"""Hydra override lists as the recipe and the cost plan pass them around: which overrides belong to whom, how
lists combine, and the recipe's stages as the override lists that compose each stage's config.

Kept apart from ``plan`` (the cost model) and ``recipes`` (the runner): both build the same stages from the same
overrides, so that what the plan prices is exactly what the recipe runs, and neither has to import the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import DictConfig

from qalign_repro.config import plain_dict

#: the cost plan's own options: given on the command line even where the config has no ``plan`` section
PLAN_PREFIXES = ("plan.", "+plan.")
#: recipe-level keys: read by the recipe itself, never forwarded to the stages
RECIPE_PREFIXES = ("recipe.", "+recipe.", *PLAN_PREFIXES)


@dataclass
class StagePlan:
    stage: str                 # calibrate | run
    label: str
    overrides: list[str]       # the overrides that compose this stage's config (also the recipe's command)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(config overrides, plan.* overrides): plan options work whether or not the config has a plan section."""
    own = [o for o in overrides if o.startswith(PLAN_PREFIXES)]
    return [o for o in overrides if o not in own], own


def stage_overrides(user: Sequence[str]) -> list[str]:
    """The user's overrides that every stage receives (recipe.* and plan.* stay with the recipe)."""
    return [o for o in user if not o.startswith(RECIPE_PREFIXES)]


def merge_overrides(*groups: Sequence[str]) -> list[str]:
    """Concatenate override lists; a later value for the same key replaces the earlier one."""
    out: dict[str, str] = {}
    for group in groups:
        for o in group:
            key = o.split("=", 1)[0].lstrip("+~")
            out.pop(key, None)
            out[key] = o
    return list(out.values())


def recipe_stages(cfg: DictConfig, base: Sequence[str]) -> list[StagePlan]:
    """The recipe's stages in order: calibration (if enabled), then every job over every dataset."""
    recipe = cfg.get("recipe")
    if recipe is None:
        return [StagePlan("run", f"{cfg.method.name} {cfg.model.name}", list(base))]
    stages = []
    if recipe.get("calibrate") and recipe.calibrate.get("enabled", True):
        stages.append(StagePlan("calibrate", "calibrate beta",
                                merge_overrides(base, list(recipe.calibrate.get("overrides") or []))))
    # a mapping of dataset -> overrides; a recipe without any gets none (to_container refuses a plain {})
    ds_over = plain_dict(recipe.get("dataset_overrides") or {})
    for job in recipe.jobs:
        for ds in recipe.datasets:
            stages.append(StagePlan("run", str(job.get("label", "")),
                                    merge_overrides([f"dataset={ds}"], ds_over.get(str(ds), []),
                                                    list(job.get("overrides") or []), base)))
    return stages
