"""scripts/train_bt_rm.py (paper Appendix H with trl's RewardTrainer) runs on the tiny models and writes an RM
folder that the run stage's HF reward backend loads."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from recipes._recipe_helpers import hash_grades, make_toy_run

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "train_bt_rm.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_bt_rm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_from_graded_runs_prefer_a_correct_output(tmp_path):
    script = _load_script()
    name = make_toy_run(tmp_path, n=6, steps=6, method="ancestral")
    hash_grades(tmp_path, name)  # some outputs "correct", some not
    rows = script.pairs_from_runs(str(tmp_path), [name])
    assert rows, "no prompt had both a correct and an incorrect output"
    from qalign_repro.store.storage import RunStore

    store = RunStore(tmp_path, name, readonly=True)
    by_text = {}
    for inst, g in zip(store.iter_instances(), store.read_eval("grades")):
        for out, ok in zip(inst["outputs"], g["correct"]):
            by_text[out["text"]] = ok
    store.close()
    for row in rows:
        assert row["prompt"][0]["role"] == "user"
        assert by_text[row["chosen"][0]["content"]] and not by_text[row["rejected"][0]["content"]]


def test_arith_pairs_differ_only_in_the_answer():
    rows = _load_script().pairs_from_arith(5)
    for row in rows:
        good, bad = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert good != bad and good.rsplit("The answer is", 1)[0] == bad.rsplit("The answer is", 1)[0]


@pytest.mark.slow
def test_trl_recipe_trains_a_few_steps_on_the_tiny_lm(tmp_path):
    pytest.importorskip("trl", reason="trl is not installed: pip install 'trl==1.16.0'")
    from qalign_repro.models.tiny import assets_dir

    out = tmp_path / "rm"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(assets_dir("tiny-lm")), "--out", str(out),
                           "--arith", "24", "--batch-size", "4", "--per-device-batch", "2", "--max-steps", "2",
                           "--lr", "1e-3", "--max-length", "512", "--val-fraction", "0.2"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    card = json.loads((out / "training_card.json").read_text())
    assert card["metrics"]["steps"] == 2 and math.isfinite(card["metrics"]["train_loss"])
    assert card["metrics"]["gradient_accumulation_steps"] == 2 and "eval_loss" in card["metrics"]

    from qalign_repro.rm.hf import HFReward

    rm = HFReward({"path": str(out), "dtype": "float32", "max_context": 512}, {"device": "cpu"})
    scores = rm.score([[{"role": "user", "content": "Ann has 2 apples. She buys 3 more. How many?"}]] * 2,
                      ["2+3=5. The answer is 5.", "2+3=5. The answer is 7."])
    assert scores.rewards.shape == (2,) and all(math.isfinite(r) for r in scores.rewards)
