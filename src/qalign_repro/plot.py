"""``python -m qalign_repro.plot``: paper-style figures and Table 1 from the prediction table.

Reads ``<output_root>/predictions/<experiment_name>/predictions.csv`` (plus any ``plot.inputs`` CSVs; rows
filtered by ``runs`` when it is a list of globs) and writes
    figures/<experiment>/<metric>_vs_flops_<dataset>.{pdf,png}   one panel per dataset (paper Fig. 2)
    figures/<experiment>/<metric>_vs_flops_grid.{pdf,png}        all datasets (+ their average), like Fig. 3/6
    figures/<experiment>/reward_vs_<metric>.{pdf,png}            mean selected reward vs metric as n grows
    tables/<experiment>/table1.{md,tex}                          methods x datasets at the largest common n
A series is one (method family, policy model) pair, e.g. "QAlign (tiny)", and keeps its colour in every
figure. Style: the packaged ``plot_style.mplstyle`` or ``plot.style``; the Agg backend, no display needed.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qalign_repro.errors import ConfigError, DataError  # noqa: E402

STYLE_PATH = Path(__file__).resolve().parent / "plot_style.mplstyle"
METRICS = ("accuracy", "error")
#: paper order of the families, and their colours (Okabe-Ito, colour-blind safe)
FAMILY_ORDER = ("QAlign", "MV", "WMV", "BoN")
FAMILY_COLORS = {"QAlign": "#D55E00", "MV": "#009E73", "WMV": "#E69F00", "BoN": "#0072B2"}
EXTRA_COLORS = ("#CC79A7", "#56B4E9", "#000000", "#999933", "#882255", "#44AA99", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
AVERAGE = "average"
# deterministic PDF/PNG bytes: no creation date / software stamp
_SAVE_META = {"pdf": {"CreationDate": None, "Producer": None, "Creator": None},
              "png": {"Software": None}}


# -- data ----------------------------------------------------------------------------------------------------
def load_predictions(paths: Sequence[str | Path], runs: Any = None) -> pd.DataFrame:
    """Concatenate prediction tables; keep the runs matching ``runs`` (a glob or list of globs; None/"all" =
    every row)."""
    frames = []
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"prediction table {str(p)!r} does not exist; run `python -m qalign_repro.predict` first")
        frames.append(pd.read_csv(p))
    table = pd.concat(frames, ignore_index=True).drop_duplicates()
    if runs not in (None, "all"):
        patterns = [runs] if isinstance(runs, str) else [str(r) for r in runs]
        table = table[[any(fnmatch.fnmatch(r, pat) for pat in patterns) for r in table["run"]]]
    if table.empty:
        raise DataError(f"no prediction rows to plot (runs={runs})")
    return prepare(table)


def prepare(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``series``: the legend/row name, the label plus the order when it is not the stored one."""
    table = table.copy()
    table["series"] = [lbl if o == "first" else f"{lbl}, {o} orders" for lbl, o in zip(table["label"], table["order"])]
    return table


