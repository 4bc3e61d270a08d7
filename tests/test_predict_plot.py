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

from qalign_repro.errors import DataError
from qalign_repro.stages import plot as pl
from qalign_repro.stages.predict import PredictOptions, predict_runs, write_tables
from qalign_repro.store.storage import RunStore

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
    from qalign_repro.stages import predict as pr
    from qalign_repro.store import storage

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


def plotted(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (x, y) of every labelled series of an axes, drawn as a plain line or with error bars."""
    out = {c.get_label(): c.lines[0].get_data() for c in ax.containers if not c.get_label().startswith("_")}
    out.update({ln.get_label(): ln.get_data() for ln in ax.get_lines() if not ln.get_label().startswith("_")})
    return out


def test_figures_have_one_line_per_series(table):
    df = pl.with_metric(table, "error")
    styles = pl.series_styles(df)
    assert set(styles) == {"QAlign", "MV", "WMV", "BoN"}  # one model: it is in the title, not the legend
    assert len({s["color"] for s in styles.values()}) == 4
    assert len({(s["linestyle"], s["marker"], s["filled"]) for s in styles.values()}) == 4
    fig = pl.figure_dataset(df, styles, "error", "arith")
    ax = fig.axes[0]
    assert set(plotted(ax)) == set(styles) and ax.get_xscale() == "log"
    assert len(ax.containers) == 4  # CI whiskers, not bands
    assert not [c for c in ax.collections if type(c).__name__ == "FillBetweenPolyCollection"]
    assert "tiny" in ax.get_title() and "24 prompts" in ax.get_title()
    mv = next(c for c in ax.containers if c.get_label() == "MV")
    assert mv.lines[0].get_color() == styles["MV"]["color"]
    expected = df[(df["dataset"] == "arith") & (df["series"] == "MV")].sort_values("n")
    np.testing.assert_allclose(np.asarray(plotted(ax)["MV"][1], float), expected["y"])  # error = 1 - accuracy
    grid = pl.figure_grid(df, styles, "error")
    visible = [a for a in grid.axes if a.get_visible()]
    assert len(visible) == 4  # 3 datasets + their average
    assert [len(plotted(a)) for a in visible] == [4, 4, 4, 4]
    reward = pl.figure_reward(df, styles, "error")
    assert [len(plotted(a)) for a in reward.axes if a.get_visible()] == [4, 4, 4]
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
    single, _ = pl.table1(df[df["dataset"] == "arith"], "accuracy")
    assert list(single.columns) == ["arith"]  # an "Avg" of one dataset would only repeat it
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


# -- issue 16 item 4: runs that differ in a config value are separate series -----------------------------------
def _cfg(beta: float, seed: int = 0, **method) -> dict:
    return {"beta": beta, "seed": seed, "max_new_tokens": 96, "temperature": 1.0,
            "model": {"name": "tiny", "path": None}, "reward": {"name": "rm", "path": None},
            "dataset": {"name": "arith", "n": 12}, "method": {"name": "qalign", **method},
            "backend": {"name": "hf", "generator": "hf", "reward": "hf", "port": 1}, "output_root": "x",
            "steps": 8}


#: the run stage's diagnostics of the two shards of the β=0.1 run (6 chains x 8 states each)
SHARD_DIAG = [{"acceptance_overall": 0.6, "identical_proposal_rate": 0.2, "chains": 6, "steps": 8},
              {"acceptance_overall": 0.5, "identical_proposal_rate": 0.4, "chains": 6, "steps": 8}]


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """A β sweep (0.01, 0.1, 1) of QAlign, one of its runs in two shards, a seed=1 twin of β=0.1, and MV/BoN."""
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(3)
    ids = [f"arith-{p}" for p in range(12)]
    for beta, acc_p in ((0.01, 0.2), (0.1, 0.5), (1.0, 0.9)):
        a, c, r, _ = chain(rng, 12, 8)
        acc = rng.random((12, 8)) < acc_p
        acc[:, 0] = True
        diag = {"acceptance_changed_overall": acc_p / 2}
        if beta == 0.1:  # stored as two shards of one run: still one series
            for k in range(2):
                rows = list(range(k, 12, 2))
                make_run(root, f"qa-b0.1.shard{k}of2", method="qalign", dataset="arith", beta=beta,
                         answers=[a[i] for i in rows], correct=[c[i] for i in rows], rewards=r[rows],
                         accepted=acc[rows], ids=[ids[i] for i in rows], config=_cfg(beta), group="qa-b0.1",
                         shard={"index": k, "count": 2}, diagnostics=SHARD_DIAG[k])
            make_run(root, "qa-b0.1-seed1", method="qalign", dataset="arith", beta=beta, answers=a, correct=c,
                     rewards=r, accepted=acc, ids=ids, config=_cfg(beta, seed=1), diagnostics=diag)
        else:
            make_run(root, f"qa-b{beta:g}", method="qalign", dataset="arith", beta=beta, answers=a, correct=c,
                     rewards=r, accepted=acc, ids=ids, config=_cfg(beta), diagnostics=diag)
    a, c, r = random_exact(rng, 12, 8)
    make_run(root, "anc", method="ancestral", dataset="arith", answers=a, correct=c, rewards=r, ids=ids,
             config={**_cfg(1.0), "method": {"name": "ancestral"}})
    return root


SWEEP_RUNS = ["qa-b0.01", "qa-b0.1.shard0of2", "qa-b0.1.shard1of2", "qa-b0.1-seed1", "qa-b1", "anc"]


def test_sweep_runs_are_separate_series_in_csv_console_table_and_figures(sweep_root, tmp_path, capsys):
    from qalign_repro.stages.summary import console_lines

    table, diag = predict_runs(sweep_root, SWEEP_RUNS, PredictOptions(bootstrap=100))
    qa_rows = table[table["rule"] == "qalign"]
    labels = dict(zip(qa_rows["run"], qa_rows["label"]))
    assert labels == {"qa-b0.01": "QAlign β=0.01 seed=0", "qa-b0.1": "QAlign β=0.1 seed=0",
                      "qa-b0.1-seed1": "QAlign β=0.1 seed=1", "qa-b1": "QAlign β=1 seed=0"}
    assert table.loc[table["run"] == "qa-b0.01", "variant"].iloc[0] == "β=0.01 seed=0"
    assert set(table.loc[table["run"] == "anc", "label"]) == {"MV", "WMV", "BoN"}  # the only ancestral run
    assert sorted(diag["label"]) == sorted(labels.values())
    # the acceptance of the stored flags, and the stored "changed" acceptance, per run
    qa = table[table["rule"] == "qalign"].drop_duplicates("run").set_index("run")
    assert qa.loc["qa-b0.01", "acceptance"] < qa.loc["qa-b0.1", "acceptance"] < qa.loc["qa-b1", "acceptance"]
    assert qa.loc["qa-b1", "acceptance_changed"] == pytest.approx(0.45)
    # shards: (accepted - identical) / (proposals - identical), summed over both shards' 42 proposals each
    assert qa.loc["qa-b0.1", "acceptance_changed"] == pytest.approx((0.4 + 0.1) / (0.8 + 0.6))
    assert (qa["acceptance_low"] <= qa["acceptance"]).all() and (qa["acceptance"] <= qa["acceptance_high"]).all()
    print("\n".join(console_lines(table)))
    out = capsys.readouterr().out
    for label in set(table["label"]):
        assert sum(line.split("n=")[0].strip() == label for line in out.splitlines()) == 1, (label, out)
    assert "model tiny, RM rm, 12 prompts" in out
    write_tables(table, diag, tmp_path / "predictions" / EXP, sweep_root)
    csv = pd.read_csv(tmp_path / "predictions" / EXP / "predictions.csv")
    assert csv.groupby("label")["run"].nunique().eq(1).all()
    paths = pl.make_plots(pl.prepare(csv), tmp_path / "fig", tmp_path / "tab")
    wide, _ = pl.table1(pl.with_metric(pl.prepare(csv), "accuracy"))
    assert sorted(wide.index) == sorted(set(table["label"]))
    assert {p.name for p in paths} >= {"beta_sweep_arith.png", "beta_sweep_arith.pdf"}
    tex = (tmp_path / "tab" / "table1.tex").read_text()
    assert r"QAlign $\beta$=0.01 seed=0" in tex and "Avg" not in tex
    df = pl.with_metric(pl.prepare(csv), "accuracy")
    styles = pl.series_styles(df)
    fig = pl.figure_dataset(df, styles, "accuracy", "arith")
    assert set(plotted(fig.axes[0])) == set(table["label"])
    pl.plt.close(fig)
    sweeps = pl.beta_sweeps(df)
    assert set(sweeps) == {"arith"} and sorted(sweeps["arith"].groupby("sweep_group")["beta"].nunique()) == [3]
    fig = pl.figure_beta_sweep(df, sweeps["arith"], styles, "accuracy", "arith")
    ax_m, ax_a = fig.axes[:2]
    (x, y), = [c.lines[0].get_data() for c in ax_m.containers]
    at8 = df[(df["rule"] == "qalign") & (df["n"] == 8) & (df["variant"].str.endswith("seed=0"))].sort_values("beta")
    np.testing.assert_allclose(np.asarray(x, float), [0.01, 0.1, 1.0])
    np.testing.assert_allclose(np.asarray(y, float), at8["y"])
    acc_lines = plotted(ax_a)
    assert any("all proposals" in k for k in acc_lines) and any("current state" in k for k in acc_lines)
    pl.plt.close(fig)


def test_runs_differing_only_in_beta_sweep_alone_and_no_sweep_without_two_betas(sweep_root):
    table, _ = predict_runs(sweep_root, ["qa-b0.01", "qa-b1"], PredictOptions(bootstrap=0))
    assert sorted(set(table["label"])) == ["QAlign β=0.01", "QAlign β=1"]
    df = pl.with_metric(pl.prepare(table), "accuracy")
    assert set(pl.beta_sweeps(df)) == {"arith"}
    one, _ = predict_runs(sweep_root, ["qa-b1", "anc"], PredictOptions(bootstrap=0))
    assert set(one["label"]) == {"QAlign", "MV", "WMV", "BoN"}
    assert pl.beta_sweeps(pl.with_metric(pl.prepare(one), "accuracy")) == {}


def test_distinguishing_keys_and_labels():
    from qalign_repro.analysis.series import _label_part, distinguishing_keys

    a = {"beta": 0.1, "model.name": "a", "model.path": "/m/a", "method.name": "qalign", "seed": 0}
    b = {"beta": 0.1, "model.name": "b", "model.path": "/m/b", "method.name": "qalign", "seed": 0,
         "method.chains": 4}
    c = {**a, "beta": 1.0}
    assert distinguishing_keys([a, b]) == ["model.name"]  # name differs: its path is not repeated
    assert distinguishing_keys([a, c]) == ["beta"]
    assert distinguishing_keys([a, {**a, "method.chains": 2}, {**a, "method.chains": 4}]) == ["method.chains"]
    hf = {"backend.name": "hf", "backend.generator": "hf", "backend.reward": "hf"}
    assert distinguishing_keys([hf, {"backend.name": "vllm", "backend.generator": "vllm",
                                     "backend.reward": "vllm_pooling"}]) == ["backend.name"]
    assert [_label_part(k, v) for k, v in [("beta", 0.005), ("method.chains", 4), ("model.path", "/x/y"),
                                           ("backend.name", "vllm")]] == \
        ["β=0.005", "chains=4", "model.path=y", "backend=vllm"]
    # chains: the stored meta value, also for runs from before the option existed (then 1)
    from qalign_repro.analysis.series import run_identity
    old, new = run_identity({"config": {"method": {"name": "qalign"}}}), run_identity({"chains": 4, "config": {}})
    assert (old["method.chains"], new["method.chains"]) == (1, 4) and "chains" not in new


# -- issue 16 item 5: figure properties a reviewer checks -----------------------------------------------------
def _check_figure(fig, series: set[str] | None = None) -> None:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox
    legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert legends, "no legend"
    for leg in legends:
        e = leg.get_window_extent(r)
        assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1 and box.y0 - 1 <= e.y0 and e.y1 <= box.y1 + 1, e
    seen: set[str] = set()
    for ax in [a for a in fig.axes if a.get_visible()]:
        assert not pl.tick_labels_overlap(ax, r), [t.get_text() for t in ax.get_xticklabels()]
        if ax.get_ylabel().startswith(("Accuracy", "Error", "Acceptance")):
            lo, hi = ax.get_ylim()
            assert 0.0 <= lo < hi <= 1.0, (ax.get_ylabel(), lo, hi)
        for t in pl.visible_tick_labels(ax) + pl.visible_tick_labels(ax, "y") + [ax.title]:
            if t.get_visible() and t.get_text():
                e = t.get_window_extent(r)
                assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1, t.get_text()
        seen |= set(plotted(ax))
    if series is not None:
        assert series <= seen, series - seen


def test_every_figure_passes_the_reviewer_checks(sweep_root, store_root):
    """Legends inside the image, accuracy/acceptance axes within [0, 1], no overlapping or cut tick labels,
    and every series of the table drawn, for every figure of two experiments (one with a β sweep)."""
    for root, runs in ((sweep_root, SWEEP_RUNS), (store_root, RUNS)):
        table, _ = predict_runs(root, runs, PredictOptions(bootstrap=50))
        df = pl.with_metric(pl.prepare(table), "accuracy")
        styles = pl.series_styles(df)
        with pl.plt.style.context(str(pl.STYLE_PATH)):
            for ds in sorted(df["dataset"].unique()):
                fig = pl.figure_dataset(df, styles, "accuracy", ds)
                _check_figure(fig, set(df.loc[df["dataset"] == ds, "series"]))
                pl.plt.close(fig)
            for fig in (pl.figure_grid(df, styles, "accuracy"), pl.figure_reward(df, styles, "accuracy")):
                _check_figure(fig, set(df["series"]))
                pl.plt.close(fig)
            for ds, sweep in pl.beta_sweeps(df).items():
                fig = pl.figure_beta_sweep(df, sweep, styles, "accuracy", ds)
                _check_figure(fig)
                pl.plt.close(fig)


def _points(flops, acc, series=("QAlign", "MV")) -> pd.DataFrame:
    rows = []
    for s, fam in zip(series, series):
        for k, (f, a) in enumerate(zip(flops, acc)):
            rows.append({"dataset": "d", "series": s, "family": fam, "model": "m", "reward_model": "r",
                         "rule": fam.lower(), "n": 2**k, "n_prompts": 5, "beta": 0.5, "flops": f, "y": a,
                         "y_low": max(0.0, a - 0.1), "y_high": min(1.0, a + 0.1), "mean_reward_selected": a})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("flops", [[3e9, 4e9, 5.5e9, 8e9], [1e6, 1e9, 1e12, 1e15, 1e18], [2.2e9, 2.3e9]])
def test_flops_axis_labels_never_overlap(flops):
    df = _points(flops, [0.3, 0.4, 0.5, 0.6, 0.7][: len(flops)])
    with pl.plt.style.context(str(pl.STYLE_PATH)):
        for fig in (pl.figure_dataset(df, pl.series_styles(df), "accuracy", "d"),
                    pl.figure_grid(df, pl.series_styles(df), "accuracy")):
            fig.canvas.draw()
            ax = fig.axes[0]
            labels = [t for t in ax.get_xticklabels() if t.get_text()]
            assert len(labels) >= 1 and not pl.tick_labels_overlap(ax, fig.canvas.get_renderer())
            lo, hi = ax.get_xlim()
            assert lo <= min(flops) and max(flops) <= hi
            pl.plt.close(fig)


def test_all_zero_accuracy_sits_on_the_floor_of_the_unit_interval():
    df = _points([1e9, 2e9, 4e9], [0.0, 0.0, 0.0])
    df["y_low"] = df["y_high"] = 0.0
    fig = pl.figure_dataset(df, pl.series_styles(df), "accuracy", "d")
    assert fig.axes[0].get_ylim() == (0.0, 0.2)
    pl.plt.close(fig)
    top = _points([1e9, 2e9], [1.0, 1.0])
    fig = pl.figure_dataset(top, pl.series_styles(top), "accuracy", "d")
    assert fig.axes[0].get_ylim()[1] == 1.0
    assert "model m, RM r, β=0.5, 5 prompts" in fig.axes[0].get_title()
    pl.plt.close(fig)


# -- issue 15 item 5: K chains per prompt, pooled -----------------------------------------------------------
def make_chain_run(root: Path, name: str, k: int, answers, correct, rewards, accepted) -> None:
    """A QAlign run with K chains per prompt: instance p*K + j is chain j of prompt p (arrays [P*K, steps])."""
    n_inst, n = len(answers), len(answers[0])
    meta = {"run_name": name, "experiment_name": EXP, "method": "qalign", "dataset": "arith", "mbr_kind": "exact",
            "beta": 1.0, "seed": 0, "steps": n, "status": "done", "chains": k,
            "model": {"name": "tiny", "path": None, "n_params": 1000},
            "reward": {"name": "rm", "path": None, "n_params": 500}, "config": {}}
    store = RunStore(root, name, create=True, meta=meta)
    store.add_instances([{"id": f"arith-{i // k}", "chain": i % k, "idx": i, "prompt_ids": [1], "messages": [],
                          "doc": {}} for i in range(n_inst)])
    for s in range(n):
        store.commit_step(s, {i: {"completion_ids": [7], "text": "x", "reward": float(rewards[i][s]),
                                  "accepted": bool(accepted[i][s]), "index": 0, "proposal_len": 1,
                                  "proposal_reward": 0.0, "tokens_generated": 10 * i + s, "tokens_prefilled": 1,
                                  "tokens_cached": 0, "tokens_scored": 2, "finish_reason": "stop"}
                              for i in range(n_inst)})
    store.write_eval("grades", [{"id": f"arith-{i // k}", "answer": list(answers[i]),
                                 "correct": [bool(c) for c in correct[i]], "metrics": {}} for i in range(n_inst)])
    store.close()


def test_k_chains_are_pooled_interleaved_with_burn_in_per_chain(tmp_path):
    from qalign_repro.analysis import selection as sel

    rng = np.random.default_rng(11)
    p_, k, steps, burn = 10, 3, 6, 2
    a, c, r, acc = chain(rng, p_ * k, steps)
    make_chain_run(tmp_path, "kq", k, a, c, r, acc)
    table, diag = predict_runs(tmp_path, ["kq"], PredictOptions(bootstrap=100, burn_in=burn))
    assert (table["n_prompts"] == p_).all() and (table["chains"] == k).all()
    assert sorted(table["n"]) == [8, 16, k * steps]  # budgets up to K*steps; n <= burn*K has no state left
    tok = np.array([[10 * i + s + 1 for s in range(steps)] for i in range(p_ * k)])  # generated + prefilled
    for n in sorted(table["n"]):
        picked, used = [], []
        for q in range(p_):
            order = [(s, j) for s in range(steps) for j in range(k)][:n]  # position t = s*K + j
            votes = Counter(a[q * k + j][s] for s, j in order if s >= burn and a[q * k + j][s] is not None)
            win = None
            if votes:
                top = max(votes.values())
                win = next(a[q * k + j][s] for s, j in order
                           if s >= burn and a[q * k + j][s] is not None and votes[a[q * k + j][s]] == top)
            picked.append(win == "0")
            used.append(sum(tok[q * k + j][s] for s, j in order))
        row = table[table["n"] == n].iloc[0]
        assert row["accuracy"] == pytest.approx(np.mean(picked)), n
        assert row["tokens_policy"] == pytest.approx(np.mean(used)), n  # exactly the states used, all chains
        assert row["flops_policy"] == pytest.approx(2 * 1000 * np.mean(used))
    assert diag["chains"].iloc[0] == k and diag["steps"].iloc[0] == steps and diag["n_prompts"].iloc[0] == p_
    # the CI is a bootstrap over prompts (P rows), not over chains: the same as bootstrapping the P scores
    last = table[table["n"] == k * steps].iloc[0]
    assert last["ci_low"] <= last["accuracy"] <= last["ci_high"]
    # explicit rules see the same pooled order: BoN at n = the best reward among the first n pooled states
    bon, _ = predict_runs(tmp_path, ["kq"], PredictOptions(bootstrap=0, rules=("bon",), budgets=(7,)))
    pooled_r, pooled_c = sel.pool_chains(np.asarray(r), k), sel.pool_chains(np.asarray(c, float), k)
    for n in (1, 4, 7, k * steps):
        best = pooled_c[np.arange(p_), np.argmax(pooled_r[:, :n], axis=1)]
        assert bon.loc[bon["n"] == n, "accuracy"].iloc[0] == pytest.approx(best.mean()), n


def test_chain_layout_errors_name_the_instance(tmp_path):
    rng = np.random.default_rng(2)
    a, c, r, acc = chain(rng, 4, 3)
    make_chain_run(tmp_path, "bad", 2, a, c, r, acc)
    store = RunStore(tmp_path, "bad")
    store.update_meta(chains=3)  # 4 instances are not whole groups of 3
    store.close()
    with pytest.raises(DataError, match="not a multiple of its 3 chains"):
        from qalign_repro.stages.predict import predict_run
        predict_run(tmp_path, "bad", PredictOptions(bootstrap=0))
    from qalign_repro.stages.predict import check_chain_layout
    with pytest.raises(DataError, match=r"instance 1 is chain 0 of doc 'b'; expected chain 1 of doc 'a'"):
        check_chain_layout([("a", 0), ("b", 0)], 2, "r")


def test_reward_figure_labels_a_shared_start_once():
    """Series that start from the same point (n=1 of MV, BoN and QAlign is one sample) get one "n=1" there, not
    a stack of identical labels; each series still has its own label at its last budget."""
    df = _points([1e9, 2e9, 4e9], [0.3, 0.4, 0.5])
    df.loc[(df["series"] == "MV") & (df["n"] > 1), "mean_reward_selected"] += 0.2
    df.loc[df["series"] == "MV", "y"] = df.loc[df["series"] == "MV", "mean_reward_selected"]
    with pl.plt.style.context(str(pl.STYLE_PATH)):
        fig = pl.figure_reward(df, pl.series_styles(df), "accuracy")
        labels = [(t.get_text(), tuple(t.xy)) for t in fig.axes[0].texts]
        pl.plt.close(fig)
    assert sorted(text for text, _ in labels) == ["n=1", "n=4", "n=4"]
    assert len(set(labels)) == len(labels)


# -- issue 17: predict knows a method only by its declarations -----------------------------------------------
def test_a_registered_method_gets_exactly_its_declared_rules(tmp_path, monkeypatch):
    """A method predict has never heard of: its ``default_rules``, its ``own_rules`` (dropped from every other
    method's explicit list), its label prefix and its RM charging come from the class alone."""
    from qalign_repro.methods.base import METHODS, Method

    class Fake(Method):
        name = "fakepool"
        default_rules = ("bon", "mv")
        own_rules = ("wmv",)
        label_prefix = "Fake "
        reward_in_generation = False

    monkeypatch.setitem(METHODS._entries, "fakepool", Fake)
    rng = np.random.default_rng(5)
    for run, method in (("fake", "fakepool"), ("anc", "ancestral"), ("qa", "qalign")):
        a, c, r = random_exact(rng, 6, 4)
        make_run(tmp_path, run, method=method, dataset="arith", answers=a, correct=c, rewards=r)
    table, diag = predict_runs(tmp_path, ["fake", "anc", "qa"], PredictOptions(bootstrap=0))
    rules = {run: list(dict.fromkeys(g["rule"])) for run, g in table.groupby("run")}
    assert sorted(rules["fake"]) == ["bon", "mv"] and rules["qa"] == ["qalign"]
    fake = table[table["run"] == "fake"]
    assert set(zip(fake["rule"], fake["label"])) == {("bon", "Fake BoN"), ("mv", "Fake MV")}
    assert (fake.loc[fake["rule"] == "mv", "tokens_rm"] == 0).all()  # made without the RM, reward-free rule
    assert (fake.loc[fake["rule"] == "bon", "tokens_rm"] > 0).all()
    assert list(diag["run"]) == ["qa"]  # kind "samples": no chain diagnostics
    # an explicit list: each method keeps the listed rules that no other method owns
    table, _ = predict_runs(tmp_path, ["fake", "anc", "qa"],
                            PredictOptions(bootstrap=0, rules=("wmv", "mv", "qalign")))
    rules = {run: sorted(set(g["rule"])) for run, g in table.groupby("run")}
    assert rules == {"fake": ["mv", "wmv"], "anc": ["mv"], "qa": ["mv", "qalign"]}


def test_a_method_declaring_an_unknown_rule_is_one_line_error(tmp_path, monkeypatch):
    from qalign_repro.errors import ConfigError
    from qalign_repro.methods.base import METHODS, Method
    from qalign_repro.stages.predict import predict_run

    monkeypatch.setitem(METHODS._entries, "oddrule", type("Odd", (Method,), {"name": "oddrule",
                                                                              "default_rules": ("vote",)}))
    a, c, r = random_exact(np.random.default_rng(0), 3, 2)
    make_run(tmp_path, "odd", method="oddrule", dataset="arith", answers=a, correct=c, rewards=r)
    with pytest.raises(ConfigError, match=r"method 'oddrule' declares unknown rule\(s\) \['vote'\]; allowed: mv, "):
        predict_run(tmp_path, "odd", PredictOptions(bootstrap=0))


def test_rule_declarations_are_what_the_stages_branch_on():
    """The properties that replace rule-name checks in predict, plot and summary (one place: selection.RULES)."""
    from qalign_repro.analysis import selection as sel

    assert tuple(sel.RULES) == ("mv", "wmv", "bon", "qalign", "mbr", "wmbr")
    assert {r: x.family for r, x in sel.RULES.items()} == {"mv": "MV", "wmv": "WMV", "bon": "BoN",
                                                            "qalign": "QAlign", "mbr": "MV", "wmbr": "WMV"}
    assert sel.rules_where(needs_reward=False) == ["mv", "mbr"]
    assert sel.rules_where(follows_chain=True) == ["qalign"]
    assert sel.rules_where(uses_beta=True) == ["wmv", "qalign", "wmbr"]
    assert [r for r, x in sel.RULES.items() if x.over_utilities(rouge=True)] == ["qalign", "mbr", "wmbr"]
    assert [r for r, x in sel.RULES.items() if x.over_utilities(rouge=False)] == ["mbr", "wmbr"]
    assert sel.pool_rules(rouge=False) == ("mv", "wmv", "bon") and sel.pool_rules(rouge=True) == ("mbr", "wmbr", "bon")
