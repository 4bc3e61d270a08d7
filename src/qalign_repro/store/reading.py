"""Column reads over a stored run for the stages that only need a few fields of every output (predict).

Why a module of its own: decoding every output's JSON (mostly ``completion_ids``) is most of predict's time, so
on the SQLite store the fields are projected in SQL (``json_extract`` over the table layout that ``storage.py``
owns) and streamed row by row, ~5x less CPU. SQL stays inside the store package; callers get plain lists. Any
other storage falls back to the public streaming API, with the same results (``test_predict_plot``).
"""

from __future__ import annotations

import itertools
import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qalign_repro.errors import DataError
from qalign_repro.store.storage import RunStore


def _sqlite_path(store: RunStore) -> Path | None:
    """The run's database file when it lives in the SQLite storage (looked up at call time, so a test can swap
    the class), else None."""
    from qalign_repro.store.storage import SQLiteStorage

    path = store.storage.path(store.name) if isinstance(store.storage, SQLiteStorage) else None
    return path if path is not None and path.is_file() else None


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)


def iter_output_fields(store: RunStore, n: int, fields: Sequence[str]
                       ) -> Iterator[tuple[Any, dict[str, list[Any]]]]:
    """Per instance, in order: ``(doc id, {field: [value of each of the first n outputs]})``."""
    path = _sqlite_path(store)
    if path is None:
        for inst in store.iter_instances():
            outs = inst["outputs"][:n]
            yield inst["input"].get("id"), {f: [o.get(f) for o in outs] for f in fields}
        return
    conn = _connect(path)
    try:
        ids = conn.execute("SELECT idx, json_extract(input, '$.id') FROM instances ORDER BY idx").fetchall()
        cols = ", ".join(f"json_extract(value, '$.{f}')" for f in fields)
        rows = conn.execute(f"SELECT idx, {cols} FROM outputs WHERE step < ? ORDER BY idx, step", (n,))
        by_idx = itertools.groupby(rows, key=lambda r: r[0])
        current = next(by_idx, None)
        for idx, doc_id in ids:
            values: list[tuple] = []
            if current is not None and current[0] == idx:
                values = list(current[1])
                current = next(by_idx, None)
            yield doc_id, {f: [r[k + 1] for r in values] for k, f in enumerate(fields)}
    finally:
        conn.close()


def chain_layout(store: RunStore) -> list[tuple[Any, Any]]:
    """``(doc id, chain)`` of every instance, in order (read only when a run has several chains per prompt)."""
    path = _sqlite_path(store)
    if path is not None:
        conn = _connect(path)
        try:
            return conn.execute("SELECT json_extract(input, '$.id'), json_extract(input, '$.chain') "
                                "FROM instances ORDER BY idx").fetchall()
        finally:
            conn.close()
    return [(i.get("id"), i.get("chain")) for i in store.inputs()]


def check_chain_layout(layout: Sequence[tuple[Any, Any]], chains: int, name: str) -> None:
    """The pooling assumes instance ``p*K + j`` is chain j of prompt p; refuse anything else, naming it."""
    if len(layout) % chains:
        raise DataError(f"run {name!r} has {len(layout)} instances, not a multiple of its {chains} chains")
    for i, (doc_id, chain) in enumerate(layout):
        first = layout[i - i % chains][0]
        if chain != i % chains or doc_id != first:
            raise DataError(f"run {name!r}: instance {i} is chain {chain!r} of doc {doc_id!r}; expected chain "
                            f"{i % chains} of doc {first!r} (instances ordered prompt-major, {chains} per prompt)")


def grade_scores(g: Mapping[str, Any], metric: str | None, n: int, where: str) -> np.ndarray:
    if metric in (None, "correct"):
        vals = g.get("correct")
    else:
        vals = (g.get("metrics") or {}).get(metric)
        if vals is None:
            raise DataError(f"{where}: grades have no metric {metric!r}; "
                            f"available: correct, {', '.join(sorted(g.get('metrics') or {})) or 'none'}")
    if vals is None or len(vals) < n:
        raise DataError(f"{where}: grades cover {0 if vals is None else len(vals)} outputs, expected {n}; "
                        "rerun the evaluate stage")
    return np.asarray(vals[:n], dtype=np.float64)


def reward_trace(store: RunStore, n: int) -> np.ndarray:
    """Rewards only, for ``burn_in=auto`` before the MBR pass needs it (one extra streaming pass)."""
    if store.has_eval("reward"):
        return np.array([r["reward"][:n] for r in store.read_eval("reward")], dtype=np.float64)
    return np.array([[math.nan if v is None else v for v in out["reward"]]
                     for _, out in iter_output_fields(store, n, ("reward",))], dtype=np.float64)