def with_metric(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Add ``y``, ``y_low``, ``y_high``: accuracy as is, or error = 1 - accuracy (CI bounds swap)."""
    if metric not in METRICS:
        raise ConfigError(f"plot.metric={metric!r} is invalid; allowed: {', '.join(METRICS)}")
    t = table.copy()
    if metric == "accuracy":
        t["y"], t["y_low"], t["y_high"] = t["accuracy"], t["ci_low"], t["ci_high"]
    else:
        t["y"], t["y_low"], t["y_high"] = 1 - t["accuracy"], 1 - t["ci_high"], 1 - t["ci_low"]
    return t


def metric_label(metric: str) -> str:
    return "Accuracy" if metric == "accuracy" else "Error rate"


def series_order(table: pd.DataFrame) -> list[str]:
    fam_rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    keys = table[["series", "family", "model"]].drop_duplicates()
    keys = sorted(keys.itertuples(index=False), key=lambda k: (fam_rank.get(k.family, 99), k.family, str(k.model),
                                                               k.series))
    return list(dict.fromkeys(k.series for k in keys))


def series_styles(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """One colour/marker/linestyle per series, fixed for the whole table so every figure agrees: the first
    series of a family gets the family colour, further ones (other models, random orders) the extra palette,
    dashed."""
    styles: dict[str, dict[str, Any]] = {}
    fam_of = dict(zip(table["series"], table["family"]))
    used_family: set[str] = set()
    extra = iter(EXTRA_COLORS * 4)
    for k, s in enumerate(series_order(table)):
        fam = fam_of[s]
        if fam in FAMILY_COLORS and fam not in used_family:
            color, ls = FAMILY_COLORS[fam], "-"
            used_family.add(fam)
        else:
            color, ls = next(extra), "--"
        styles[s] = {"color": color, "linestyle": ls, "marker": MARKERS[k % len(MARKERS)]}
    return styles


def _positive_flops(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["flops"] > 0]


def average_over_datasets(table: pd.DataFrame) -> pd.DataFrame:
    """Per series and n, the mean over datasets (only for series/n present in every dataset), like the
    paper's Fig. 1. No CI: averaging intervals is not an interval."""
    datasets = table["dataset"].nunique()
    g = table.groupby(["series", "family", "model", "n"], sort=True)
    agg = g.agg(flops=("flops", "mean"), y=("y", "mean"), mean_reward_selected=("mean_reward_selected", "mean"),
                k=("dataset", "nunique")).reset_index()
    agg = agg[agg["k"] == datasets].drop(columns="k")
    agg["y_low"] = np.nan
    agg["y_high"] = np.nan
    agg["dataset"] = AVERAGE
    return agg


# -- figures ---------------------------------------------------------------------------------------------------
def draw_metric_vs_flops(ax: plt.Axes, df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str,
                         title: str) -> None:
    """One line per series (with a CI band when the rows have one) of metric vs FLOPs, log-x."""
    for s in [s for s in styles if s in set(df["series"])]:
        d = _positive_flops(df[df["series"] == s]).sort_values("n")
        if d.empty:
            continue
        st = styles[s]
        ax.plot(d["flops"], d["y"], label=s, color=st["color"], linestyle=st["linestyle"], marker=st["marker"])
        if d["y_low"].notna().all():
            ax.fill_between(d["flops"], d["y_low"], d["y_high"], color=st["color"], alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per prompt")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(title)


def figure_dataset(df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str, dataset: str) -> Figure:
    fig, ax = plt.subplots()
    draw_metric_vs_flops(ax, df[df["dataset"] == dataset], styles, metric, dataset)
    if len(ax.get_lines()) > 5:  # many series: beside the axes, where it hides no curve
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(loc="best")
    return fig


def _grid(n_panels: int) -> tuple[int, int]:
    cols = min(3, n_panels)
    return math.ceil(n_panels / cols), cols


def figure_grid(df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str) -> Figure:
    """A panel per dataset, plus the cross-dataset average when there are several, one shared legend."""
    datasets = sorted(df["dataset"].unique())
    panels = [(d, df[df["dataset"] == d]) for d in datasets]
    if len(datasets) > 1:
        avg = average_over_datasets(df)
        if not avg.empty:
            panels.append(("average over datasets", avg))
    rows, cols = _grid(len(panels))
    w, h = plt.rcParams["figure.figsize"]
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols * 0.85, h * rows * 0.85 + 0.4), squeeze=False)
    for ax, (title, d) in zip(axes.flat, panels):
        draw_metric_vs_flops(ax, d, styles, metric, title)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes.flat[1:len(panels)]:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lb, hd)
    order = [s for s in styles if s in seen]
    fig.legend([seen[s] for s in order], order, loc="lower center", ncol=min(4, len(order)),
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


def figure_reward(df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str) -> Figure:
    """Mean reward of the selected output vs the metric, one line per series per dataset, in order of n:
    reward rising while accuracy falls is over-optimisation of the RM (BoN in the paper)."""
    datasets = sorted(df["dataset"].unique())
    rows, cols = _grid(len(datasets))
    w, h = plt.rcParams["figure.figsize"]
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols * 0.85, h * rows * 0.85 + 0.4), squeeze=False)
    for ax, ds in zip(axes.flat, datasets):
        d = df[df["dataset"] == ds]
        for s in [s for s in styles if s in set(d["series"])]:
            e = d[d["series"] == s].sort_values("n")
            st = styles[s]
            ax.plot(e["mean_reward_selected"], e["y"], label=s, color=st["color"], linestyle=st["linestyle"],
                    marker=st["marker"])
            for _, r in (e.iloc[[0, -1]] if len(e) > 1 else e).iterrows():
                ax.annotate(f"n={int(r['n'])}", (r["mean_reward_selected"], r["y"]), fontsize=6,
                            xytext=(2, 2), textcoords="offset points", color=st["color"])
        ax.set_xlabel("Mean reward of the selected output")
        ax.set_ylabel(metric_label(metric))
        ax.set_title(ds)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes.flat[: len(datasets)]:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            if lb not in labels:
                handles.append(hd)
                labels.append(lb)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return fig


