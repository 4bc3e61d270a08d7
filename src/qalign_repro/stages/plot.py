"""``python -m qalign_repro.plot``: paper-style figures and Table 1 from the prediction table.

Reads ``<output_root>/predictions/<experiment_name>/predictions.csv`` (plus any ``plot.inputs`` CSVs; rows
filtered by ``runs`` when it is a list of globs) and writes
    figures/<experiment>/<metric>_vs_flops_<dataset>.{pdf,png}   one panel per dataset (paper Fig. 2)
    figures/<experiment>/<metric>_vs_flops_grid.{pdf,png}        all datasets (+ their average), like Fig. 3/6
    figures/<experiment>/reward_vs_<metric>.{pdf,png}            mean selected reward vs metric as n grows
    figures/<experiment>/beta_sweep_<dataset>.{pdf,png}          QAlign metric at one n, and acceptance, vs β
                                                                 (when >= 2 QAlign series differ only in β)
    tables/<experiment>/table1.{md,tex}                          methods x datasets at the largest common n
A series is one selection rule of one run configuration: its label is the paper's method name plus the config
values that differ between the runs of that method (``series.assign_variants``), e.g. "QAlign β=0.005", and it
keeps its colour, marker and linestyle in every figure. What all series share (model, RM, β, prompts) goes in
the titles. Style: the packaged ``plot_style.mplstyle`` or ``plot.style``; the Agg backend, no display needed.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from qalign_repro.analysis import selection as sel  # noqa: E402
from qalign_repro.analysis.paper import comparison_markdown  # noqa: E402
from qalign_repro.errors import ConfigError, DataError  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.backends.backend_agg import FigureCanvasAgg

STYLE_PATH = Path(__file__).resolve().parent / "plot_style.mplstyle"
METRICS = ("accuracy", "error")
#: rules that read a chain (a β sweep's rows) and rules whose result depends on β (``selection.Rule``)
CHAIN_RULES = sel.rules_where(follows_chain=True)
BETA_RULES = sel.rules_where(uses_beta=True)
#: paper order of the families (``selection.Rule.family``), and their colours (Okabe-Ito, colour-blind safe)
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
    for col, default in (("variant", ""), ("chains", 1), ("beta", np.nan), ("n_prompts", np.nan),
                         ("acceptance", np.nan), ("acceptance_low", np.nan), ("acceptance_high", np.nan),
                         ("acceptance_changed", np.nan)):
        if col not in table:  # tables written before these columns existed
            table[col] = default
    table["variant"] = ["" if pd.isna(v) else str(v) for v in table["variant"]]
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


#: per family: linestyle, marker, filled marker. MV solid/filled and WMV dashed/hollow, so equal points of the two
#: stay visible (one's open marker rings the other's filled one)
FAMILY_LOOK = {"QAlign": ("-", "o", True), "MV": ("-", "s", True), "WMV": ("--", "^", False),
               "BoN": (":", "D", False)}
LINESTYLES = ("-", "--", ":", "-.")
#: CI whiskers: thin, capped, a little transparent, so several series' intervals can be told apart
ERRORBAR: dict[str, Any] = {"capsize": 2.0, "elinewidth": 0.7, "capthick": 0.7}


def ci_note(df: pd.DataFrame) -> str | None:
    """The legend title saying what the whiskers are (None when the rows have no CI)."""
    if not df["y_low"].notna().any():
        return None
    levels = sorted(set(df["ci_level"].dropna())) if "ci_level" in df else []
    level = f"{levels[0] * 100:g}% " if len(levels) == 1 else ""
    return f"bars: {level}bootstrap CI over prompts"


#: shift, in points, of a series whose points coincide with an earlier series' (else one hides the other)
COINCIDENT_SHIFT_PT = 2.0


def series_styles(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """One colour/marker/linestyle per series, fixed for the whole table so every figure agrees: the first
    series of a family gets the family colour and look, further ones (sweep points, other models, random
    orders) the extra palette with their own linestyle and marker."""
    styles: dict[str, dict[str, Any]] = {}
    fam_of = dict(zip(table["series"], table["family"]))
    used: dict[str, int] = {}
    extra = iter(EXTRA_COLORS * 4)
    for k, s in enumerate(series_order(table)):
        fam = fam_of[s]
        seen = used.get(fam, 0)
        used[fam] = seen + 1
        if fam in FAMILY_COLORS and seen == 0:
            ls, marker, filled = FAMILY_LOOK.get(fam, ("-", "o", True))
            color = FAMILY_COLORS[fam]
        else:
            color, ls = next(extra), LINESTYLES[(seen + 1) % len(LINESTYLES)]
            marker, filled = MARKERS[k % len(MARKERS)], k % 2 == 0
        styles[s] = {"color": color, "linestyle": ls, "marker": marker, "filled": filled}
    return styles


def line_kw(style: Mapping[str, Any]) -> dict[str, Any]:
    """``Axes.plot`` keywords of a series style (hollow markers: white face, coloured edge)."""
    return {"color": style["color"], "linestyle": style["linestyle"], "marker": style["marker"],
            "markerfacecolor": style["color"] if style.get("filled", True) else "white",
            "markeredgecolor": style["color"], "markeredgewidth": 0.9}


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


def _values(df: pd.DataFrame, col: str) -> list[str]:
    return sorted({str(v) for v in df[col].dropna()}) if col in df else []


def describe(df: pd.DataFrame) -> str:
    """What a caption must say about the rows of a figure: model, RM, β and prompts, each only when it is one
    value (values that differ between series are in the legend instead)."""
    parts = []
    models, rms = _values(df, "model"), _values(df, "reward_model")
    if len(models) == 1:
        parts.append(f"model {models[0]}")
    if len(rms) == 1:
        parts.append(f"RM {rms[0]}")
    if "beta" in df:
        uses_beta = df["rule"].isin(BETA_RULES) if "rule" in df else df["family"] != "MV"
        betas = sorted(set(df.loc[uses_beta, "beta"].dropna()))
        if len(betas) == 1:
            parts.append(f"β={betas[0]:.3g}")  # the title summarises; tables keep every digit
    if "n_prompts" in df and df["n_prompts"].notna().any():
        sizes = sorted({int(v) for v in df["n_prompts"].dropna()})
        parts.append(f"{sizes[0]} prompts" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]} prompts")
    if "chains" in df and (df["chains"].fillna(1) > 1).any() and df["chains"].nunique() == 1:
        parts.append(f"{int(df['chains'].iloc[0])} chains per prompt")
    return ", ".join(parts)


def metric_ylim(ax: plt.Axes, values: Sequence[float], min_span: float = 0.2) -> None:
    """y-limits for a rate in [0, 1]: the data (CIs included) plus a margin, never outside [0, 1], and never
    narrower than ``min_span`` (an all-zero curve sits on the floor of [0, 0.2], not in -0.04..0.04)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    pad = max(0.02, 0.06 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        lo, hi = (0.0, min_span) if lo < 0 else (1.0 - min_span, 1.0) if hi > 1 else (lo, hi)
    ax.set_ylim(lo, hi)


def _sci(x: float) -> str:
    e = math.floor(math.log10(x) + 1e-9)
    m = x / 10.0**e
    return f"$10^{{{e}}}$" if abs(m - 1) < 1e-6 else f"${m:g}{{\\times}}10^{{{e}}}$"


#: tick mantissas per decade, densest first; the densest whose labels do not overlap is used
_TICK_SUBS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 5), (1, 3), (1,))


