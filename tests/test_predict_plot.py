"""The predict and plot stages on small synthetic stores (no models)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rouge_score import rouge_scorer

from qalign_repro import plot as pl
from qalign_repro.errors import DataError
from qalign_repro.predict import PredictOptions, predict_runs, write_tables
from qalign_repro.storage import RunStore

EXP = "synth"


def make_run(root: Path, name: str, *, method: str, dataset: str, answers, correct, rewards, texts=None,
             mbr_kind: str = "exact", accepted=None, model: str = "tiny", beta: float = 1.0,
             experiment: str = EXP, ids=None, **meta_extra) -> None:
    """A finished, evaluated run in the storage schema the run/evaluate stages write."""
    n_prompts, n = len(answers), len(answers[0])
    meta = {"run_name": name, "experiment_name": experiment, "method": method, "dataset": dataset,
            "mbr_kind": mbr_kind, "beta": beta, "seed": 0, "steps": n, "status": "done",
            "model": {"name": model, "path": None, "n_params": 1000},
            "reward": {"name": "rm", "path": None, "n_params": 500}, "config": {}, **meta_extra}
    ids = ids or [f"{dataset}-{p}" for p in range(n_prompts)]
    store = RunStore(root, name, create=True, meta=meta)
    store.add_instances([{"id": ids[p], "idx": p, "prompt_ids": [1, 2, 3], "messages": [], "doc": {}}
                         for p in range(n_prompts)])
    for k in range(n):
        outs = {}
        for p in range(n_prompts):
            text = texts[p][k] if texts is not None else f"The answer is {answers[p][k]}."
            outs[p] = {"completion_ids": [7] * (5 + k % 3), "text": text, "reward": float(rewards[p][k]),
                       "accepted": True if accepted is None else bool(accepted[p][k]), "index": 0,
                       "proposal_len": 5, "proposal_reward": float(rewards[p][k]),
                       "tokens_generated": 5 + k % 3, "tokens_prefilled": 3, "tokens_cached": 0,
                       "tokens_scored": 8 + k % 3, "finish_reason": "stop"}
        store.commit_step(k, outs)
    store.write_eval("grades", [{"id": ids[p], "answer": list(answers[p]),
                                 "correct": [bool(c) for c in correct[p]], "metrics": {}}
                                for p in range(n_prompts)])
    store.close()


def random_exact(rng, n_prompts: int, n: int):
    answers = [[None if rng.random() < 0.1 else str(rng.integers(0, 4)) for _ in range(n)] for _ in range(n_prompts)]
    correct = [[a == "0" for a in row] for row in answers]
    rewards = rng.normal(size=(n_prompts, n)) + 1.5 * np.array(correct)
    return answers, correct, rewards


def chain(rng, n_prompts: int, n: int):
    """A chain-like pool: states repeat when 'rejected'."""
    answers, correct, rewards = random_exact(rng, n_prompts, n)
    accepted = rng.random((n_prompts, n)) < 0.5
    accepted[:, 0] = True
    for p in range(n_prompts):
        for k in range(1, n):
            if not accepted[p, k]:
                answers[p][k], correct[p][k], rewards[p, k] = answers[p][k - 1], correct[p][k - 1], rewards[p, k - 1]
    return answers, correct, rewards, accepted


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    for ds in ("arith", "gsm8k"):
        a, c, r = random_exact(rng, 24, 16)
        make_run(root, f"{ds}-anc", method="ancestral", dataset=ds, answers=a, correct=c, rewards=r)
        a, c, r, acc = chain(rng, 24, 16)
        make_run(root, f"{ds}-qa", method="qalign", dataset=ds, answers=a, correct=c, rewards=r, accepted=acc)
    # an open-ended task: MBR over texts; the texts cluster around a "good" and a "bad" response
    good, bad = "use three bullet points and end with done", "a long story about nothing in particular today"
    texts = [[(good if rng.random() < 0.6 else bad) + f" v{rng.integers(0, 3)}" for _ in range(8)] for _ in range(10)]
    correct = [[t.startswith("use") for t in row] for row in texts]
    make_run(root, "ifeval-anc", method="ancestral", dataset="ifeval", mbr_kind="rouge", texts=texts,
             answers=texts, correct=correct, rewards=rng.normal(size=(10, 8)))
    make_run(root, "ifeval-qa", method="qalign", dataset="ifeval", mbr_kind="rouge", texts=texts,
             answers=texts, correct=correct, rewards=rng.normal(size=(10, 8)))
    return root


RUNS = ["arith-anc", "arith-qa", "gsm8k-anc", "gsm8k-qa", "ifeval-anc", "ifeval-qa"]


def test_predict_rules_budgets_and_columns(store_root):
    table, diag = predict_runs(store_root, RUNS, PredictOptions(bootstrap=200, budgets=(3,)))
    for col in ["run", "experiment", "dataset", "model", "method", "rule", "n", "tokens_policy", "tokens_rm",
                "flops_policy", "flops_rm", "flops", "accuracy", "ci_low", "ci_high", "invalid_rate",
                "mean_reward_selected", "order"]:
        assert col in table.columns
    rules = {r: sorted(g["rule"].unique()) for r, g in table.groupby("run")}
    assert rules["arith-anc"] == ["bon", "mv", "wmv"]
    assert rules["arith-qa"] == ["qalign"]
    assert rules["ifeval-anc"] == ["bon", "mbr", "wmbr"]
    assert sorted(table[table["run"] == "arith-anc"]["n"].unique()) == [1, 2, 3, 4, 8, 16]
    assert (table["ci_low"] <= table["accuracy"] + 1e-12).all() and (table["accuracy"] <= table["ci_high"] + 1e-12).all()
    assert set(table["order"]) == {"first"}
    assert sorted(diag["run"]) == ["arith-qa", "gsm8k-qa", "ifeval-qa"]
    assert diag["acceptance_rate"].between(0, 1).all()
    # MBR over texts equals a per-pair rouge-score loop (expected utility, earliest on ties)
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    store = RunStore(store_root, "ifeval-anc", readonly=True)
    grades = store.read_eval("grades")
    for n in (2, 8):
        expected = []
        for inst, g in zip(store.iter_instances(), grades):
            texts = [o["text"] for o in inst["outputs"][:n]]
            util = [sum(scorer.score(b, a)["rouge1"].fmeasure for b in texts) for a in texts]
            expected.append(g["correct"][int(np.argmax(util))])
        row = table[(table["run"] == "ifeval-anc") & (table["rule"] == "mbr") & (table["n"] == n)].iloc[0]
        assert row["accuracy"] == pytest.approx(np.mean(expected))


def test_accuracy_matches_a_per_prompt_loop(store_root):
    table, _ = predict_runs(store_root, ["arith-anc"], PredictOptions(bootstrap=0))
    store = RunStore(store_root, "arith-anc", readonly=True)
    grades = store.read_eval("grades")
    rewards = [[o["reward"] for o in inst["outputs"]] for inst in store.iter_instances()]
    for n in (1, 4, 16):
        mv, bon, inv = [], [], []
        for g, r in zip(grades, rewards):
            votes = Counter(a for a in g["answer"][:n] if a is not None)
            if votes:
                top = max(votes.values())
                win = next(a for a in g["answer"][:n] if a is not None and votes[a] == top)
                mv.append(g["correct"][g["answer"].index(win)])
            else:
                mv.append(False)
            best = int(np.argmax(r[:n]))
            bon.append(g["correct"][best])
            inv.append(g["answer"][best] is None)
        row = table[(table["n"] == n) & (table["rule"] == "mv")].iloc[0]
        assert row["accuracy"] == pytest.approx(np.mean(mv))
        row = table[(table["n"] == n) & (table["rule"] == "bon")].iloc[0]
        assert row["accuracy"] == pytest.approx(np.mean(bon))
        assert row["invalid_rate"] == pytest.approx(np.mean(inv))


def test_burn_in_and_resampled_orders(store_root):
    table, diag = predict_runs(store_root, ["arith-anc", "arith-qa"],
                               PredictOptions(bootstrap=50, burn_in=4, resample_orders=4))
    qa = table[table["rule"] == "qalign"]
    assert sorted(qa["n"]) == [8, 16]  # n <= burn_in has no state to vote over
    assert (qa["burn_in"] == 4).all() and (qa["order"] == "first").all()
    anc = table[table["run"] == "arith-anc"]
    assert (anc["order"] == "random4").all()
    # the average over orders at the full budget equals the full pool's answer for MV (order-free up to ties)
    first, _ = predict_runs(store_root, ["arith-anc"], PredictOptions(bootstrap=0))
    full = lambda t: t[(t["rule"] == "bon") & (t["n"] == 16)]["accuracy"].iloc[0]  # noqa: E731
    assert full(anc) == pytest.approx(full(first))
    auto, diag = predict_runs(store_root, ["arith-qa", "ifeval-qa"], PredictOptions(bootstrap=0, burn_in="auto"))
    assert (auto["burn_in"] == auto["run"].map(dict(zip(diag["run"], diag["burn_in_used"])))).all()


def test_sql_projection_equals_the_streaming_api(store_root, monkeypatch):
    from qalign_repro import predict as pr
    from qalign_repro import storage

    fields = pr.OUTPUT_FIELDS + ("text",)
    store = RunStore(store_root, "ifeval-qa", readonly=True)
    fast = list(pr.iter_output_fields(store, 6, fields))
    monkeypatch.setattr(storage, "SQLiteStorage", type("Other", (), {}))  # not SQLite -> public API
    slow = list(pr.iter_output_fields(store, 6, fields))
    assert fast == slow and len(fast) == 10 and len(fast[0][1]["text"]) == 6
    assert isinstance(fast[0][1]["accepted"][0], (bool, int))


def test_rescored_rewards_and_extra_metrics(tmp_path):
    a = [["1", "2", "2"], ["3", "3", "4"]]
    c = [[True, False, False], [False, False, True]]
    make_run(tmp_path, "r", method="ancestral", dataset="arith", answers=a, correct=c, rewards=[[0, 0, 9], [0, 0, 9]])
    store = RunStore(tmp_path, "r")
    store.write_eval("reward", [{"id": "arith-0", "reward": [9, 0, 0]}, {"id": "arith-1", "reward": [9, 0, 0]}])
    grades = store.read_eval("grades")
    for g in grades:
        g["metrics"] = {"loose": [1.0, 0.5, 0.0]}
    store.write_eval("grades", grades)
    store.close()
    t, _ = predict_runs(tmp_path, ["r"], PredictOptions(bootstrap=0))
    bon = t[(t["rule"] == "bon") & (t["n"] == 3)].iloc[0]
    assert bon["accuracy"] == 0.5 and bon["mean_reward_selected"] == 9  # the eval's rewards win
    t, _ = predict_runs(tmp_path, ["r"], PredictOptions(bootstrap=0, metric="loose"))
    mv = t[(t["rule"] == "mv") & (t["n"] == 3)].iloc[0]
    assert mv["accuracy"] == pytest.approx((0.5 + 1.0) / 2) and (t["metric"] == "loose").all()


def test_shards_of_a_run_are_pooled(tmp_path):
    """Round-robin shards give exactly the unsharded run's table, CIs and random orders included."""
    rng = np.random.default_rng(5)
    a, c, r = random_exact(rng, 21, 8)
    ids = [f"arith-{p}" for p in range(21)]
    make_run(tmp_path, "whole", method="ancestral", dataset="arith", answers=a, correct=c, rewards=r, ids=ids)
    for k in range(3):
        rows = list(range(k, 21, 3))
        make_run(tmp_path, f"grp.shard{k}of3", method="ancestral", dataset="arith", answers=[a[i] for i in rows],
                 correct=[c[i] for i in rows], rewards=r[rows], ids=[ids[i] for i in rows],
                 group="grp", shard={"index": k, "count": 3})
    opts = PredictOptions(bootstrap=100, resample_orders=2)
    sharded, _ = predict_runs(tmp_path, ["grp.shard0of3", "grp.shard1of3", "grp.shard2of3"], opts)
    whole, _ = predict_runs(tmp_path, ["whole"], opts)
    assert set(sharded["run"]) == {"grp"}
    cols = ["accuracy", "ci_low", "ci_high", "flops", "invalid_rate", "mean_reward_selected"]
    np.testing.assert_array_equal(sharded[cols].to_numpy(float), whole[cols].to_numpy(float))
    write_tables(sharded, pd.DataFrame(), tmp_path / "pred", tmp_path)
    for k in range(3):
        assert set(pd.read_csv(tmp_path / "runs" / f"grp.shard{k}of3" / "predictions.csv")["run"]) == {"grp"}
    # a missing shard stops the stage, naming it (skipping would silently change the numbers)
    with pytest.raises(DataError, match=r"missing shard\(s\): grp.shard1of3"):
        predict_runs(tmp_path, ["grp.shard0of3", "grp.shard2of3"], opts)