def save(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem``.pdf (vector) and ``stem``.png with deterministic metadata; closes the figure."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # font subsetting chatter under Hydra's logging
    paths = []
    for ext in ("pdf", "png"):
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path, metadata=_SAVE_META[ext])
        paths.append(path)
    plt.close(fig)
    return paths


# -- Table 1 -----------------------------------------------------------------------------------------------------
def largest_common_budget(df: pd.DataFrame) -> int | None:
    """Largest n present for every (series, dataset) cell, or None when the cells share no n."""
    sets = [set(g["n"]) for _, g in df.groupby(["series", "dataset"])]
    common = set.intersection(*sets) if sets else set()
    return int(max(common)) if common else None


def table1(df: pd.DataFrame, metric: str = "accuracy") -> tuple[pd.DataFrame, int | None]:
    """Numeric Table 1 (percent): rows = series, columns = datasets + "Avg" (rows covering every dataset),
    at the largest common budget (each cell's largest n when there is none)."""
    n_star = largest_common_budget(df)
    d = df[df["n"] == n_star] if n_star is not None else df.sort_values("n").groupby(["series", "dataset"]).tail(1)
    wide = d.pivot_table(index="series", columns="dataset", values="y", aggfunc="first") * 100.0
    wide = wide.reindex([s for s in series_order(df) if s in wide.index])
    wide = wide[sorted(wide.columns)]
    wide["Avg"] = wide.mean(axis=1, skipna=False)
    wide.index.name = "Method"
    wide.columns.name = None
    return wide, n_star


def _bold_mask(wide: pd.DataFrame, metric: str, decimals: int) -> pd.DataFrame:
    """Best cell(s) per column, compared as displayed (ties all bold): max accuracy or min error."""
    shown = wide.round(decimals)
    best = shown.max() if metric == "accuracy" else shown.min()
    return shown.eq(best, axis=1) & shown.notna()


