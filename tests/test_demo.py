"""``make demo`` (experiment=tiny) shows a QAlign effect: it runs at the β shipped with the models, where the
RM decides about half of the changed proposals, and it ends with two lines saying what the figure shows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qalign_repro.cli import compose_config
from qalign_repro.errors import DataError
from qalign_repro.models.folders import model_fingerprints
from qalign_repro.models.tiny import assets_dir
from qalign_repro.stages import calibrate
from qalign_repro.stages.calibrate import (
    SHIPPED_FILE,
    acceptance_probabilities,
    load_or_calibrate,
    shipped_calibration,
)
from qalign_repro.stages.run import execute
from qalign_repro.stages.summary import read_table, summarize

REGENERATE = ("the shipped calibration no longer matches the shipped models or experiment=tiny's calibrate "
              "settings; rerun, for experiment=tiny (and tiny_repro): python -m qalign_repro.calibrate "
              "experiment=tiny && python scripts/ship_calibration.py results/calibration/tiny.json")


@pytest.fixture(scope="module")
def tiny_cfg():
    return compose_config(["experiment=tiny", "progress=false"])


def test_demo_uses_the_shipped_calibration(tiny_cfg, tmp_path, monkeypatch):
    """beta=auto finds the calibration in the RM's folder for these weights and settings, without calibrating."""
    assert tiny_cfg.beta == "auto"
    prints = model_fingerprints(tiny_cfg)
    shipped = shipped_calibration(tiny_cfg, prints)
    assert shipped is not None, REGENERATE
    assert shipped["shipped"].endswith(SHIPPED_FILE) and shipped["count"] == "changed"
    # β is in the RM's units: ~1 for the learned tiny RM, whose logits differ by units between completions
    assert 0.1 < shipped["beta"] < 10 and abs(shipped["chain_acceptance"] - 0.5) <= 0.05

    def no_calibration(*_a, **_k):
        raise AssertionError("calibrated although a matching calibration ships with the models")

    monkeypatch.setattr(calibrate, "calibrate_beta", no_calibration)
    cfg = compose_config(["experiment=tiny", f"output_root={tmp_path}"])
    assert load_or_calibrate(cfg, None, None, prints)["beta"] == shipped["beta"]
    assert not (tmp_path / "calibration").exists()


def test_other_weights_or_settings_ignore_the_shipped_calibration(tiny_cfg):
    prints = model_fingerprints(tiny_cfg)
    assert shipped_calibration(tiny_cfg, {**prints, "reward": "0" * 16}) is None  # a retrained RM
    assert shipped_calibration(compose_config(["experiment=tiny", "calibrate.prompts=64"]), prints) is None
    assert shipped_calibration(compose_config(["experiment=tiny", "reward=toy"]), prints) is None
    entries = json.loads((assets_dir("tiny-rm") / SHIPPED_FILE).read_text())["calibrations"]
    assert all(e["weights"]["model"] and e["weights"]["reward"] for e in entries)
    # reproduce-tiny (8-state chains) has its own shipped entry
    assert shipped_calibration(compose_config(["experiment=tiny_repro"]), prints) is not None, REGENERATE


def _changed_pairs(store):
    """(Δr, |y|, |y'|) of every stored proposal that differed from the chain's current completion."""
    rows = []
    for inst in store.iter_instances():
        outs = inst["outputs"]
        for y, new in zip(outs, outs[1:]):
            if not (new["accepted"] and new["completion_ids"] == y["completion_ids"]):
                rows.append((new["proposal_reward"] - y["reward"], len(y["completion_ids"]), new["proposal_len"]))
    return [np.array(col, dtype=float) for col in zip(*rows)]


@pytest.mark.slow
def test_demo_chains_let_the_rm_decide(tmp_path):
    """At the demo's β the RM decides: the chains' expected acceptance of their changed proposals (the closed
    form calibrate uses, free of coin-flip noise on a few proposals) is well below 1, while a β 100 times larger
    accepts ~all (the RM ignored, as the demo's old β = 1 did with the earlier RM's ~0.04 reward differences)."""
    store = execute(compose_config(["experiment=tiny", f"output_root={tmp_path}", "dataset.n=16", "steps=6",
                                    "progress=false"]))
    meta = store.meta
    assert meta["beta_calibration"]["shipped"] and meta["beta"] == meta["beta_calibration"]["beta"]
    assert meta["diagnostics"]["acceptance_changed_overall"] < 1
    delta_r, len_old, len_new = _changed_pairs(store)
    assert len(delta_r) >= 10
    at_demo = float(np.mean(acceptance_probabilities(delta_r, len_old, len_new, meta["beta"])))
    at_large = float(np.mean(acceptance_probabilities(delta_r, len_old, len_new, 100 * meta["beta"])))
    print(f"changed proposals {len(delta_r)}: expected acceptance {at_demo:.3f} at the demo beta, {at_large:.3f} at 100x")
    assert at_demo < 0.75 and at_large > 0.9, (at_demo, at_large)
    assert not (tmp_path / "calibration").exists()


def _table(**changes) -> pd.DataFrame:
    """A prediction table shaped like predict's: BoN peaks at n=2 and falls; QAlign rises; MV stays."""
    acc = {"BoN": [0.50, 0.70, 0.60, 0.40], "MV": [0.50, 0.52, 0.53, 0.51], "QAlign": [0.50, 0.55, 0.60, 0.75]}
    rows = []
    for label, ys in acc.items():
        for n, y in zip([1, 2, 4, 8], ys):
            rows.append({"experiment": "tiny", "dataset": "arith", "label": label, "family": label,
                         "rule": label.lower(), "order": "first", "n": n, "n_prompts": 16, "model": "tiny",
                         "reward_model": "tiny", "beta": 0.0105, "accuracy": y, "ci_low": y - 0.1,
                         "ci_high": y + 0.1, "acceptance": 0.81 if label == "QAlign" else float("nan"),
                         "acceptance_changed": 0.47 if label == "QAlign" else float("nan"), **changes})
    return pd.DataFrame(rows)


def test_summary_says_what_the_figure_shows(tmp_path):
    fig = tmp_path / "accuracy_vs_flops_arith.png"
    fig.write_bytes(b"png")
    what, says = summarize(_table(), tmp_path)
    assert what.startswith(str(fig)) and "16 arith prompts" in what and "tiny LM + tiny RM" in what
    assert "BoN, MV, QAlign" in what and "n = 1…8" in what and "95%" in what
    assert "β=0.0105 accepted 0.81" in what and "0.47 of those that changed" in what
    assert says.startswith("At n=8: QAlign 0.75 [0.65, 0.85], MV 0.51")  # ranked by accuracy
    assert "BoN peaks at n=2 (0.70) and falls to 0.40" in says and "QAlign rises 0.50 → 0.75" in says
    assert "MV stays near 0.51" in says
    # before plot: says so instead of naming a file that does not exist
    assert "no figure yet" in summarize(_table(), tmp_path / "nothing")[0]


def test_summary_needs_a_prediction_table(tmp_path):
    with pytest.raises(DataError, match="run python -m qalign_repro.predict"):
        read_table(tmp_path, "tiny")
    out = tmp_path / "predictions" / "tiny"
    out.mkdir(parents=True)
    _table().drop(columns=["ci_low"]).to_csv(out / "predictions.csv", index=False)
    with pytest.raises(DataError, match="ci_low"):
        read_table(tmp_path, "tiny")