def log_axis(ax: plt.Axes, values: Sequence[float], label: str) -> None:
    """A log x-axis over ``values`` (> 0) with labelled ticks that never overlap. Over less than two decades
    the ticks share one power of ten, written once in the axis label ("FLOPs per prompt (×10⁹)"), so a label is
    a short number; over more, decades are labelled as powers of ten. The tick set is fixed by
    ``fit_log_ticks`` once the figure's layout is final."""
    v = np.asarray([x for x in values if x > 0], dtype=float)
    ax.set_xscale("log")
    if not v.size:
        ax.set_xlabel(label)
        return
    lo, hi = float(v.min()), float(v.max())
    span = max(math.log10(hi / lo), 0.3)
    margin = 0.06 * span
    left, right = lo / 10**margin, hi * 10**margin
    ax.set_xlim(left, right)
    ax.xaxis.set_minor_locator(mticker.LogLocator(base=10, subs="auto", numticks=50))
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    if math.log10(right / left) < 2:
        e = math.floor(math.log10(math.sqrt(left * right)))
        ax.set_xlabel(f"{label} ($\\times 10^{{{e}}}$)")
        ax._qalign_log_ticks = ("common", e)  # type: ignore[attr-defined]
    else:
        ax.set_xlabel(label)
        ax._qalign_log_ticks = ("decades", 0)  # type: ignore[attr-defined]
    _set_log_ticks(ax, 0)


