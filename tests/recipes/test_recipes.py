"""The recipe driver: stage order, beta from the calibration file (or the config, with a warning), sharded
multiruns, dry runs that run nothing, and an end-to-end tiny recipe that a rerun continues."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qalign_repro.cli import compose_config
from qalign_repro.stages import recipes
from qalign_repro.store.storage import list_runs


def _cfg(tmp_path, *extra):
    over = ["experiment=recipe_tiny", f"output_root={tmp_path}", *extra]
    return compose_config(over), over


def test_run_steps_cover_every_job_and_dataset_in_order(tmp_path):
    cfg, over = _cfg(tmp_path)
    steps = recipes.run_steps(cfg, over, beta=0.25)
    assert [s.argv[s.argv.index("-m") + 1] for s in steps] == ["qalign_repro.run"] * 2
    methods = [next(a for a in s.argv if a.startswith("method=")) for s in steps]
    assert methods == ["method=ancestral", "method=qalign"]  # ancestral pools before the chains
    assert all("beta=0.25" in s.argv and "dataset=arith" in s.argv and "dataset.n=8" in s.argv for s in steps)
    later = [s.stage for s in recipes.later_steps(cfg, over, 0.25)]
    assert later == ["evaluate", "predict", "plot"]


def test_user_overrides_win_and_recipe_keys_stay_with_the_recipe(tmp_path):
    cfg, over = _cfg(tmp_path, "dataset.n=3", "plan.tokens_per_s=10")
    (first, _) = recipes.run_steps(cfg, over, beta=1.0)
    assert "dataset.n=3" in first.argv and "dataset.n=8" not in first.argv
    assert not any(a.startswith("plan.") for a in first.argv)


def test_sharded_recipe_is_a_multirun_on_the_launcher(tmp_path):
    cfg, over = _cfg(tmp_path, "recipe.shards=4", "recipe.launcher=submitit_slurm")
    step = recipes.run_steps(cfg, over, beta=1.0)[0]
    assert step.argv[1:3] == ["-c", recipes.MULTIRUN_SHIM] and "-m" in step.argv
    assert "shard.count=4" in step.argv and "shard.index=0,1,2,3" in step.argv
    assert step.argv[-1] == "hydra/launcher=submitit_slurm"


def _stored_calibration(cfg, over, **changes):
    """What ``python -m qalign_repro.calibrate`` writes for the recipe's calibrate stage, with ``changes``."""
    from qalign_repro.models.folders import model_fingerprints
    from qalign_repro.stages.calibrate import calibration_settings

    stage = recipes.calibration_config(cfg, over)
    return {"beta": 0.37, "model": str(stage.model.name), "reward": str(stage.reward.name),
            "dataset": str(stage.dataset.name), "settings": calibration_settings(stage),
            "weights": model_fingerprints(stage), **changes}


def test_beta_comes_from_the_calibration_file(tmp_path, capsys):
    cfg, over = _cfg(tmp_path)
    assert recipes.calibrate(cfg, over, execute=False) == pytest.approx(1.0)  # nothing yet: the config's value
    path = tmp_path / "calibration" / f"{cfg.experiment_name}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_stored_calibration(cfg, over)))
    assert recipes.calibrate(cfg, over, execute=False) == pytest.approx(0.37)
    assert recipes.calibrate(cfg, [*over, "beta=2"], execute=False) == 2.0  # explicit beta wins
    path.write_text(json.dumps(_stored_calibration(cfg, over, model="other")))
    assert recipes.read_calibration(cfg, over) is None  # calibrated for another policy: not reused
    assert "was calibrated for model other (this config: tiny)" in capsys.readouterr().err