def _latex_escape(s: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", str(s)).replace("~", r"\textasciitilde{}")


def format_table1(wide: pd.DataFrame, n_star: int | None, metric: str, decimals: int = 1) -> tuple[str, str]:
    """Markdown and LaTeX (booktabs) renderings of Table 1, best value per column in bold."""
    bold = _bold_mask(wide, metric, decimals)

    def cells(fmt_bold: str, missing: str) -> pd.DataFrame:
        out = wide.map(lambda v: missing if pd.isna(v) else f"{v:.{decimals}f}")
        return out.mask(bold, out.map(lambda v: fmt_bold.format(v)))

    what = metric_label(metric)
    at = f"n = {n_star}" if n_star is not None else "each cell's largest n"
    md = f"{what} (%) at {at}; best per column in bold.\n\n" + cells("**{}**", "–").to_markdown() + "\n"
    tex_df = cells(r"\textbf{{{}}}", "--")
    tex_df.index = [_latex_escape(i) for i in tex_df.index]
    tex_df.columns = [_latex_escape(c) for c in tex_df.columns]
    tex_df = tex_df.rename_axis("Method").reset_index()
    tex = tex_df.to_latex(index=False, escape=False, column_format="l" + "r" * (tex_df.shape[1] - 1),
                          caption=f"{what} (\\%) at {_latex_escape(at)}; best per column in bold.",
                          label="tab:main")
    if r"\toprule" not in tex:  # booktabs rules are pandas' default; make sure
        raise RuntimeError("pandas did not produce a booktabs table")
    return md, tex


# -- equal-FLOPs table -------------------------------------------------------------------------------------------
def last_within(points: pd.DataFrame, budget: float) -> pd.Series | None:
    """The point with the most FLOPs (then the largest n) not above ``budget``; None when all cost more."""
    under = points[points["flops"] <= budget]
    return None if under.empty else under.sort_values(["flops", "n"]).iloc[-1]


def equal_flops_table(df: pd.DataFrame, slack: float = 0.05) -> pd.DataFrame:
    """Per dataset, every series at the same compute: the budget F* is the smallest of the series' largest
    FLOPs (so every series reaches it), and each series contributes its point with the most FLOPs not above F*.

    This is the paper's comparison axis. Table 1 compares at equal n, which is unfair once methods differ in
    the cost of one output (a CARDS sample costs several LM and RM calls, a QAlign step about half a sample).
    A series whose cheapest point already costs more than F* gets an empty row, not a point past the budget.
    ``slack``: points up to this fraction over F* count as equal compute (BoN at n/2 costs a few percent more
    than MV at n with an RM of the policy's size, because the RM reads the prompt as well).
    """
    rows = []
    for ds, g in _positive_flops(df).groupby("dataset", sort=True):
        f_star = float(g.groupby("series")["flops"].max().min())
        for series in [s for s in series_order(g) if s in set(g["series"])]:
            best = last_within(g[g["series"] == series], f_star * (1 + slack))
            row: dict[str, Any] = {"dataset": ds, "Method": series, "budget_flops": f_star}
            if best is not None:
                row.update(n=int(best["n"]), flops=float(best["flops"]), y=float(best["y"]),
                           y_low=float(best["y_low"]), y_high=float(best["y_high"]))
            rows.append(row)
    cols = ["dataset", "Method", "budget_flops", "n", "flops", "y", "y_low", "y_high"]
    return pd.DataFrame(rows).reindex(columns=cols)


def budget_grid(df: pd.DataFrame, max_columns: int = 5) -> list[float]:
    """FLOPs budgets on a 1-2-5 grid from the cheapest point to the largest one measured, closed by the largest
    rounded up to one significant digit, thinned to at most ``max_columns`` (always keeping both ends)."""
    f = _positive_flops(df)["flops"]
    if f.empty:
        return []
    lo, hi = float(f.min()), float(f.max())
    grid = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 5) if lo <= m * 10.0**e <= hi]
    if not grid or grid[-1] < hi:  # close with hi rounded up to one significant digit: every point fits
        unit = 10.0 ** math.floor(math.log10(hi))
        grid.append(math.ceil(hi / unit) * unit)
    if len(grid) > max_columns:
        idx = np.unique(np.round(np.linspace(0, len(grid) - 1, max_columns)).astype(int))
        grid = [grid[i] for i in idx]
    return grid


def budget_table(df: pd.DataFrame, budgets: Sequence[float]) -> pd.DataFrame:
    """Rows = series, columns = FLOPs budgets; a cell is ``(y, n)`` of the series' point with the most FLOPs
    within that budget, None when even its first output costs more. A series that stops below a budget keeps its
    last point there: it *is* within the budget, only without using all of it."""
    points = _positive_flops(df)
    out = pd.DataFrame(index=pd.Index(series_order(df), name="Method"))
    for b in budgets:
        cells = [last_within(points[points["series"] == s], b * (1 + 1e-9)) for s in out.index]
        out[f"≤ {b:.0e}".replace("e+", "e")] = [None if c is None else (float(c["y"]), int(c["n"])) for c in cells]
    return out


def format_budget_tables(df: pd.DataFrame, metric: str) -> str:
    """Markdown: per dataset, each series within each budget of ``budget_grid``, as "y% (n)"."""
    parts = []
    for ds in sorted(df["dataset"].unique()):
        d = df[df["dataset"] == ds]
        grid = budget_table(d, budget_grid(d)).map(lambda c: "–" if c is None else f"{c[0] * 100:.1f} ({c[1]})")
        parts.append(f"### {ds}: {metric_label(metric).lower()} (%) within each FLOPs budget per prompt "
                     "(n = outputs used)\n\n" + grid.to_markdown() + "\n")
    return "\n".join(parts)