def _candidate_ticks(ax: plt.Axes, level: int) -> list[float]:
    left, right = ax.get_xlim()
    mode, _ = getattr(ax, "_qalign_log_ticks", ("decades", 0))
    e0, e1 = math.floor(math.log10(left)) - 1, math.ceil(math.log10(right)) + 1
    if mode == "decades":
        step = 1 << level  # every decade, every 2nd, 4th, ...
        ticks = [10.0**e for e in range(e0, e1 + 1) if e % step == 0]
    else:
        subs = _TICK_SUBS[min(level, len(_TICK_SUBS) - 1)]
        ticks = [m * 10.0**e for e in range(e0, e1 + 1) for m in subs]
        inside = [t for t in ticks if left <= t * (1 + 1e-9) and t <= right * (1 + 1e-9)]
        if len(inside) < 2:  # narrower than the gaps between mantissas: evenly spaced round numbers
            ticks = list(mticker.MaxNLocator(nbins=max(2, 5 - level), steps=[1, 2, 2.5, 5, 10])
                         .tick_values(left, right))
    return [t for t in ticks if left <= t * (1 + 1e-9) and t <= right * (1 + 1e-9)]


def _set_log_ticks(ax: plt.Axes, level: int) -> None:
    mode, e = getattr(ax, "_qalign_log_ticks", ("decades", 0))
    ticks = _candidate_ticks(ax, level)
    ax.xaxis.set_major_locator(mticker.FixedLocator(ticks))
    if mode == "common":
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _pos: f"{x / 10.0**e:.3g}"))
    else:
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _pos: _sci(x)))