def test_written_tables_are_idempotent(store_root, tmp_path):
    opts = PredictOptions(bootstrap=100, resample_orders=2)
    outs = []
    for _ in range(2):
        table, diag = predict_runs(store_root, RUNS, opts)
        paths = write_tables(table, diag, tmp_path / "pred", store_root)
        outs.append({p: p.read_bytes() for p in paths})
    assert outs[0] == outs[1]
    per_run = pd.read_csv(store_root / "runs" / "arith-qa" / "predictions.csv")
    assert set(per_run["run"]) == {"arith-qa"}
    assert (tmp_path / "pred" / "predictions.md").read_text().startswith("|")


@pytest.fixture(scope="module")
def table(store_root):
    t, _ = predict_runs(store_root, RUNS, PredictOptions(bootstrap=100))
    return pl.prepare(t)


def test_figures_have_one_line_per_series(table):
    df = pl.with_metric(table, "error")
    styles = pl.series_styles(df)
    assert set(styles) == {"QAlign (tiny)", "MV (tiny)", "WMV (tiny)", "BoN (tiny)"}
    assert len({s["color"] for s in styles.values()}) == 4
    fig = pl.figure_dataset(df, styles, "error", "arith")
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 4 and ax.get_xscale() == "log"
    assert len(ax.collections) == 4  # CI bands
    mv = next(line for line in ax.get_lines() if line.get_label() == "MV (tiny)")
    assert mv.get_color() == styles["MV (tiny)"]["color"]
    expected = df[(df["dataset"] == "arith") & (df["series"] == "MV (tiny)")].sort_values("n")
    np.testing.assert_allclose(mv.get_ydata(), expected["y"])  # error = 1 - accuracy
    grid = pl.figure_grid(df, styles, "error")
    visible = [a for a in grid.axes if a.get_visible()]
    assert len(visible) == 4  # 3 datasets + their average
    assert [len(a.get_lines()) for a in visible] == [4, 4, 4, 4]
    reward = pl.figure_reward(df, styles, "error")
    assert [len(a.get_lines()) for a in reward.axes if a.get_visible()] == [4, 4, 4]
    for f in (fig, grid, reward):
        pl.plt.close(f)


