"""Durable run storage: an expkit ``Storage`` backed by one SQLite file per experiment.

Why not expkit's DiskStorage: it rewrites one JSON file without fsync, so a crash mid-write loses the run.
Here every write is a SQLite transaction in WAL mode with ``synchronous=FULL``: a QAlign step (one new chain
state for every prompt) is committed as a single transaction, so after a kill the store holds whole steps
only and a rerun resumes from the last one.

Layout: ``<root>/runs/<exp_id>/exp.sqlite`` plus ``run.lock`` and stage outputs next to it. Values are JSON
(never pickle), so a store from an untrusted source cannot execute code when read.

Tables: ``fields(name, value)`` holds whole fields (``meta``, ``eval_<key>``, ...); ``instances(idx, input)``
and ``outputs(idx, step, value)`` hold the expkit ``data`` field (list of ``{"input", "outputs"}``) row by
row so that appending a step never rewrites earlier data.

Every row also carries ``crc``, a CRC-32 of its key and stored text (``row_checksum``, the one helper every
write goes through): an edit that keeps the JSON valid (one digit of a text or of a token id) is otherwise
invisible to every check. Stores from before the column gain it on their first writable open (``ALTER
TABLE``); their old rows keep ``crc`` NULL, read as "unchecked (legacy)", never as damage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from expkit import Exp
from expkit.storage import Storage

from qalign_repro.errors import StorageError

DB_NAME = "exp.sqlite"
LOCK_NAME = "run.lock"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fields (name TEXT PRIMARY KEY, value TEXT NOT NULL, crc INTEGER);
CREATE TABLE IF NOT EXISTS instances (idx INTEGER PRIMARY KEY, input TEXT NOT NULL, crc INTEGER);
CREATE TABLE IF NOT EXISTS outputs (
    idx INTEGER NOT NULL, step INTEGER NOT NULL, value TEXT NOT NULL, crc INTEGER, PRIMARY KEY (idx, step)
);
"""
#: the JSON column of each table, and the columns that key a row (part of what its checksum covers)
CHECKED_TABLES = {"fields": ("value", ("name",)), "instances": ("input", ("idx",)), "outputs": ("value", ("idx", "step"))}