@pytest.mark.parametrize(("changes", "why"), [
    ({"weights": {"model": "0" * 16, "reward": "1" * 16}}, "other weights"),
    ({"dataset": "gsm8k"}, "dataset gsm8k (this config: arith)"),
    ({"reward": "toy"}, "reward toy (this config: tiny)"),
    ({"settings": "stage settings"}, "unrecorded calibrate settings"),
])
def test_recipe_refuses_a_calibration_made_for_other_weights_dataset_or_models(tmp_path, capsys, changes, why):
    """The recipe applies the same reuse rule as ``beta=auto`` runs (calibrate.reusable_calibration): before,
    it compared the model names only and reused a β measured on other weights or another dataset."""
    cfg, over = _cfg(tmp_path)
    path = tmp_path / "calibration" / f"{cfg.experiment_name}.json"
    path.parent.mkdir(parents=True)
    stored = _stored_calibration(cfg, over, **changes)
    if changes.get("settings") == "stage settings":
        del stored["settings"]  # a file from before the settings were recorded
    path.write_text(json.dumps(stored))
    assert recipes.read_calibration(cfg, over) is None
    assert why in capsys.readouterr().err
    assert recipes.calibrate(cfg, over, execute=False) == pytest.approx(float(cfg.beta))  # the config's, warned


def test_recipe_judges_a_calibration_by_the_calibrate_stages_settings(tmp_path, capsys):
    """The calibrate stage runs with ``recipe.calibrate.overrides`` (calibrate.split=train here): a file made
    with other calibrate settings, or without those overrides, is refused; the matching one is reused."""
    cfg, over = _cfg(tmp_path)
    path = tmp_path / "calibration" / f"{cfg.experiment_name}.json"
    path.parent.mkdir(parents=True)
    matching = _stored_calibration(cfg, over)
    assert matching["settings"]["split"] == "train" and matching["settings"]["prompts"] == 4
    for key, value in (("prompts", 8), ("split", None), ("count", "changed")):
        path.write_text(json.dumps({**matching, "settings": {**matching["settings"], key: value}}))
        assert recipes.read_calibration(cfg, over) is None, key
        assert f"other calibrate settings ({key}=" in capsys.readouterr().err
    path.write_text(json.dumps(matching))
    assert recipes.read_calibration(cfg, over)["beta"] == 0.37
    # the user's calibrate.* overrides reach the calibrate stage, so they change what matches
    assert recipes.read_calibration(compose_config([*over, "calibrate.prompts=8"]), [*over, "calibrate.prompts=8"]) is None
    # a file from before fingerprints were stored: taken as made with the current weights
    path.write_text(json.dumps({k: v for k, v in matching.items() if k != "weights"}))
    assert recipes.calibrate(cfg, over, execute=False) == pytest.approx(0.37)


def test_missing_calibration_falls_back_to_config_beta_with_a_warning(tmp_path, capsys):
    cfg, over = _cfg(tmp_path, "recipe.calibrate.enabled=false")
    assert recipes.calibrate(cfg, over, execute=True) == pytest.approx(float(cfg.beta))
    assert "no calibration" in capsys.readouterr().err


def test_dry_run_prints_plan_and_commands_and_runs_nothing(tmp_path, capsys):
    recipes.main(["experiment=recipe_tiny", f"output_root={tmp_path}", "--dry-run", "plan.measure=none"])
    out = capsys.readouterr().out
    assert "cost plan" in out and "GPU-h" in out and "$ python -m qalign_repro.run" in out
    assert "python -m qalign_repro.predict" in out
    assert list_runs(tmp_path) == [] and not (tmp_path / "calibration").exists()


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit, match="unknown stage"):
        recipes.main(["experiment=recipe_tiny", "--stages=run,fly"])


@pytest.mark.slow
def test_tiny_recipe_end_to_end_and_rerun_continues(tmp_path):
    """calibrate -> ancestral -> QAlign -> evaluate -> predict (-> plot) on the tiny models; a second invocation
    finds everything done and changes nothing."""
    args = [sys.executable, "-m", "qalign_repro.recipes", "experiment=recipe_tiny", f"output_root={tmp_path}",
            "steps=3", "recipe.dataset_overrides.arith=['dataset.n=4']", "calibrate.prompts=2",
            "calibrate.steps=2", "calibrate.iterations=1", "calibrate.pair_draws=1", "max_new_tokens=48"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    calib = json.loads(next((tmp_path / "calibration").glob("*.json")).read_text())
    beta = calib["beta"]
    names = list_runs(tmp_path)
    assert len(names) == 2 and all(f"-b{beta:.6g}-" in n for n in names)  # runs use the calibrated beta
    assert list((tmp_path / "predictions").rglob("predictions.csv"))
    second = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("nothing to do") >= 2 + 2  # both runs and both evaluations were already done
    assert f"using beta={beta:.6g}" in second.stdout
    assert list_runs(tmp_path) == names