def test_plot_stage_writes_pdf_png_and_tables(store_root, table, tmp_path):
    """``plot(cfg)`` on a composed config: every figure as non-empty PDF + PNG, Table 1 as md + tex."""
    from qalign_repro.cli import compose_config

    out = tmp_path / "out"
    write_tables(table.drop(columns="series"), pd.DataFrame(), out / "predictions" / EXP, store_root)
    cfg = compose_config([f"output_root={out}", f"experiment_name={EXP}", "runs=all"])
    paths = pl.plot(cfg)
    names = sorted(p.name for p in paths)
    for stem in ("accuracy_vs_flops_arith", "accuracy_vs_flops_ifeval", "accuracy_vs_flops_grid",
                 "reward_vs_accuracy"):
        assert f"{stem}.pdf" in names and f"{stem}.png" in names
    assert {"table1.md", "table1.tex", "equal_flops.md"} <= set(names)
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if p.suffix == ".pdf":
            assert p.read_bytes()[:5] == b"%PDF-"
    assert all(str(p).startswith(str(out / "figures" / EXP)) or str(p).startswith(str(out / "tables" / EXP))
               for p in paths)


def test_saved_figures_are_byte_identical(table, tmp_path):
    df = pl.with_metric(table, "accuracy")
    blobs = []
    for k in range(2):
        with pl.plt.style.context(str(pl.STYLE_PATH)):
            fig = pl.figure_dataset(df, pl.series_styles(df), "accuracy", "gsm8k")
            blobs.append([p.read_bytes() for p in pl.save(fig, tmp_path / f"f{k}")])
    assert blobs[0] == blobs[1]