def visible_tick_labels(ax: plt.Axes, axis: str = "x") -> list[Any]:
    """The tick labels matplotlib draws: non-empty and at a tick inside the view limits (``get_xticklabels``
    also lists the locator's ticks just outside them)."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    return [t for loc, t in zip(a.get_majorticklocs(), a.get_majorticklabels())
            if lo - 1e-9 * abs(lo) <= loc <= hi + 1e-9 * abs(hi) and t.get_visible() and t.get_text()]


def tick_labels_overlap(ax: plt.Axes, renderer: Any, gap_pt: float = 4.0) -> bool:
    """Whether any two drawn x tick labels of ``ax`` overlap or nearly touch (window extents, after a draw;
    less than ``gap_pt`` points apart reads as one number, "9 10" as "910")."""
    boxes = [t.get_window_extent(renderer) for t in visible_tick_labels(ax)]
    boxes.sort(key=lambda b: b.x0)
    gap = renderer.points_to_pixels(gap_pt)
    return any(b.x0 < a.x1 + gap for a, b in zip(boxes, boxes[1:]))


def fit_log_ticks(fig: Figure) -> None:
    """For every axis set up by ``log_axis``: the densest tick set whose labels do not overlap (measured on
    the drawn figure, so font, size and layout are the real ones)."""
    todo = {ax: 0 for ax in fig.axes if hasattr(ax, "_qalign_log_ticks") and ax.get_visible()}
    while todo:  # one draw per round for all panels still overlapping
        for ax, level in todo.items():
            _set_log_ticks(ax, level)
        fig.canvas.draw()
        renderer = cast("FigureCanvasAgg", fig.canvas).get_renderer()  # matplotlib.use("Agg") above
        last = {ax: (len(_TICK_SUBS) if ax._qalign_log_ticks[0] == "common" else 6) - 1
                for ax in todo}
        todo = {ax: level + 1 for ax, level in todo.items()
                if level < last[ax] and tick_labels_overlap(ax, renderer)}


def _new_figure(width: float, height: float) -> Figure:
    return plt.figure(figsize=(width, height), layout="constrained")


def _shift_if_coincident(ax: plt.Axes, kw: dict[str, Any], points: set[tuple[float, float]],
                         drawn: set[tuple[float, float]], shifted: int) -> int:
    """A series with a point on top of an earlier series' point is moved a hair sideways (``kw["transform"]``)
    so that both stay visible; returns the updated count of shifted series."""
    if points & drawn:
        shifted += 1
        # cast: ax.figure is typed Figure | SubFigure; the panels here sit on top-level figures (_new_figure)
        kw["transform"] = mtransforms.offset_copy(ax.transData, fig=cast(Figure, ax.figure),
                                                  x=COINCIDENT_SHIFT_PT * shifted, units="points")
    drawn |= points
    return shifted


def draw_metric_vs_flops(ax: plt.Axes, df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str,
                         title: str) -> None:
    """One line per series of metric vs FLOPs (log-x), with capped CI whiskers when the rows have a CI:
    whiskers of several series stay apart where bands would pile into one grey area."""
    ys: list[float] = []
    xs: list[float] = []
    present = [s for s in styles if s in set(df["series"])]
    drawn: set[tuple[float, float]] = set()
    shifted = 0
    for z, s in enumerate(present):
        d = _positive_flops(df[df["series"] == s]).sort_values("n")
        if d.empty:
            continue
        kw = line_kw(styles[s])
        zorder = 3 + (len(present) - z) * 0.01  # the paper's first family on top
        points = {(round(math.log10(x), 3), round(y, 4)) for x, y in zip(d["flops"], d["y"])}
        shifted = _shift_if_coincident(ax, kw, points, drawn, shifted)
        if d["y_low"].notna().all():
            yerr = np.vstack([(d["y"] - d["y_low"]).clip(lower=0), (d["y_high"] - d["y"]).clip(lower=0)])
            bars = ax.errorbar(d["flops"], d["y"], yerr=yerr, label=s, zorder=zorder, **ERRORBAR, **kw)
            for whiskers in bars.lines[2]:
                whiskers.set_alpha(0.55)
            artists: Sequence[Artist] = [bars.lines[0], *bars.lines[1], *bars.lines[2]]
            ys += list(d["y_low"]) + list(d["y_high"])
        else:
            artists = ax.plot(d["flops"], d["y"], label=s, zorder=zorder, **kw)
        for artist in artists:
            artist.set_clip_on(False)  # a point at accuracy 1.0 is drawn whole, not cut by the frame
            if "transform" in kw:
                artist.set_transform(kw["transform"])
        ys += list(d["y"])
        xs += list(d["flops"])
    log_axis(ax, xs, "FLOPs per prompt")
    ax.set_ylabel(metric_label(metric))
    metric_ylim(ax, ys)
    ax.set_title(title)


def figure_dataset(df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str, dataset: str) -> Figure:
    d = df[df["dataset"] == dataset]
    n_series = len([s for s in styles if s in set(d["series"])])
    w, h = plt.rcParams["figure.figsize"]
    rows = 0 if n_series <= 4 else math.ceil(n_series / 2)
    fig = _new_figure(w, h + 0.17 * rows + 0.25)
    ax = fig.add_subplot()
    info = describe(d)
    draw_metric_vs_flops(ax, d, styles, metric, f"{dataset}\n{info}" if info else dataset)
    note = ci_note(d)
    if rows:  # many series: below the axes, where they hide no curve
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, title=note,
                   title_fontsize=6)
    else:
        ax.legend(loc="best", title=note, title_fontsize=6)
    fit_log_ticks(fig)
    return fig


def _grid(n_panels: int) -> tuple[int, int]:
    cols = min(3, n_panels)
    return math.ceil(n_panels / cols), cols


def _shared_legend(fig: Figure, axes: Sequence[plt.Axes], styles: Mapping[str, Any], cols: int,
                   title: str | None = None) -> None:
    """One legend for all panels, inside the figure below them (constrained layout makes room; above them it
    would collide with the suptitle)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lb, hd)
    order = [s for s in styles if s in seen]
    if order:
        fig.legend([seen[s] for s in order], order, loc="outside lower center",
                   ncol=max(1, min(4, 2 * cols, len(order))), title=title, title_fontsize=6)


