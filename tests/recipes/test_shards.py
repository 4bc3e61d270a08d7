"""Shards merge back into exactly the unsharded run: same prompts in the same order, same outputs, same
predictions; a missing or unfinished shard is an error that names it."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from recipes._recipe_helpers import TOY, comparable, hash_grades, instances, make_toy_run

from qalign_repro.store.shards import MergedRun, ShardError, check_group, group_runs, iter_group_instances
from qalign_repro.store.storage import list_runs

N, STEPS = 7, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One unsharded toy QAlign run and the same run in 3 shards (7 prompts: shard sizes 3, 2, 2)."""
    root = tmp_path_factory.mktemp("shards")
    whole = make_toy_run(root, n=N, steps=STEPS)
    shards = [make_toy_run(root, "shard.count=3", f"shard.index={i}", n=N, steps=STEPS) for i in (2, 0, 1)]
    return root, whole, shards


def test_group_runs_sorts_shards_and_keeps_single_runs(runs):
    root, whole, shards = runs
    groups = group_runs(root, list_runs(root))
    assert groups[whole] == [whole]
    # shards share the unsharded run's name as their group (same config hash); both variants are stored here,
    # so the sharded one is keyed by its shard count and never pooled with the unsharded run
    assert groups[f"{whole}.shards3"] == sorted(shards, key=lambda n: int(n.split(".shard")[1].split("of")[0]))
    assert group_runs(root, shards) == {whole: groups[f"{whole}.shards3"]}


def test_merged_instances_equal_unsharded_run(runs):
    root, whole, shards = runs
    members = group_runs(root, shards)[whole]
    merged = list(iter_group_instances(root, members))
    reference = instances(root, whole)
    assert [comparable(i) for i in merged] == [comparable(i) for i in reference]
    assert [i["input"]["idx"] for i in merged] == list(range(N))
    assert [i["input"]["shard"]["index"] for i in merged] == [k % 3 for k in range(N)]


def test_merged_run_view_matches(runs):
    root, whole, shards = runs
    for name in [whole, *shards]:
        hash_grades(root, name)
    with MergedRun(root, group_runs(root, shards)[whole], require_done=True) as merged:
        assert merged.name == whole
        assert merged.n_instances() == N and merged.steps_done() == STEPS
        assert merged.meta["status"] == "done"
        assert merged.meta["doc_ids"] == instances_ids(root, whole)
        assert merged.read_eval("grades") == _grades(root, whole)


def instances_ids(root, name):
    return [i["input"]["id"] for i in instances(root, name)]


def _grades(root, name):
    from qalign_repro.store.storage import RunStore

    store = RunStore(root, name, readonly=True)
    try:
        return store.read_eval("grades")
    finally:
        store.close()


def test_missing_shard_is_named(runs):
    root, whole, shards = runs
    two = [s for s in shards if ".shard1of3" not in s]
    with pytest.raises(ShardError, match=r"missing shard\(s\): .*\.shard1of3 .*shard\.index=1"):
        check_group(root, whole, sorted(two))
    with pytest.raises(ShardError, match=r"shard1of3, .*shard2of3"):
        MergedRun(root, [s for s in shards if ".shard0of3" in s])  # a lone shard is not a run


def test_unfinished_shard_is_named(tmp_path):
    a = make_toy_run(tmp_path, "shard.count=2", "shard.index=0", n=4, steps=3)
    b = make_toy_run(tmp_path, "shard.count=2", "shard.index=1", n=4, steps=2)  # fewer steps: not complete
    from qalign_repro.store.storage import RunStore

    store = RunStore(tmp_path, b)
    store.update_meta(steps=3)  # as if the run was asked for 3 steps and killed after 2
    store.close()
    with pytest.raises(ShardError, match=r"unfinished shard\(s\): .*shard1of2 \(2/3 steps"):
        check_group(tmp_path, a.split(".shard")[0], [a, b])
    assert check_group(tmp_path, a.split(".shard")[0], [a, b], require_done=False) == 2


def test_shards_of_different_runs_are_refused(tmp_path):
    a = make_toy_run(tmp_path, "shard.count=2", "shard.index=0", n=2, steps=2)  # 1 prompt
    b = make_toy_run(tmp_path, "shard.count=2", "shard.index=1", n=4, steps=2)  # 2 prompts: not one split
    with pytest.raises(ShardError, match="different configs"):
        list(iter_group_instances(tmp_path, [a, b]))
    with pytest.raises(ShardError, match="round-robin"):
        list(iter_group_instances(tmp_path, [a, b], check=False))


def test_predict_table_of_shards_equals_unsharded(runs):
    """predict pools a group's shards in the original prompt order: the whole table, bootstrap CIs included,
    equals the unsharded run's (only the run column differs: the group name)."""
    from qalign_repro.stages.predict import PredictOptions, predict_runs

    root, whole, shards = runs
    for name in [whole, *shards]:
        hash_grades(root, name)
    opts = PredictOptions(bootstrap=200)
    ref, ref_diag = predict_runs(root, [whole], opts)
    got, got_diag = predict_runs(root, shards, opts)
    assert set(got["run"]) == {whole}
    pd.testing.assert_frame_equal(got.drop(columns="run"), ref.drop(columns="run"))
    pd.testing.assert_frame_equal(got_diag.drop(columns="run"), ref_diag.drop(columns="run"))
    assert 0 < ref["accuracy"].max() < 1 and (ref["ci_high"] > ref["ci_low"]).any()  # not vacuous


# -- multirun through the stock launchers ----------------------------------------------------------------------
SHIM = "from qalign_repro.stages.run import main; main()"


def _multirun(root, launcher: str, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-W", "ignore", "-c", SHIM, "-m", *TOY, f"output_root={root}", f"dataset.n={N}",
            f"steps={STEPS}", "shard.count=2", "shard.index=0,1", f"hydra/launcher={launcher}", *extra]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_launcher_output(root, reference_root, whole):
    names = list_runs(root)
    assert len(names) == 2 and all(".shard" in n for n in names)
    (members,) = group_runs(root, names).values()
    check_group(root, whole, members)  # complete: every shard done
    merged = [comparable(i) for i in iter_group_instances(root, members)]
    assert merged == [comparable(i) for i in instances(reference_root, whole)]


@pytest.mark.slow
def test_submitit_local_multirun_over_shards_equals_unsharded(tmp_path, runs):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[cluster]")
    ref_root, whole, _ = runs
    _multirun(tmp_path, "submitit_local", "hydra.launcher.gpus_per_node=0")
    _check_launcher_output(tmp_path, ref_root, whole)


@pytest.mark.slow
def test_ray_multirun_over_shards_equals_unsharded(tmp_path, runs):
    pytest.importorskip("ray", reason="ray is not installed: pip install -e .[cluster]")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="pip install -e .[cluster]")
    ref_root, whole, _ = runs
    _multirun(tmp_path, "ray", "hydra.launcher.ray.remote.num_gpus=0", "hydra.launcher.ray.remote.num_cpus=1",
              "+hydra.launcher.ray.init.num_cpus=2", "+hydra.launcher.ray.init.include_dashboard=false")
    _check_launcher_output(tmp_path, ref_root, whole)