def test_table1_latex_balanced_and_bold_max(table):
    df = pl.with_metric(table, "accuracy")
    wide, n_star = pl.table1(df, "accuracy")
    assert n_star == 8  # ifeval runs stop at 8, the exact-task runs at 16
    assert list(wide.columns) == ["arith", "gsm8k", "ifeval", "Avg"]
    md, tex = pl.format_table1(wide, n_star, "accuracy")
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    header = tex.split(r"\toprule")[1].split(r"\midrule")[0]
    n_cols = len(wide.columns) + 1
    for line in body + [header.strip().splitlines()[0]]:
        assert line.count("&") == n_cols - 1 and line.rstrip().endswith(r"\\")
    assert tex.count("{") == tex.count("}")
    for j, col in enumerate(wide.columns):
        vals = wide[col].round(1)
        if vals.isna().all():
            continue
        best = vals.max()
        for i, label in enumerate(wide.index):
            cell = [c.strip() for c in body[i].rstrip("\\ ").split("&")][j + 1]
            assert cell.startswith(r"\textbf{") == (vals.iloc[i] == best), (col, label, cell)
    assert md.count("**") >= 2 * len(wide.columns)


def test_equal_flops_table_compares_every_series_within_one_budget():
    """F* is the smallest of the series' largest FLOPs; each series shows its last point within F*, and a series
    whose cheapest point is past F* shows nothing rather than a point over budget."""
    df = pd.DataFrame({
        "dataset": ["d"] * 7, "family": ["QAlign", "QAlign", "QAlign", "BoN", "BoN", "CARDS", "CARDS"],
        "model": ["m"] * 7, "series": ["Q", "Q", "Q", "B", "B", "C", "C"], "n": [1, 2, 4, 1, 2, 1, 2],
        "flops": [1.0, 2.0, 4.0, 2.0, 3.0, 3.1, 7.0], "y": [0.1, 0.2, 0.3, 0.15, 0.25, 0.4, 0.5],
        "y_low": [0.0] * 7, "y_high": [1.0] * 7})
    t = pl.equal_flops_table(df, slack=0.0)
    assert (t["budget_flops"] == 3.0).all()
    got = {r.Method: (r.n, r.flops) for r in t.itertuples()}
    assert got["Q"] == (2, 2.0) and got["B"] == (2, 3.0)
    assert pd.isna(got["C"][0])  # its n=1 already costs 3.1 > 3
    md = pl.format_equal_flops(t, "accuracy")
    assert "≤ 3 FLOPs" in md and "**25.0**" in md and md.count("–") == 4
    assert pl.equal_flops_table(df, slack=0.05).set_index("Method").loc["C", "n"] == 1  # 3.1 is within 5 %


