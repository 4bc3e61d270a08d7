"""All four stages on the embedded default (tiny HF models), as a user runs them."""

from __future__ import annotations

import signal

import matplotlib.image as mpimg
import pandas as pd
import pytest
from _helpers import run_module

from qalign_repro.store.storage import RunStore, list_runs

pytestmark = pytest.mark.slow  # real tiny-model pipeline runs in subprocesses: not in `make test-fast`

STEPS, PROMPTS = 4, 3


def _common(root) -> list[str]:
    return ["experiment=tiny", f"output_root={root}", f"dataset.n={PROMPTS}", f"steps={STEPS}",
            "max_new_tokens=24", "progress=false"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    for method in ("ancestral", "qalign"):
        run_module("run", *_common(root), f"method={method}")
    for stage in ("evaluate", "predict", "plot"):
        run_module(stage, *_common(root), "runs=all")
    return root


def test_storage_records(pipeline):
    names = list_runs(pipeline)
    assert sorted(n.split("-")[1] for n in names) == ["ancestral", "qalign"]
    for name in names:
        store = RunStore(pipeline, name, readonly=True)
        meta = store.meta
        assert meta["status"] == "done" and meta["experiment_name"] == "tiny"
        assert meta["model"]["n_params"] > 10_000 and meta["reward"]["n_params"] > 10_000
        assert meta["environment"]["versions"]["torch"]
        instances = list(store.iter_instances())
        assert len(instances) == PROMPTS
        for inst in instances:
            assert len(inst["outputs"]) == STEPS
            for k, out in enumerate(inst["outputs"]):
                assert 1 <= len(out["completion_ids"]) <= 24
                assert out["tokens_prefilled"] >= len(inst["input"]["prompt_ids"])
                assert out["tokens_scored"] > out["tokens_generated"] > 0
                if meta["method"] == "qalign" and k > 0:
                    assert 0 <= out["index"] < len(inst["outputs"][k - 1]["completion_ids"])
                    assert out["tokens_generated"] + out["index"] == out["proposal_len"]
        grades = store.read_eval("grades")
        assert [len(g["correct"]) for g in grades] == [STEPS] * PROMPTS


def test_prediction_table(pipeline):
    table = pd.read_csv(pipeline / "predictions" / "tiny" / "predictions.csv")
    rules = set(table["rule"])
    assert {"mv", "wmv", "bon", "qalign"} <= rules
    for rule in ("mv", "wmv", "bon", "qalign"):
        rows = table[table["rule"] == rule]
        assert sorted(rows["n"]) == [1, 2, 4]
        assert (rows["ci_low"] <= rows["accuracy"]).all() and (rows["accuracy"] <= rows["ci_high"]).all()
        assert rows.sort_values("n")["flops"].is_monotonic_increasing


def test_figures_written(pipeline):
    figs = pipeline / "figures" / "tiny"
    for stem in ("accuracy_vs_flops_arith", "accuracy_vs_flops_grid"):
        assert (figs / f"{stem}.pdf").stat().st_size > 1000
        assert mpimg.imread(figs / f"{stem}.png").shape[0] > 100


def test_rerun_of_every_stage_changes_nothing(pipeline):
    before = (pipeline / "predictions" / "tiny" / "predictions.csv").read_bytes()
    out = run_module("run", *_common(pipeline), "method=qalign").stdout
    assert "nothing to do" in out
    assert "nothing to do" in run_module("evaluate", *_common(pipeline), "runs=all").stdout
    run_module("predict", *_common(pipeline), "runs=all")
    assert (pipeline / "predictions" / "tiny" / "predictions.csv").read_bytes() == before


def test_killed_tiny_run_resumes_identically(tmp_path, pipeline):
    (ref,) = [n for n in list_runs(pipeline) if "-qalign-" in n]
    killed = run_module("run", *_common(tmp_path), "method=qalign", env={"QALIGN_KILL_AT": "in_commit:2"},
                        check=False)
    assert killed.returncode == -signal.SIGKILL
    run_module("run", *_common(tmp_path), "method=qalign")
    got = list(RunStore(tmp_path, ref, readonly=True).iter_instances())
    assert got == list(RunStore(pipeline, ref, readonly=True).iter_instances())