def check_run_name(name: str) -> str:
    """Reject names that could escape the results folder (path separators, '..', empty)."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise StorageError(
            f"invalid run name {name!r}: use letters, digits and . _ = + - only (no path separators), "
            "at most 200 characters"
        )
    return name


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def row_checksum(table: str, key: tuple[Any, ...], text: str) -> int:
    """The ``crc`` of one stored row: CRC-32 over table, key and JSON text, so a changed value and a value
    moved to another row (a state swapped between steps) both fail. Every insert and update uses it."""
    head = "\x1f".join([table, *map(str, key)])
    return zlib.crc32(f"{head}\x1e{text}".encode())


def put_field(conn: sqlite3.Connection, name: str, text: str) -> None:
    """Insert or replace the field ``name`` with its JSON ``text`` and checksum."""
    conn.execute("INSERT INTO fields(name, value, crc) VALUES(?, ?, ?) "
                 "ON CONFLICT(name) DO UPDATE SET value=excluded.value, crc=excluded.crc",
                 (name, text, row_checksum("fields", (name,), text)))


def put_instances(conn: sqlite3.Connection, rows: Iterable[tuple[int, str]]) -> None:
    conn.executemany("INSERT INTO instances(idx, input, crc) VALUES(?, ?, ?)",
                     [(idx, text, row_checksum("instances", (idx,), text)) for idx, text in rows])


def put_outputs(conn: sqlite3.Connection, rows: Iterable[tuple[int, int, str]]) -> None:
    conn.executemany("INSERT INTO outputs(idx, step, value, crc) VALUES(?, ?, ?, ?)",
                     [(idx, step, text, row_checksum("outputs", (idx, step), text)) for idx, step, text in rows])


def has_checksums(conn: sqlite3.Connection, table: str) -> bool:
    return any(r[1] == "crc" for r in conn.execute(f"PRAGMA table_info({table})"))


def add_checksum_columns(conn: sqlite3.Connection) -> None:
    """Migrate a store from before checksums: add the column; old rows stay NULL ("unchecked, legacy")."""
    for table in CHECKED_TABLES:
        if not has_checksums(conn, table):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN crc INTEGER")


def checksum_failures(conn: sqlite3.Connection) -> tuple[list[tuple[str, tuple[Any, ...]]], int]:
    """``(damaged rows as (table, key), number of legacy rows without a checksum)``, streamed table by table.

    Cheap enough for every start of a run (one pass of CRC-32 over the stored text); the caller's connection
    decides the snapshot (fsck reads inside its own read transaction)."""
    damaged: list[tuple[str, tuple[Any, ...]]] = []
    unchecked = 0
    for table, (column, keys) in CHECKED_TABLES.items():
        if not has_checksums(conn, table):
            unchecked += conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            continue
        order = ", ".join(keys)
        for row in conn.execute(f"SELECT {order}, {column}, crc FROM {table} ORDER BY {order}"):
            key, text, crc = tuple(row[:-2]), row[-2], row[-1]
            if crc is None:
                unchecked += 1
            elif crc != row_checksum(table, key, text):
                damaged.append((table, key))
    return damaged, unchecked


def describe_damage(damaged: list[tuple[str, tuple[Any, ...]]], limit: int = 3) -> str:
    """What fails its checksum, in words: "output of instance 0 at step 3, field 'meta' (2 more)"."""
    words = {"fields": lambda k: f"field {k[0]!r}", "instances": lambda k: f"instance {k[0]}'s input",
             "outputs": lambda k: f"output of instance {k[0]} at step {k[1]}"}
    listed = ", ".join(words[t](k) for t, k in damaged[:limit])
    return listed + (f" ({len(damaged) - limit} more)" if len(damaged) > limit else "")


class SQLiteStorage(Storage):
    """expkit Storage with one SQLite database per experiment under ``base_dir``."""

    def __init__(self, base_dir: str | os.PathLike, mode: str = "rw"):
        super().__init__(mode)
        self.base_dir = Path(base_dir)
        self._conns: dict[str, sqlite3.Connection] = {}

    # -- connections ----------------------------------------------------------------------------------------
    def path(self, exp_id: str) -> Path:
        return self.base_dir / check_run_name(exp_id) / DB_NAME

    def _conn(self, exp_id: str) -> sqlite3.Connection:
        conn = self._conns.get(exp_id)
        if conn is None:
            path = self.path(exp_id)
            if not path.is_file():
                raise KeyError(f"experiment {exp_id!r} does not exist under {self.base_dir}")
            conn = self._open(path)
            self._conns[exp_id] = conn
        return conn

    def _open(self, path: Path) -> sqlite3.Connection:
        uri = f"file:{path}" + ("" if self.is_write_mode() else "?mode=ro")
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
            if self.is_write_mode():
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
                add_checksum_columns(conn)
            conn.execute("SELECT count(*) FROM fields").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"store {str(path)!r} is not a readable run database ({exc})") from None
        return conn

    @contextlib.contextmanager
    def transaction(self, exp_id: str) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all."""
        self._require_write()
        conn = self._conn(exp_id)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StorageError(f"could not write to the store of {exp_id!r}: {exc}") from None
        try:
            yield conn
        except sqlite3.OperationalError as exc:  # disk full, I/O error: nothing of this transaction is kept
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StorageError(f"could not write to the store of {exp_id!r}: {exc}; committed steps are kept") from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"could not commit to the store of {exp_id!r}: {exc}; committed steps are kept") from None

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _require_write(self) -> None:
        if not self.is_write_mode():
            raise ValueError("Write mode is not enabled.")

    # -- expkit Storage API ------------------------------------------------------------------------------
    def create(self, exp_id: str, force: bool = False, exists_ok: bool = False):
        self._require_write()
        if self.exists(exp_id):
            if exists_ok:
                return self.document(exp_id)
            if not force:
                raise ValueError(f"Document {exp_id} already exists.")
            self.delete(exp_id)
        path = self.path(exp_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"output folder {str(path.parent)!r} is not writable ({exc.strerror})") from None
        self._conns[exp_id] = self._open(path)
        return self.document(exp_id)

    def delete(self, exp_id: str) -> None:
        self._require_write()
        conn = self._conns.pop(exp_id, None)
        if conn is not None:
            conn.close()
        shutil.rmtree(self.path(exp_id).parent, ignore_errors=True)

    def exists(self, exp_id: str) -> bool:
        return self.path(exp_id).is_file()

    def keys(self) -> list[str]:
        if not self.base_dir.is_dir():
            return []
        return sorted(p.parent.name for p in self.base_dir.glob(f"*/{DB_NAME}"))

    def get(self, exp_id: str) -> dict[str, Any]:
        return {"_id": exp_id, **{f: self.read(exp_id, f) for f in self.fields(exp_id)}}

    def fields(self, exp_id: str) -> list[str]:
        conn = self._conn(exp_id)
        names = [r[0] for r in conn.execute("SELECT name FROM fields ORDER BY name")]
        if conn.execute("SELECT 1 FROM instances LIMIT 1").fetchone():
            names.append("data")
        return names

    def read(self, exp_id: str, field: str) -> Any:
        if field == "data":
            return list(self.iterable(exp_id, "data"))
        row = self._conn(exp_id).execute("SELECT value FROM fields WHERE name=?", (field,)).fetchone()
        if row is None:
            raise KeyError(field)
        return json.loads(row[0])

    def iterable(self, exp_id: str, field: str) -> Iterator[Any]:
        if field != "data":
            yield from self.read(exp_id, field)
            return
        conn = self._conn(exp_id)
        for idx, inp in conn.execute("SELECT idx, input FROM instances ORDER BY idx").fetchall():
            outs = [
                json.loads(v)
                for (v,) in conn.execute("SELECT value FROM outputs WHERE idx=? ORDER BY step", (idx,))
            ]
            yield {"input": json.loads(inp), "outputs": outs}

    def read_field_keys(self, exp_id: str, field: str) -> list[str]:
        return list(self.read(exp_id, field).keys())

    def read_subfield(self, exp_id: str, field: str, key: str) -> Any:
        return self.read(exp_id, field)[key]

    def write(self, exp_id: str, field: str, data: Any) -> None:
        with self.transaction(exp_id) as conn:
            if field == "data":
                conn.execute("DELETE FROM outputs")
                conn.execute("DELETE FROM instances")
                for idx, inst in enumerate(data):
                    self._insert_instance(conn, idx, inst)
            else:
                put_field(conn, field, _dumps(data))

    def write_subfield(self, exp_id: str, field: str, key: str, data: Any) -> None:
        with self.transaction(exp_id) as conn:
            row = conn.execute("SELECT value FROM fields WHERE name=?", (field,)).fetchone()
            value = json.loads(row[0]) if row else {}
            value[key] = data
            put_field(conn, field, _dumps(value))

    def append_subfield(self, exp_id: str, field: str, data: Any) -> None:
        if field != "data":
            return super().append_subfield(exp_id, field, data)
        with self.transaction(exp_id) as conn:
            (nxt,) = conn.execute("SELECT coalesce(max(idx) + 1, 0) FROM instances").fetchone()
            self._insert_instance(conn, nxt, data)

    @staticmethod
    def _insert_instance(conn: sqlite3.Connection, idx: int, inst: dict[str, Any]) -> None:
        put_instances(conn, [(idx, _dumps(inst["input"]))])
        put_outputs(conn, [(idx, step, _dumps(out)) for step, out in enumerate(inst.get("outputs", []))])