def test_budget_table_shows_each_series_within_each_budget():
    df = pd.DataFrame({"dataset": ["d"] * 5, "family": ["MV", "MV", "MV", "CARDS", "CARDS"], "model": ["m"] * 5,
                       "series": ["M", "M", "M", "C", "C"], "n": [1, 2, 4, 1, 2],
                       "flops": [1e9, 2e9, 4e9, 3e9, 6e10], "y": [0.5, 0.6, 0.7, 0.8, 0.9]})
    grid = pl.budget_grid(df)
    # 1-2-5 steps from 1e9 to 5e10, closed by 6e10 (the largest point), thinned to 5 columns keeping both ends
    assert len(grid) == 5 and grid[0] == 1e9 and grid[-1] == 6e10 and grid == sorted(grid)
    assert all(f"{b:.0e}"[0] in "125" for b in grid[:-1])
    assert pl.budget_grid(df, max_columns=3) == [1e9, 1e10, 6e10]
    assert pl.budget_grid(df.assign(flops=df["flops"] * 1.04))[-1] == 7e10  # 6.24e10 rounds up
    t = pl.budget_table(df, [1e9, 5e9, 1e11])
    assert t.loc["M"].tolist() == [(0.5, 1), (0.7, 4), (0.7, 4)]  # stops at its last point, within the budget
    assert t.loc["C"].tolist() == [None, (0.8, 1), (0.9, 2)]  # nothing when even n=1 is over the budget


def test_table1_error_bolds_min():
    df = pd.DataFrame({"series": ["A", "B"], "family": ["MV", "BoN"], "model": ["m", "m"], "dataset": ["d", "d"],
                       "n": [4, 4], "y": [0.2, 0.1]})
    wide, _ = pl.table1(df, "error")
    _, tex = pl.format_table1(wide, 4, "error")
    assert re.search(r"B\s*&\s*\\textbf\{10\.0\}", tex)


def test_cli_predict_entry_point(store_root):
    """The real ``python -m qalign_repro.predict``: Hydra config, run selection, files on disk."""
    common = [f"output_root={store_root}", f"experiment_name={EXP}", "runs=all", "predict.bootstrap=50"]
    proc = subprocess.run([sys.executable, "-m", "qalign_repro.predict", *common],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(store_root / "predictions" / EXP / "predictions.csv")
    assert sorted(table["run"].unique()) == sorted(RUNS)
    assert (store_root / "predictions" / EXP / "diagnostics.csv").is_file()


def test_bad_predict_options_are_one_line_config_errors():
    from qalign_repro.errors import ConfigError

    for bad, word in [({"rules": ["mv", "foo"]}, "foo"), ({"ci": 1.5}, "ci"), ({"burn_in": -1}, "burn_in"),
                      ({"mbr_metric": "bleu"}, "rouge1"), ({"wmv_beta": 0}, "wmv_beta")]:
        with pytest.raises(ConfigError, match=word) as exc:
            PredictOptions.from_config({"predict": bad})
        assert "\n" not in str(exc.value)