def _panel_figure(df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], rows: int, cols: int,
                  title_height: float) -> tuple[Figure, Any]:
    """A figure of ``rows`` x ``cols`` panels sized for them plus the rows of the shared legend below
    (as many series per row as ``_shared_legend`` puts there) and ``title_height`` inches of title."""
    w, h = plt.rcParams["figure.figsize"]
    n_series = len([s for s in styles if s in set(df["series"])])
    legend_rows = math.ceil(n_series / max(1, min(4, 2 * cols)))
    fig = _new_figure(w * cols * 0.85 + 0.6 * (cols == 1), h * rows * 0.85 + 0.2 * legend_rows + title_height)
    return fig, fig.subplots(rows, cols, squeeze=False)


def figure_grid(df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str) -> Figure:
    """A panel per dataset, plus the cross-dataset average when there are several, one shared legend."""
    datasets = sorted(df["dataset"].unique())
    panels = [(d, df[df["dataset"] == d]) for d in datasets]
    if len(datasets) > 1:
        avg = average_over_datasets(df)
        if not avg.empty:
            panels.append(("average over datasets", avg))
    rows, cols = _grid(len(panels))
    fig, axes = _panel_figure(df, styles, rows, cols, title_height=0.5)
    for ax, (title, d) in zip(axes.flat, panels):
        draw_metric_vs_flops(ax, d, styles, metric, title)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    _shared_legend(fig, list(axes.flat[: len(panels)]), styles, cols, ci_note(df))
    info = describe(df)
    fig.suptitle(f"{metric_label(metric)} vs compute" + (f"\n{info}" if info else ""), fontsize=9)
    fit_log_ticks(fig)
    return fig


def figure_reward(df: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]], metric: str) -> Figure:
    """Mean reward of the selected output vs the metric, one line per series per dataset, in order of n:
    reward rising while accuracy falls is over-optimisation of the RM (BoN in the paper)."""
    datasets = sorted(df["dataset"].unique())
    rows, cols = _grid(len(datasets))
    fig, axes = _panel_figure(df, styles, rows, cols, title_height=0.4)
    for ax, ds in zip(axes.flat, datasets):
        d = df[df["dataset"] == ds]
        ys: list[float] = []
        drawn: set[tuple[float, float]] = set()
        labelled: set[tuple[str, float, float]] = set()  # series that start at one point share one "n=1"
        shifted = 0
        xs: list[float] = []
        for s in [s for s in styles if s in set(d["series"])]:
            e = d[d["series"] == s].sort_values("n")
            st = styles[s]
            kw = line_kw(st)
            shifted = _shift_if_coincident(ax, kw, {(round(x, 6), round(y, 4)) for x, y in
                                                    zip(e["mean_reward_selected"], e["y"])}, drawn, shifted)
            ax.plot(e["mean_reward_selected"], e["y"], label=s, clip_on=False, **kw)
            ys += list(e["y"])
            xs += list(e["mean_reward_selected"])
            ends = e.iloc[[0, -1]] if len(e) > 1 else e
            for (_, r), below in zip(ends.iterrows(), (len(e) > 1, False)):
                text, at = f"n={int(r['n'])}", (r["mean_reward_selected"], r["y"])
                key = (text, round(float(at[0]), 6), round(float(at[1]), 4))
                if key in labelled:
                    continue
                labelled.add(key)
                # the start below its point, where the rising curves leave room; the end above it
                ax.annotate(text, at, fontsize=6, xytext=(2, -8 if below else 2), textcoords="offset points",
                            color=st["color"])
        ax.set_xlabel("Mean reward of the selected output")
        ax.set_ylabel(metric_label(metric))
        ax.xaxis.set_major_locator(mticker.MaxNLocator(nbins=5))
        finite = [x for x in xs if np.isfinite(x)]
        if finite:  # explicit: shifted series do not take part in autoscaling
            lo, hi = min(finite), max(finite)
            pad = 0.06 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 0.05)
            ax.set_xlim(lo - pad, hi + pad)
        metric_ylim(ax, ys)
        info = describe(d)
        ax.set_title(f"{ds}\n{info}" if info and len(datasets) > 1 else ds)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    _shared_legend(fig, list(axes.flat[: len(datasets)]), styles, cols)
    if len(datasets) == 1:
        info = describe(df)
        fig.suptitle("Selected reward vs " + metric_label(metric).lower() + (f"\n{info}" if info else ""),
                     fontsize=9)
    return fig


