"""The paper's published numbers as data, and our runs checked against them (``paper_comparison.md``).

A reproduction is only as convincing as its comparison with what was published, and a comparison is only
honest when the settings match: the same benchmark and metric, the same method and selection rule, the same
models and the same budget. This module loads the transcription of Faria & Smith (2025), Table 1
(``data/paper/qalign_2025.json``, described in its ``SOURCE.md``), decides for every series of a prediction
table whether a published row matches it, and renders ours vs. published with the difference and whether the
published value lies inside our bootstrap CI. Series that match nothing are listed with the reasons, so a run
on the tiny default says plainly why it is not comparable instead of printing nothing.

A prediction series (one run, one rule, one order, one dataset) matches a published row when all of these hold:
    dataset      the row's dataset, graded with the metric the paper reports (``datasets.<name>.our_metrics``)
    method/rule  QAlign = a ``qalign`` run with rule ``qalign``; MV = an ``ancestral`` run with ``mv`` (``mbr`` on
                 IFEval); WMV = ``ancestral`` with ``wmv`` / ``wmbr``; BoN = ``ancestral`` with ``bon``
    model        the table's ``model`` is an alias of the row's model (``models.<id>.aliases``: the config name,
                 the hub id and its last component, which is what ``model.name`` becomes for a local copy)
    RM           for rows that use one (BoN, WMV, QAlign), ``reward_model`` is an alias of the row's RM
    chains       the experiment's chains per prompt (1)
    budget       the comparison is at n = the experiment's ``budget_n``; a series without that n does not match
β is not checked: our copy of the paper does not state it (both sides tune it for an acceptance target); the
table shows our β. Temperature, prompts and max_new_tokens are not in the prediction table and are not checked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from qalign_repro.errors import DataError

DATA_FILE = "qalign_2025.json"
#: paper method -> (our method, our rules). Data, not a dispatch: it transcribes which of our registered methods
#: and selection rules reproduce each row of the paper's Table 1, the way ``models.<id>.aliases`` in the data file
#: transcribes model names. Nothing branches on a method here (a new method simply matches no published row), so
#: this stays a table of names rather than a query of the methods' declarations.
METHOD_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "QAlign": ("qalign", ("qalign",)),
    "MV": ("ancestral", ("mv", "mbr")),
    "WMV": ("ancestral", ("wmv", "wmbr")),
    "BoN": ("ancestral", ("bon",)),
}
ROW_FIELDS = ("section", "experiment", "dataset", "method", "model", "reward_model", "value", "value_kind")
NO_DATASET = "average"  # Table 1's Avg column: stored, never matched (it averages five runs)


@dataclass(frozen=True)
class PaperData:
    """The validated contents of the data file."""

    rows: tuple[dict[str, Any], ...]
    models: dict[str, dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    paper: dict[str, Any]
    value_kinds: dict[str, str]

    def settings_of(self, model: str) -> str:
        """The section of the experiment run on ``model``."""
        return next((str(st.get("section")) for st in self.settings.values() if st.get("model") == model), "?")

    def model_id(self, name: Any) -> str | None:
        """The paper's id for one of our model / RM names (case-insensitive alias match), else None."""
        key = str(name).casefold()
        for mid, m in self.models.items():
            if key in {a.casefold() for a in m["aliases"]} or key == mid.casefold():
                return mid
        return None


