"""The paper's published figures as data, and ``paper_comparison.md`` (issue 18 item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qalign_repro.analysis import paper
from qalign_repro.errors import DataError
from qalign_repro.stages import plot as pl
from qalign_repro.stages.predict import PredictOptions, predict_runs
from qalign_repro.store.storage import RunStore

TABLE1_DATASETS = ("math500", "gsm8k", "truthfulqa", "mmlu_redux", "ifeval")


def test_data_file_loads_and_rows_are_well_formed():
    data = paper.load()
    assert len(data.rows) == 30  # Table 1: 5 method rows x (5 datasets + Avg)
    for row in data.rows:
        assert row["section"].startswith("4.2") and row["value_kind"] == "accuracy_percent"
        assert row["dataset"] in (*TABLE1_DATASETS, "average") and row["method"] in paper.METHOD_RULES
        assert 0 <= row["value"] <= 100 and row["model"] in data.models
        assert (row["reward_model"] is None) == (row["method"] == "MV")  # MV reads no reward
        assert row["experiment"] in data.settings
    keys = [(r["dataset"], r["method"], r["model"]) for r in data.rows]
    assert len(set(keys)) == len(keys)
    # the transcription agrees with itself: each Avg cell is the rounded mean of its row's five datasets
    for method, model in {(r["method"], r["model"]) for r in data.rows}:
        cells = {r["dataset"]: r["value"] for r in data.rows if (r["method"], r["model"]) == (method, model)}
        assert round(np.mean([cells[d] for d in TABLE1_DATASETS]), 1) == pytest.approx(cells["average"], abs=0.051)
    assert data.model_id("tulu3_8b_sft") == "Tülu3-8B-SFT"
    assert data.model_id("Llama-3.1-Tulu-3-8B-SFT") == "Tülu3-8B-SFT"  # a local copy's folder name
    assert data.model_id("tiny") is None


def test_malformed_data_file_is_one_line_error(tmp_path):
    raw = json.loads((Path(paper.__file__).parents[1] / "data" / "paper" / paper.DATA_FILE).read_text("utf-8"))
    del raw["rows"][3]["value_kind"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError, match=r"row 3: missing field 'value_kind'") as exc:
        paper.load(bad)
    assert "\n" not in str(exc.value)
    raw["rows"][3]["value_kind"] = "accuracy_percent"
    raw["rows"][5]["value"] = 853
    bad.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError, match=r"row 5: value 853"):
        paper.load(bad)


def make_run(root: Path, name: str, *, method: str, dataset: str, model: str, rm: str, correct: np.ndarray) -> None:
    """A finished, evaluated run (``correct``: [prompts, outputs]); answers equal correctness, so MV, WMV and
    BoN pick a correct output exactly on the prompts whose outputs are all correct."""
    n_prompts, n = correct.shape
    meta = {"run_name": name, "experiment_name": "general", "method": method, "dataset": dataset,
            "mbr_kind": "exact", "beta": 0.5, "seed": 0, "steps": n, "status": "done",
            "model": {"name": model, "path": None, "n_params": 1000},
            "reward": {"name": rm, "path": None, "n_params": 500}, "config": {}}
    store = RunStore(root, name, create=True, meta=meta)
    store.add_instances([{"id": f"{dataset}-{p}", "idx": p, "prompt_ids": [1, 2], "messages": [], "doc": {}}
                         for p in range(n_prompts)])
    out = {"completion_ids": [7, 8], "text": "x", "accepted": True, "index": 0, "proposal_len": 2,
           "tokens_generated": 2, "tokens_prefilled": 2, "tokens_cached": 0, "tokens_scored": 4,
           "finish_reason": "stop"}
    store.commit_outputs({(p, k): {**out, "reward": float(correct[p, k]), "proposal_reward": float(correct[p, k])}
                          for p in range(n_prompts) for k in range(n)})
    store.write_eval("grades", [{"id": f"{dataset}-{p}", "answer": ["1" if c else "0" for c in correct[p]],
                                 "correct": [bool(c) for c in correct[p]], "metrics": {}}
                                for p in range(n_prompts)])
    store.close()


@pytest.fixture(scope="module")
def general_table(tmp_path_factory):
    """A GSM8K run of Tülu3-8B-SFT + Tülu3-8B-RM at the paper's budget (n = 1024), and a QAlign MATH500 run."""
    root = tmp_path_factory.mktemp("paper")
    gsm = np.ones((8, 1024), dtype=bool)
    gsm[7] = False  # 7 of 8 prompts right at every n: 87.5 %
    make_run(root, "gsm8k-anc", method="ancestral", dataset="gsm8k", model="tulu3_8b_sft", rm="tulu3_8b_rm",
             correct=gsm)
    make_run(root, "math500-qa", method="qalign", dataset="math500", model="Llama-3.1-Tulu-3-8B-SFT",
             rm="tulu3_8b_rm", correct=np.ones((4, 1024), dtype=bool))  # 100 %, CI [100, 100]
    make_run(root, "gsm8k-small", method="ancestral", dataset="gsm8k", model="tulu3_8b_dpo", rm="tulu3_8b_rm",
             correct=np.ones((4, 16), dtype=bool))
    table, _ = predict_runs(root, ["gsm8k-anc", "math500-qa", "gsm8k-small"], PredictOptions(bootstrap=200))
    return pl.prepare(table)