def format_equal_flops(table: pd.DataFrame, metric: str, decimals: int = 1) -> str:
    """Markdown: one section per dataset, the metric in percent with its 95 % CI, best value in bold."""
    what = metric_label(metric)
    parts = []
    for ds, g in table.groupby("dataset", sort=True):
        shown = (g["y"] * 100).round(decimals)
        best = shown.max() if metric == "accuracy" else shown.min()
        cells = []
        for (_, r), v in zip(g.iterrows(), shown):
            if pd.isna(r["y"]):
                cells.append({"Method": r["Method"], "n": "–", "FLOPs / prompt": "–", f"{what} (%)": "–",
                              "95% CI": "–"})
                continue
            val = f"{v:.{decimals}f}"
            cells.append({"Method": r["Method"], "n": int(r["n"]), "FLOPs / prompt": f"{r['flops']:.3g}",
                          f"{what} (%)": f"**{val}**" if v == best else val,
                          "95% CI": f"[{r['y_low'] * 100:.{decimals}f}, {r['y_high'] * 100:.{decimals}f}]"})
        budget = float(g["budget_flops"].iloc[0])
        parts.append(f"### {ds}: {what.lower()} at equal compute (≤ {budget:.3g} FLOPs per prompt)\n\n"
                     + pd.DataFrame(cells).to_markdown(index=False) + "\n")
    return "\n".join(parts)


# -- the stage ---------------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "dataset"


def style_path(style: str | None) -> Path:
    path = Path(style) if style else STYLE_PATH
    if not path.is_file():
        raise ConfigError(f"plot.style={str(path)!r} is not a file; allowed: null (the packaged style) or a "
                          ".mplstyle path")
    return path


def make_plots(table: pd.DataFrame, fig_dir: Path, table_dir: Path, metric: str = "accuracy",
               style: str | None = None) -> list[Path]:
    """Every figure and Table 1 for a prediction table; returns the written paths."""
    df = with_metric(table, metric)
    paths: list[Path] = []
    with plt.style.context(str(style_path(style))):
        styles = series_styles(df)
        for ds in sorted(df["dataset"].unique()):
            paths += save(figure_dataset(df, styles, metric, ds), fig_dir / f"{metric}_vs_flops_{_slug(ds)}")
        paths += save(figure_grid(df, styles, metric), fig_dir / f"{metric}_vs_flops_grid")
        paths += save(figure_reward(df, styles, metric), fig_dir / f"reward_vs_{metric}")
    wide, n_star = table1(df, metric)
    md, tex = format_table1(wide, n_star, metric)
    table_dir.mkdir(parents=True, exist_ok=True)
    equal = format_equal_flops(equal_flops_table(df), metric) + "\n" + format_budget_tables(df, metric)
    for name, text in (("table1.md", md), ("table1.tex", tex), ("equal_flops.md", equal)):
        (table_dir / name).write_text(text, encoding="utf-8")
        paths.append(table_dir / name)
    return paths


def plot(cfg: Any) -> list[Path]:
    """Run the stage for a composed config."""
    root = Path(str(cfg.output_root))
    exp = str(cfg.experiment_name)
    p = cfg.get("plot") or {}
    inputs = [root / "predictions" / exp / "predictions.csv"] + [Path(str(x)) for x in (p.get("inputs") or [])]
    runs = cfg.get("runs")
    if runs is not None and not isinstance(runs, str):
        runs = [str(r) for r in runs]
    table = load_predictions(inputs, runs)
    paths = make_plots(table, root / "figures" / exp, root / "tables" / exp, str(p.get("metric", "accuracy")),
                       p.get("style"))
    print(f"wrote {len(paths)} files under {root / 'figures' / exp} and {root / 'tables' / exp}")
    return paths


def main() -> None:
    from qalign_repro.cli import entry_point

    entry_point(plot)()


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.plot import main as _main

    _main()