# -- β sweep ---------------------------------------------------------------------------------------------------
def _without_beta(variant: str) -> str:
    return " ".join(p for p in str(variant or "").split() if not p.startswith("β="))


def beta_sweeps(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per dataset, the QAlign rows of the series that differ only in β (at least two β values and the same
    ``sweep_key``, the hash of everything else; tables without it group by the label without β); ``sweep``
    names each group by its other distinguishing values."""
    if "beta" not in df or "variant" not in df:
        return {}
    q = df[df["rule"].isin(CHAIN_RULES) & (df["order"] == "first") & df["beta"].notna()].copy()
    q["sweep"] = [_without_beta(v) for v in q["variant"].fillna("")]
    keys = q["sweep_key"] if "sweep_key" in q and q["sweep_key"].notna().all() else q["sweep"]
    q["sweep_group"] = keys.astype(str).tolist()
    out = {}
    for ds, g in q.groupby("dataset", sort=True):
        keep = g.groupby("sweep_group")["beta"].transform("nunique") >= 2
        if keep.any():
            out[str(ds)] = g[keep]
    return out


def _sweep_budget(g: pd.DataFrame) -> int:
    """The largest n every run of the sweep reached."""
    common = set.intersection(*[set(x["n"]) for _, x in g.groupby("run")])
    return int(max(common)) if common else int(g["n"].min())


def figure_beta_sweep(df: pd.DataFrame, sweep: pd.DataFrame, styles: Mapping[str, Mapping[str, Any]],
                      metric: str, dataset: str) -> Figure:
    """QAlign's metric at one budget vs β (with CIs, the ancestral rules at the same n as reference lines) and
    the chains' acceptance vs β: a small β follows the RM (low acceptance), a large one the LM."""
    w, h = plt.rcParams["figure.figsize"]
    fig = _new_figure(w * 1.75, h + 0.5)
    ax_m, ax_a = fig.subplots(1, 2)
    n_star = _sweep_budget(sweep)
    groups = [(str(g["sweep"].iloc[0]), g) for _, g in sweep.groupby("sweep_group", sort=True)]
    fam = str(sweep["family"].iloc[0])  # the chain rule's family names the sweep ("QAlign")
    colors = iter([FAMILY_COLORS.get(fam, EXTRA_COLORS[0]), *EXTRA_COLORS])
    ys: list[float] = []
    for name, g in groups:
        color = next(colors)
        at = g[g["n"] == n_star].sort_values("beta")
        label = f"{fam} {name}".strip() if name or len(groups) > 1 else fam
        yerr = np.vstack([(at["y"] - at["y_low"]).clip(lower=0), (at["y_high"] - at["y"]).clip(lower=0)])
        ax_m.errorbar(at["beta"], at["y"], yerr=yerr, color=color, marker="o", label=label, clip_on=False,
                      **ERRORBAR)
        ys += list(at["y_low"]) + list(at["y_high"]) + list(at["y"])
        per_run = g.drop_duplicates("run").sort_values("beta")
        if per_run["acceptance"].notna().any():
            aerr = np.vstack([(per_run["acceptance"] - per_run["acceptance_low"]).clip(lower=0),
                              (per_run["acceptance_high"] - per_run["acceptance"]).clip(lower=0)])
            ax_a.errorbar(per_run["beta"], per_run["acceptance"], yerr=aerr, color=color, marker="o",
                          label=f"{label}: all proposals", clip_on=False, **ERRORBAR)
        if per_run["acceptance_changed"].notna().any():
            ax_a.plot(per_run["beta"], per_run["acceptance_changed"], color=color, marker="s", linestyle="--",
                      markerfacecolor="white", label=f"{label}: proposals ≠ current state", clip_on=False)
    others = df[(df["dataset"] == dataset) & ~df["rule"].isin(CHAIN_RULES) & (df["n"] == n_star)
                & (df["order"] == "first")]
    for s in [s for s in styles if s in set(others["series"])]:
        r = others[others["series"] == s].iloc[0]
        ax_m.axhline(r["y"], color=styles[s]["color"], linestyle=styles[s]["linestyle"], linewidth=1.0,
                     label=f"{s} (n={n_star})")
        ys.append(float(r["y"]))
    for ax in (ax_m, ax_a):
        ax.set_xscale("log")
        ax.set_xlabel(f"β ({fam} target temperature)")
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _p: f"{x:g}"))
    ax_m.set_ylabel(f"{metric_label(metric)} at n = {n_star}")
    metric_ylim(ax_m, ys)
    ax_m.set_title(f"{metric_label(metric)} vs β")
    ax_a.set_ylabel("Acceptance rate")
    ax_a.set_ylim(0.0, 1.0)
    ax_a.set_title("Chain acceptance vs β")
    note = ci_note(sweep)
    ax_m.legend(loc="best", fontsize=6, title=note, title_fontsize=6)
    if ax_a.get_legend_handles_labels()[0]:
        ax_a.legend(loc="lower right", fontsize=6, title=note, title_fontsize=6)
    info = describe(df[df["dataset"] == dataset].assign(beta=np.nan))
    fig.suptitle(f"{dataset}: {fam} β sweep" + (f" ({info})" if info else ""), fontsize=9)
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
    """Numeric Table 1 (percent): rows = series, columns = datasets + "Avg" (rows covering every dataset; only
    with several datasets, where it is not a copy of the one column), at the largest common budget (each cell's
    largest n when there is none)."""
    n_star = largest_common_budget(df)
    d = df[df["n"] == n_star] if n_star is not None else df.sort_values("n").groupby(["series", "dataset"]).tail(1)
    wide = d.pivot_table(index="series", columns="dataset", values="y", aggfunc="first") * 100.0
    wide = wide.reindex([s for s in series_order(df) if s in wide.index])
    wide = wide[sorted(wide.columns)]
    if wide.shape[1] > 1:
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
    """Escape LaTeX specials; β (sweep labels) becomes math so pdflatex needs no unicode setup."""
    out = re.sub(r"([&%$#_{}])", r"\\\1", str(s)).replace("~", r"\textasciitilde{}")
    return out.replace("β", r"$\beta$")


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
        for ds, sweep in beta_sweeps(df).items():
            paths += save(figure_beta_sweep(df, sweep, styles, metric, ds), fig_dir / f"beta_sweep_{_slug(ds)}")
    wide, n_star = table1(df, metric)
    md, tex = format_table1(wide, n_star, metric)
    table_dir.mkdir(parents=True, exist_ok=True)
    equal = format_equal_flops(equal_flops_table(df), metric) + "\n" + format_budget_tables(df, metric)
    free = sorted({str(r) for r in df.get("reward_model", []) if "0 FLOPs" in str(r)})  # python rewards (flops.py)
    if free:
        equal += "\nRewards and their FLOPs: " + "; ".join(free) + " (a Python reward reads no tokens with a model).\n"
    for name, text in (("table1.md", md), ("table1.tex", tex), ("equal_flops.md", equal),
                       ("paper_comparison.md", comparison_markdown(table))):
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
    from qalign_repro.stages.plot import main as _main

    _main()