def _fail(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def load(path: str | Path | None = None) -> PaperData:
    """Read and validate the published figures (default: the packaged file); a malformed file is one
    ``DataError`` line naming the row and field, so a bad edit to the data never yields a silent mismatch."""
    if path is None:
        text = resources.files("qalign_repro").joinpath("data", "paper", DATA_FILE).read_text(encoding="utf-8")
        where = f"data/paper/{DATA_FILE}"
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"paper data file {str(p)!r} does not exist")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(where, f"not valid JSON ({exc})") from None
    for key in ("paper", "value_kinds", "models", "datasets", "settings", "rows"):
        if key not in raw:
            raise _fail(where, f"missing top-level key {key!r}")
    models, datasets, settings = raw["models"], raw["datasets"], raw["settings"]
    for key in ("cite", "arxiv"):
        if not raw["paper"].get(key):
            raise _fail(where, f"paper.{key} is missing")
    for mid, m in models.items():
        if not isinstance(m.get("aliases"), list) or not m["aliases"]:
            raise _fail(where, f"model {mid!r} needs a non-empty 'aliases' list")
    for ds, d in datasets.items():
        if not isinstance(d.get("our_metrics"), list) or not d.get("paper_metric"):
            raise _fail(where, f"dataset {ds!r} needs 'paper_metric' and an 'our_metrics' list")
    rows = []
    for i, row in enumerate(raw["rows"]):
        at = f"{where}: row {i}"
        for f in ROW_FIELDS:
            if f not in row:
                raise DataError(f"{at}: missing field {f!r}; every row needs {', '.join(ROW_FIELDS)}")
        if row["dataset"] not in datasets and row["dataset"] != NO_DATASET:
            raise DataError(f"{at}: dataset {row['dataset']!r} is not one of {sorted(datasets)} or {NO_DATASET!r}")
        if row["method"] not in METHOD_RULES:
            raise DataError(f"{at}: method {row['method']!r}; allowed: {', '.join(METHOD_RULES)}")
        for part in ("model", "reward_model"):
            if row[part] is not None and row[part] not in models:
                raise DataError(f"{at}: {part} {row[part]!r} is not one of {sorted(models)}")
        if row["model"] is None:
            raise DataError(f"{at}: model is null; allowed: one of {sorted(models)}")
        if row["experiment"] not in settings:
            raise DataError(f"{at}: experiment {row['experiment']!r} is not one of {sorted(settings)}")
        if row["value_kind"] not in raw["value_kinds"]:
            raise DataError(f"{at}: value_kind {row['value_kind']!r}; allowed: {sorted(raw['value_kinds'])}")
        v = row["value"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
            raise DataError(f"{at}: value {v!r}; allowed: a number in [0, 100]")
        rows.append(dict(row))
    return PaperData(tuple(rows), models, datasets, settings, raw["paper"], raw["value_kinds"])


# -- matching ---------------------------------------------------------------------------------------------------
def _names(ids: Sequence[str]) -> str:
    return ", ".join(ids)


def match_series(series: pd.DataFrame, data: PaperData) -> tuple[dict[str, Any] | None, pd.Series | None,
                                                                    list[str]]:
    """(published row, our row at its budget, []) when one series of a prediction table matches, else
    (None, None, reasons) with every reason that fails (``series``: the rows of one run, rule and order on one
    dataset)."""
    first = series.iloc[0]
    dataset, method, rule = str(first["dataset"]), str(first["method"]), str(first["rule"])
    reasons: list[str] = []
    if dataset not in data.datasets:
        reasons.append(f"dataset {dataset!r} is not one of the paper's Table 1 datasets "
                       f"({_names(sorted(data.datasets))})")
    model = data.model_id(first["model"])
    paper_models = sorted({r["model"] for r in data.rows})
    if model is None:
        reasons.append(f"model {first['model']!r} is not one of the paper's models ({_names(paper_models)})")
    family = family_of(first)
    if family is None:
        reasons.append(f"method {method!r} with rule {rule!r} has no published counterpart (the paper reports "
                       "QAlign on qalign runs and MV / WMV / BoN on ancestral runs)")
    if reasons:
        return None, None, reasons
    assert model is not None  # a None model is a reason above
    candidates = [r for r in data.rows if r["dataset"] == dataset and r["method"] == family and r["model"] == model]
    if not candidates:
        has = _names(sorted({r["model"] for r in data.rows if r["method"] == family}))
        why = f"the paper publishes no {family} row for {model} on {dataset} (Table 1 has {family} for {has})"
        lost = [st["lost"] for st in data.settings.values() if st.get("model") == model and st.get("lost")]
        return None, None, [why + (f"; §{data.settings_of(model)}: {lost[0]}" if lost else "")]
    row = candidates[0]
    ds = data.datasets[dataset]
    metric = str(first.get("metric", "correct"))
    if metric not in ds["our_metrics"]:
        reasons.append(f"metric {metric!r} is not the paper's {ds['paper_name']} metric ({ds['paper_metric']}: "
                       f"ours {_names(ds['our_metrics'])})")
    if row["reward_model"] is not None and data.model_id(first["reward_model"]) != row["reward_model"]:
        reasons.append(f"reward model {first['reward_model']!r} is not {row['reward_model']}")
    setting = data.settings[row["experiment"]]
    chains = first.get("chains", 1)
    if setting.get("chains") is not None and not pd.isna(chains) and int(chains) != int(setting["chains"]):
        reasons.append(f"{int(chains)} chains per prompt; the published run used {setting['chains']}")
    budget = setting.get("budget_n")
    at = series[series["n"] == budget] if budget is not None else series.iloc[0:0]
    if budget is None:
        reasons.append("the paper states no budget for this row")
    elif at.empty:
        reasons.append(f"budget: the published value is at n = {budget}; this series goes up to "
                       f"n = {int(series['n'].max())}")
    if reasons:
        return None, None, reasons
    return row, at.iloc[0], []


def family_of(row: pd.Series) -> str | None:
    """The paper's method name for one prediction row (None: no counterpart)."""
    return next((fam for fam, (m, rules) in METHOD_RULES.items()
                 if m == str(row["method"]) and str(row["rule"]) in rules), None)


def compare(table: pd.DataFrame, data: PaperData | None = None) -> tuple[pd.DataFrame, list[tuple[str, list[str]]]]:
    """Every matching series of a prediction table against its published row (percent; difference = ours -
    paper in percentage points; ``paper_in_ci`` is None without a CI), and the non-matching series with their
    reasons."""
    data = data or load()
    matched, unmatched = [], []
    for _key, g in table.groupby(["dataset", "run", "rule", "order"], sort=True):
        row, ours, reasons = match_series(g, data)
        label = str(g.iloc[0].get("series", g.iloc[0].get("label", g.iloc[0]["rule"])))
        if row is None:
            unmatched.append((f"{g.iloc[0]['dataset']} / {label} (run {g.iloc[0]['run']})", reasons))
            continue
        assert ours is not None  # match_series returns both rows or neither
        acc = 100.0 * float(ours["accuracy"])
        low, high = 100.0 * float(ours.get("ci_low", math.nan)), 100.0 * float(ours.get("ci_high", math.nan))
        has_ci = not (math.isnan(low) or math.isnan(high))
        matched.append({
            "dataset": ours["dataset"], "method": row["method"], "model": row["model"], "series": label,
            "run": ours["run"], "n": int(ours["n"]), "prompts": ours.get("n_prompts"),
            "beta": ours.get("beta") if family_of(ours) == "QAlign" else None,  # β drives only the chain
            "ours": acc, "ci_low": low, "ci_high": high, "paper": float(row["value"]),
            "difference": acc - float(row["value"]),
            "paper_in_ci": (low <= float(row["value"]) <= high) if has_ci else None,
            "section": row["section"], "note": data.datasets[row["dataset"]].get("note", ""),
        })
    return pd.DataFrame(matched), unmatched


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def render(matched: pd.DataFrame, unmatched: Sequence[tuple[str, list[str]]], data: PaperData) -> str:
    """``paper_comparison.md``: the matches as a table, then every series that matches nothing and why."""
    p = data.paper
    lines = [f"# Ours vs. the paper ({p['cite']}, arXiv {p['arxiv']})", "",
             f"Published values: `qalign_repro/data/paper/{DATA_FILE}` (see its SOURCE.md). A series matches a "
             "published row when dataset and metric, method and selection rule, policy model, RM (for BoN, WMV and "
             "QAlign), chains per prompt and budget n are the paper's; β, temperature and prompts are not "
             "checked (our copy of the paper does not state β). Accuracy in %; difference = ours − paper in "
             "percentage points.", ""]
    if matched.empty:
        lines += ["**No published row matches these runs.**", ""]
    else:
        head = ["dataset", "method", "model", "series", "n", "prompts", "β", "ours", "CI", "paper",
                "ours − paper", "paper in our CI", "source"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in matched.itertuples(index=False):
            verdict = "no CI" if r.paper_in_ci is None else ("yes" if r.paper_in_ci else "no")
            lines.append("| " + " | ".join([
                str(r.dataset), r.method, r.model, str(r.series), str(r.n), _fmt(r.prompts, "g"), _fmt(r.beta, "g"),
                _fmt(r.ours), f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]", _fmt(r.paper), _fmt(r.difference, "+.1f"),
                verdict, f"§{r.section}"]) + " |")
        notes = sorted({(r.dataset, r.note) for r in matched.itertuples(index=False) if r.note})
        if notes:
            lines += [""] + [f"- {ds}: {note}." for ds, note in notes]
        lines.append("")
    if unmatched:
        lines += ["Series with no matching published row:", ""]
        lines += [f"- {what}: {'; '.join(reasons)}." for what, reasons in unmatched]
        lines.append("")
    return "\n".join(lines)


def comparison_markdown(table: pd.DataFrame, data: PaperData | None = None) -> str:
    """What ``plot`` writes to ``tables/<experiment>/paper_comparison.md`` for a prediction table."""
    data = data or load()
    matched, unmatched = compare(table, data)
    return render(matched, unmatched, data)