def test_matching_run_gives_difference_and_ci_verdict(general_table):
    matched, unmatched = paper.compare(general_table)
    got = {(r.dataset, r.method): r for r in matched.itertuples(index=False)}
    assert set(got) == {("gsm8k", "MV"), ("gsm8k", "WMV"), ("gsm8k", "BoN"), ("math500", "QAlign")}
    mv = got[("gsm8k", "MV")]
    assert mv.n == 1024 and mv.ours == pytest.approx(87.5) and mv.paper == 86.3
    assert mv.difference == pytest.approx(87.5 - 86.3)
    assert mv.ci_low <= 86.3 <= mv.ci_high and mv.paper_in_ci is True
    assert pd.isna(mv.beta) and got[("math500", "QAlign")].beta == 0.5  # β is shown where it drives a chain
    bon = got[("gsm8k", "BoN")]
    assert bon.paper == 74.3 and bon.difference == pytest.approx(87.5 - 74.3)
    assert bon.paper_in_ci == (bon.ci_low <= 74.3 <= bon.ci_high)
    qa = got[("math500", "QAlign")]  # matched through the hub id's last component
    assert qa.ours == 100.0 and qa.ci_low == qa.ci_high == 100.0 and qa.paper == 60.4
    assert qa.difference == pytest.approx(39.6) and qa.paper_in_ci is False
    small = dict(unmatched)
    assert any("budget: the published value is at n = 1024; this series goes up to n = 16" in r
               for rs in small.values() for r in rs)
    md = paper.comparison_markdown(general_table)
    assert "| gsm8k | MV | Tülu3-8B-SFT |" in md and "| +1.2 | yes |" in md
    assert "| math500 | QAlign | Tülu3-8B-SFT |" in md and "| +39.6 | no |" in md
    assert "No published row matches" not in md


def test_wrong_rm_or_chains_do_not_match(general_table):
    t = general_table[general_table["run"] == "gsm8k-anc"].copy()
    t["reward_model"] = "skywork"
    matched, unmatched = paper.compare(t)
    assert set(matched["method"]) == {"MV"}  # MV reads no reward: the RM is not part of its settings
    assert all("reward model 'skywork' is not Tülu3-8B-RM" in rs for _, rs in unmatched)
    llama = t.assign(model="llama31_8b_instruct")
    matched, unmatched = paper.compare(llama)
    assert matched.empty
    assert any("no MV row for Llama-3.1-8B-Instruct on gsm8k" in r and "Figure 2 only" in r
               for _, rs in unmatched for r in rs)
    t["chains"] = 4
    matched, unmatched = paper.compare(t)
    assert matched.empty and any("4 chains per prompt" in r for _, rs in unmatched for r in rs)


def test_tiny_default_says_no_row_matches(tmp_path):
    table = pd.DataFrame({"dataset": "arith", "run": "arith-qalign-tiny", "method": "qalign", "rule": "qalign",
                          "order": "first", "series": "QAlign", "model": "tiny", "reward_model": "tiny-rm",
                          "metric": "correct", "chains": 1, "n": [1, 2, 4, 8, 16], "accuracy": 0.5,
                          "ci_low": 0.3, "ci_high": 0.7, "n_prompts": 16, "beta": 0.0105})
    md = paper.comparison_markdown(table)
    assert "**No published row matches these runs.**" in md
    assert "model 'tiny' is not one of the paper's models (Tülu3-8B-DPO, Tülu3-8B-SFT)" in md
    assert "dataset 'arith' is not one of the paper's Table 1 datasets" in md
    paths = pl.make_plots(table.assign(flops=1e9 * table["n"], label="QAlign", variant="", family="QAlign",
                                       mean_reward_selected=0.0, invalid_rate=0.0),
                          tmp_path / "fig", tmp_path / "tab")
    written = tmp_path / "tab" / "paper_comparison.md"
    assert written in paths and written.read_text(encoding="utf-8") == md