class RunLock:
    """Exclusive writer lock for a run: ``flock`` (released by the kernel when the holder dies, so a
    SIGKILLed run never blocks the next one) plus the holder's pid/host written in the file for the message."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StorageError(
                f"run {self.path.parent.name!r} is already being written by {holder}; "
                "wait for it to finish or stop it, then rerun"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunStore:
    """One run (an expkit ``Exp``) with the step-wise operations the methods and stages need."""

    def __init__(self, root: str | os.PathLike, name: str, *, create: bool = False, meta: dict | None = None,
                 readonly: bool = False):
        self.root = Path(root)
        self.name = check_run_name(name)
        self.storage = SQLiteStorage(self.root / "runs", mode="r" if readonly else "rw")
        if not self.storage.exists(name):
            if not create:
                raise StorageError(
                    f"no run named {name!r} under {str(self.root / 'runs')!r}; "
                    f"existing runs: {', '.join(self.storage.keys()) or 'none'}"
                )
            self.storage.create(name)
        if create and "meta" not in self.storage.fields(name):  # also after a kill between create and meta
            self.storage.write(name, "meta", meta or {})
        self.exp = Exp.load(storage=self.storage, name=name)

    @property
    def dir(self) -> Path:
        return self.root / "runs" / self.name

    @property
    def meta(self) -> dict[str, Any]:
        return self.storage.read(self.name, "meta")

    def update_meta(self, **values: Any) -> None:
        with self.storage.transaction(self.name) as conn:
            row = conn.execute("SELECT value FROM fields WHERE name='meta'").fetchone()
            meta = json.loads(row[0]) if row else {}
            meta.update(values)
            put_field(conn, "meta", _dumps(meta))
        self.exp.meta = self.meta

    def lock(self) -> RunLock:
        return RunLock(self.dir)

    # -- instances and steps ------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        return self.storage._conn(self.name)

    def n_instances(self) -> int:
        return self._conn().execute("SELECT count(*) FROM instances").fetchone()[0]

    def inputs(self) -> list[dict[str, Any]]:
        return [json.loads(v) for (v,) in self._conn().execute("SELECT input FROM instances ORDER BY idx")]

    def add_instances(self, inputs: list[dict[str, Any]]) -> None:
        """Add all prompts of a run in one transaction (a run never holds half of its prompts)."""
        with self.storage.transaction(self.name) as conn:
            (nxt,) = conn.execute("SELECT coalesce(max(idx) + 1, 0) FROM instances").fetchone()
            put_instances(conn, [(nxt + k, _dumps(inp)) for k, inp in enumerate(inputs)])

    def step_counts(self) -> dict[int, int]:
        """Number of stored outputs per instance index."""
        conn = self._conn()
        counts = {i: 0 for (i,) in conn.execute("SELECT idx FROM instances")}
        for idx, cnt in conn.execute("SELECT idx, count(*) FROM outputs GROUP BY idx"):
            counts[idx] = cnt
        return counts

    def steps_done(self) -> int:
        """Steps stored for every instance (chains advance on their own, so instances may differ while a run is
        in progress; this is the least of them)."""
        counts = self.step_counts()
        return min(counts.values()) if counts else 0

    def commit_step(self, step: int, outputs: dict[int, dict[str, Any]]) -> None:
        """Store output ``step`` of every given instance atomically."""
        self.commit_outputs({(idx, step): out for idx, out in outputs.items()})

    def commit_outputs(self, outputs: dict[tuple[int, int], dict[str, Any]]) -> None:
        """Store a group of ``(instance idx, step) -> output`` atomically: the step driver commits whatever its
        chains decided since the last commit (a whole lock-step step, or a few chains' next states), so a kill
        loses at most the group in flight and each chain resumes from its own last committed state."""
        from qalign_repro.fault_injection import maybe_kill

        if not outputs:
            return
        steps = sorted({step for _, step in outputs})  # the fault hook fires for a group holding its step
        for step in steps:
            maybe_kill("before_commit", step)
        with self.storage.transaction(self.name) as conn:
            put_outputs(conn, [(idx, step, _dumps(out)) for (idx, step), out in sorted(outputs.items())])
            for step in steps:
                maybe_kill("in_commit", step)
        for step in steps:
            maybe_kill("after_commit", step)

    def last_outputs(self) -> dict[int, dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT o.idx, o.value FROM outputs o JOIN "
            "(SELECT idx, max(step) AS s FROM outputs GROUP BY idx) m ON o.idx=m.idx AND o.step=m.s"
        )
        return {idx: json.loads(v) for idx, v in rows}

    def verify(self) -> None:
        """Raise a one-line StorageError when a stored row fails its checksum (edited outside the pipeline, or
        damaged on disk): a run, or a stage reading it, must not build on it or call it complete."""
        damaged, _ = checksum_failures(self._conn())
        if damaged:
            raise StorageError(
                f"run {self.name!r}: its store is damaged: {describe_damage(damaged)} fails its checksum (changed "
                f"outside the pipeline); check it with `python -m qalign_repro.fsck {self.dir}`, then `--repair` "
                "truncates it to the last intact step")

    def iter_instances(self) -> Iterator[dict[str, Any]]:
        """Stream ``{"input", "outputs"}`` one instance at a time (memory bounded)."""
        return self.storage.iterable(self.name, "data")

    # -- evals ------------------------------------------------------------------------------------------------
    def has_eval(self, key: str) -> bool:
        return self.exp.has_eval(key)

    def write_eval(self, key: str, data: list[dict[str, Any]]) -> None:
        self.exp.add_eval(key, data)

    def read_eval(self, key: str) -> list[dict[str, Any]]:
        return self.exp.get_eval(key)

    def close(self) -> None:
        self.storage.close()


def list_runs(root: str | os.PathLike) -> list[str]:
    return SQLiteStorage(Path(root) / "runs", mode="r").keys()
