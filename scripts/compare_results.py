"""``python scripts/compare_results.py A B``: do two results folders hold the same data?

The check behind "behaviour does not change" for refactors: run the same commands (e.g. ``make demo`` and
``make reproduce-tiny``) before and after on two output roots, then compare. Run stores are compared as data,
table by table and row by row, because their SQLite files also hold what legitimately differs between two
executions (wall-clock times, dates, host, versions, git sha) and the prefix-cache hits that vLLM measures;
those fields are listed in ``VOLATILE`` and left out. Prediction tables, figures' data tables and markdown
tables are compared byte for byte. Prints one line per difference and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

#: keys whose values differ between two executions of the same run (timing, provenance, measured cache hits)
VOLATILE = {"wall_s", "started", "finished", "provenance", "timers", "tokens_cached", "time", "elapsed_s",
            "created", "updated", "host", "git_sha", "versions", "progress", "engine", "seconds", "wall_time_s",
            "environment", "time_in_generate_s", "time_in_reward_s"}
#: result files compared byte for byte (PNG/PDF embed dates and are re-drawn from these tables)
BYTE_SUFFIXES = {".csv", ".md", ".tex", ".txt"}


#: where a checkout keeps the package: paths into it (shipped models, calibration files) name the checkout
_PACKAGE = re.compile(r"^.*?/src/qalign_repro/")


def scrub(value: Any, root: str = "") -> Any:
    """``value`` without its volatile keys, recursively (lists keep their order); paths into the results folder
    ``root`` or into a checkout's package are made relative, so two checkouts or output roots compare equal."""
    if isinstance(value, dict):
        return {k: scrub(v, root) for k, v in value.items() if k not in VOLATILE and not k.endswith("_wall_s")}
    if isinstance(value, list):
        return [scrub(v, root) for v in value]
    if isinstance(value, str):
        return _PACKAGE.sub("<package>/", value.replace(root, "<results>") if root else value)
    return value


def store_rows(path: Path, root: str) -> dict[str, Any]:
    """Every row of a run store, keyed by table and primary key, as scrubbed JSON."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out: dict[str, Any] = {}
        for name, value in con.execute("SELECT name, value FROM fields"):
            out[f"fields/{name}"] = scrub(json.loads(value), root)
        for idx, value in con.execute("SELECT idx, input FROM instances"):
            out[f"instances/{idx}"] = scrub(json.loads(value), root)
        for idx, step, value in con.execute("SELECT idx, step, value FROM outputs"):
            out[f"outputs/{idx}/{step}"] = scrub(json.loads(value), root)
        return out
    finally:
        con.close()


def paths(x: Any, y: Any, at: str = "") -> list[str]:
    """Where two JSON values differ: the dotted paths of the differing leaves (a whole list if its length differs)."""
    if isinstance(x, dict) and isinstance(y, dict):
        return [p for k in sorted(set(x) | set(y)) for p in paths(x.get(k), y.get(k), f"{at}.{k}")]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [p for i, (u, v) in enumerate(zip(x, y)) for p in paths(u, v, f"{at}[{i}]")]
    return [] if x == y else [at]


def compare(a: Path, b: Path) -> list[str]:
    diffs: list[str] = []
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "hydra" not in p.relative_to(a).parts}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "hydra" not in p.relative_to(b).parts}
    for rel in sorted(files_a ^ files_b):
        if rel.suffix in BYTE_SUFFIXES or rel.name == "exp.sqlite":
            diffs.append(f"only in {'A' if rel in files_a else 'B'}: {rel}")
    for rel in sorted(files_a & files_b):
        if rel.name == "exp.sqlite":
            ra, rb = store_rows(a / rel, str(a)), store_rows(b / rel, str(b))
            for key in sorted(set(ra) | set(rb)):
                diffs += [f"{rel.parent.name}: {key}{where} differs" for where in paths(ra.get(key), rb.get(key))]
        elif rel.suffix in BYTE_SUFFIXES and (a / rel).read_bytes() != (b / rel).read_bytes():
            diffs.append(f"{rel} differs")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    diffs = compare(args.a, args.b)
    for line in diffs[:200]:
        print(line)
    n_runs = len(list(args.a.rglob("exp.sqlite")))
    print(f"{len(diffs)} difference(s); {n_runs} run stores and the result tables compared")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
