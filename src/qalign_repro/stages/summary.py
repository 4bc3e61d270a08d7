"""``python -m qalign_repro.summary``: two lines per dataset saying what the experiment's figure shows.

Why: ``make demo`` ends with a folder of figures and tables; a newcomer should not have to open them to learn
which file to look at, which methods it compares, and whether the curves show anything (the demo once ran at a
β where every proposal was accepted, and nothing said so). Every number here is read from the prediction table
that ``predict`` wrote, so the sentence cannot drift from the figure.

    python -m qalign_repro.summary experiment=tiny     # after predict and plot (the last step of make demo)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from qalign_repro.analysis import selection as sel
from qalign_repro.cli import entry_point
from qalign_repro.errors import DataError

#: accuracy changes smaller than this are called flat (the CIs of a 16-prompt demo are ~±0.2 anyway)
FLAT = 0.05


def _trend(points: pd.DataFrame, label: str) -> str:
    """How one series moves with the budget n, in words."""
    p = points.sort_values("n")
    first, last = float(p["accuracy"].iloc[0]), float(p["accuracy"].iloc[-1])
    top = p.loc[p["accuracy"].idxmax()]
    peak, peak_n = float(top["accuracy"]), int(top["n"])
    if peak_n not in (int(p["n"].iloc[0]), int(p["n"].iloc[-1])) and peak - last >= FLAT:
        return f"{label} peaks at n={peak_n} ({peak:.2f}) and falls to {last:.2f}"
    if last - first >= FLAT:
        return f"{label} rises {first:.2f} → {last:.2f}"
    if first - last >= FLAT:
        return f"{label} falls {first:.2f} → {last:.2f}"
    return f"{label} stays near {last:.2f}"


def _acceptance(rows: pd.DataFrame) -> str:
    """``β=… accepted …`` of each chain series (empty when the table has no chains)."""
    parts = []
    for label, g in rows.groupby("label", sort=True):
        r = g.sort_values("n").iloc[-1]
        if pd.isna(r.get("acceptance", math.nan)):
            continue
        text = f"{label} at β={float(r['beta']):.3g} accepted {float(r['acceptance']):.2f} of its proposals"
        if not pd.isna(r.get("acceptance_changed", math.nan)):
            text += f" ({float(r['acceptance_changed']):.2f} of those that changed the completion)"
        parts.append(text)
    return "; ".join(parts)


def figure_for(fig_dir: Path, dataset: str, metric: str = "accuracy") -> Path | None:
    """The PNG of ``dataset``'s panel that ``plot`` wrote (None when plot has not run)."""
    found = sorted(fig_dir.glob(f"{metric}_vs_flops_*{dataset}*.png"))
    return found[0] if found else None


def summarize(table: pd.DataFrame, fig_dir: Path, ci: float = 0.95) -> list[str]:
    """Two lines per dataset: what the figure shows (file, prompts, models, series, budgets, acceptance) and what
    the curves say (every series at the largest common budget with its CI, and how each moves with n)."""
    if "order" in table:
        table = table[table["order"] == "first"]
    lines = []
    for dataset, d in table.groupby("dataset", sort=True):
        n_max = int(d.groupby("label")["n"].max().min())  # the largest budget every series reaches
        fig = figure_for(fig_dir, str(dataset))
        where = str(fig) if fig is not None else f"{fig_dir}/ (no figure yet: run plot)"
        labels = list(dict.fromkeys(d.sort_values(["family", "label"])["label"]))
        models = ", ".join(sorted({f"{m} LM + {r} RM" for m, r in zip(d["model"], d["reward_model"])}))
        acc = _acceptance(d[d["rule"].isin(sel.rules_where(follows_chain=True))]) if "rule" in d else ""
        lines.append(f"{where}: accuracy vs FLOPs per prompt on {int(d['n_prompts'].max())} {dataset} prompts "
                     f"({models}) for {', '.join(labels)}, n = 1…{int(d['n'].max())}, {ci:.0%} bootstrap CIs "
                     "over prompts" + (f"; {acc}." if acc else "."))
        at = d[d["n"] == n_max].sort_values("accuracy", ascending=False)
        ranked = ", ".join(f"{r['label']} {r['accuracy']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                           for _, r in at.iterrows())
        trends = "; ".join(_trend(g, str(label)) for label, g in d.groupby("label", sort=False)
                           if g["n"].nunique() > 1)
        lines.append(f"At n={n_max}: {ranked}" + (f". With more samples: {trends}." if trends else "."))
    return lines


def console_lines(table: pd.DataFrame) -> list[str]:
    """What ``predict`` prints when it has written the table: one line per series (a sweep's runs apart) at its
    largest budget, under a line per dataset naming the models and prompts."""
    last = table.sort_values("n", kind="stable").groupby(["dataset", "label", "order"], sort=True).tail(1)
    names = [lbl if o == "first" else f"{lbl}, {o} orders" for lbl, o in zip(last["label"], last["order"])]
    last = last.assign(shown=names)
    width = max(len(x) for x in names)
    lines = []
    for ds, g in last.groupby("dataset", sort=True):
        models = ", ".join(sorted(set(g["model"].astype(str))))
        rms = ", ".join(sorted(set(g["reward_model"].astype(str))))
        prompts = ", ".join(str(int(x)) for x in sorted(set(g["n_prompts"])))
        lines.append(f"  {ds}: model {models}, RM {rms}, {prompts} prompts")
        for _, r in g.sort_values("shown").iterrows():
            acc = "" if pd.isna(r.get("acceptance", math.nan)) else f"  acceptance={r['acceptance']:.3f}"
            lines.append(f"    {r['shown']:<{width}}  n={int(r['n']):<5} acc={r['accuracy']:.3f} "
                         f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  FLOPs={r['flops']:.3g}{acc}")
    return lines


def read_table(root: Path, experiment: str) -> pd.DataFrame:
    path = root / "predictions" / experiment / "predictions.csv"
    if not path.is_file():
        raise DataError(f"no prediction table {path}; run python -m qalign_repro.predict experiment_name="
                        f"{experiment} runs=all first")
    table = pd.read_csv(path)
    missing = [c for c in ("dataset", "label", "n", "accuracy", "ci_low", "ci_high") if c not in table]
    if missing or table.empty:
        raise DataError(f"{path} has no rows or lacks column(s) {missing}; allowed: a table written by predict")
    return table


def summary_lines(cfg: DictConfig | Any) -> list[str]:
    root = Path(str(cfg.output_root))
    exp = str(cfg.experiment_name)
    ci = float(cfg.predict.get("ci", 0.95)) if cfg.get("predict") is not None else 0.95
    return summarize(read_table(root, exp), root / "figures" / exp, ci)


@entry_point
def main(cfg: DictConfig) -> None:
    """Print what the experiment's figure shows, measured from its prediction table."""
    print("\n".join(summary_lines(cfg)))


if __name__ == "__main__":
    from qalign_repro.stages.summary import main as _main

    _main()
