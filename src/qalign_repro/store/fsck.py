"""``python -m qalign_repro.fsck <run dir or name> [--root R] [--repair]``: integrity check of a run store.

Why: a run lives for days on pre-emptible machines; after a crash, a disk incident or a hand edit the user
needs to know whether the store still holds what the pipeline guarantees before evaluating it. The check
reads the SQLite file read-only, inside one read transaction (a consistent snapshot even while a writer is
active), and verifies:

* the database itself (``PRAGMA quick_check``, schema, meta present);
* every row's checksum (``storage.row_checksum``): an edit that keeps the JSON valid, one digit of a text or
  of a token id, fails here; rows of stores from before checksums are counted as "unchecked (legacy)";
* instances: indices 0..n-1, unique string ids, the ids recorded in meta (``doc_ids``);
* steps: every instance's outputs are numbered 0..k-1 without gaps, and all instances hold the same number
  (commits are whole steps);
* every output: the stored schema, finite rewards, non-negative integer token counts, completion and
  proposal length <= ``max_new_tokens``, ``tokens_cached <= tokens_prefilled``, a non-empty completion; the
  method's own rules, its declared ``transition_errors(prev, cur)`` (``methods/base.py``; fsck never names a
  method): between consecutive states for a chain method (QAlign: an accepted state shares ``y[:index]`` with
  the previous state and is its proposal, a rejected one repeats it), on each output alone for independent
  samples (ancestral: one whole sample, ``accepted`` and ``index=0``); and
  ``text == decode(completion_ids)`` with the run's tokenizer only (shipped asset or local model folder from
  the stored meta; no model weights are loaded, no hub is contacted);
* meta vs config: ``config_hash`` recomputed from ``meta.config``, the run name the config gives, the copied
  fields (seed, max_new_tokens, method), ``steps_done`` not ahead of the data;
* evals: one entry per instance, same ids, per-output lists no longer than the stored steps.

Nothing is modified unless ``--repair`` is given, and repair only ever *truncates*: after a backup copy made
with SQLite's backup API it deletes the outputs from the first inconsistent step on (for every instance, so
whole steps remain), drops evals that no longer align (derived data: ``evaluate`` recomputes them) and marks
the run as not finished. Problems truncation cannot fix (an unreadable file, a config mismatch, broken
instances) are reported and the store is left alone. Exit status: 0 clean, 1 problems, 2 cannot check.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from qalign_repro.errors import StorageError
from qalign_repro.store.storage import (
    DB_NAME,
    RunLock,
    add_checksum_columns,
    check_run_name,
    checksum_failures,
    put_field,
)

#: fields every output record must hold (DESIGN.md, "Storage schema")
REQUIRED_FIELDS = ("completion_ids", "text", "reward", "accepted", "index", "proposal_len",
                   "tokens_generated", "tokens_prefilled")
COUNT_FIELDS = ("index", "proposal_len", "tokens_generated", "tokens_prefilled", "tokens_cached", "tokens_scored")
FINISH_REASONS = ("stop", "length")
STATUSES = ("created", "running", "done")
MAX_LISTED = 20


@dataclass(frozen=True)
class Problem:
    """One inconsistency. ``repairable``: removed by truncating the outputs to the last consistent step."""

    code: str
    message: str
    instance: int | None = None
    step: int | None = None
    repairable: bool = False

    def __str__(self) -> str:
        where = ""
        if self.instance is not None:
            where += f"instance {self.instance}"
        if self.step is not None:
            where += f"{', ' if where else ''}step {self.step}"
        return f"[{self.code}] {where + ': ' if where else ''}{self.message}"


@dataclass
class Report:
    """What ``inspect_store`` found."""

    name: str
    path: Path
    problems: list[Problem] = field(default_factory=list)
    n_instances: int = 0
    step_counts: dict[int, int] = field(default_factory=dict)
    #: steps 0..consistent_steps-1 are present and valid for every instance
    consistent_steps: int = 0
    #: eval fields that do not align with the instances (or would not after truncation)
    bad_evals: set[str] = field(default_factory=set)
    evals: list[str] = field(default_factory=list)
    #: rows whose checksum fails, as (table, key); and rows without one (a store from before checksums)
    damaged: set[tuple[str, tuple[Any, ...]]] = field(default_factory=set)
    unchecked: int = 0
    #: what could not be checked, and why (printed, never a problem)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def repairable(self) -> bool:
        return bool(self.problems) and all(p.repairable for p in self.problems)

    def add(self, code: str, message: str, *, instance: int | None = None, step: int | None = None,
            repairable: bool = False) -> None:
        self.problems.append(Problem(code, message, instance, step, repairable))


# -- opening ---------------------------------------------------------------------------------------------------
def store_path(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / "runs" / check_run_name(name) / DB_NAME


def _open_ro(path: Path) -> sqlite3.Connection:
    """Read-only connection: fsck must never write (no checkpoint, no schema creation)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA query_only=ON")
    return conn


def _loads(text: str) -> Any:
    return json.loads(text)


# -- record checks -------------------------------------------------------------------------------------------
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def check_output(out: Any, max_new: int | None) -> list[str]:
    """Schema and token-count rules of one stored output; returns what is wrong (empty when valid)."""
    if not isinstance(out, dict):
        return [f"output is a {type(out).__name__}, not an object"]
    bad = [f"missing field {k!r}" for k in REQUIRED_FIELDS if k not in out]
    if bad:
        return bad
    ids = out["completion_ids"]
    if not isinstance(ids, list) or not all(_is_count(t) for t in ids):
        bad.append("completion_ids is not a list of non-negative integers")
    elif not ids:
        bad.append("empty completion (a state holds at least one token, the EOS)")
    elif max_new is not None and len(ids) > max_new:
        bad.append(f"completion has {len(ids)} tokens > max_new_tokens={max_new}")
    if not isinstance(out["text"], str):
        bad.append("text is not a string")
    if not isinstance(out["accepted"], bool):
        bad.append(f"accepted={out['accepted']!r} is not a boolean")
    for key in ("reward", "proposal_reward"):
        if key in out and not _is_finite(out[key]):
            bad.append(f"{key}={out[key]!r} is not a finite number")
    # alpha (an MCMC step's acceptance probability) is optional: runs stored before it existed have none
    if "alpha" in out and not (_is_finite(out["alpha"]) and 0.0 <= out["alpha"] <= 1.0):
        bad.append(f"alpha={out['alpha']!r} is not a probability in [0, 1]")
    counts_ok = True
    for key in COUNT_FIELDS:
        if key in out and not _is_count(out[key]):
            bad.append(f"{key}={out[key]!r} is not a non-negative integer")
            counts_ok = False
    if counts_ok:
        if max_new is not None and out["proposal_len"] > max_new:
            bad.append(f"proposal_len={out['proposal_len']} > max_new_tokens={max_new}")
        if "tokens_cached" in out and out["tokens_cached"] > out["tokens_prefilled"]:
            bad.append(f"tokens_cached={out['tokens_cached']} > tokens_prefilled={out['tokens_prefilled']}")
    if "finish_reason" in out and out["finish_reason"] not in FINISH_REASONS:
        bad.append(f"finish_reason={out['finish_reason']!r} is not one of {FINISH_REASONS}")
    return bad


def transition_hook(method: str) -> Callable[[dict[str, Any] | None, dict[str, Any]], list[str]] | None:
    """The method's declared ``transition_errors(prev, cur)``, or None when it declares none (the base class's)
    or the name is not a registered method: then only the generic checks apply."""
    from qalign_repro.methods import METHODS, Method

    try:
        cls = METHODS.get(method)
    except ValueError:  # an unknown method name: nothing method-specific to check
        return None
    return None if cls.transition_errors is Method.transition_errors else cls.transition_errors


def check_transition(method: str, step: int, prev: Mapping[str, Any] | None, out: Mapping[str, Any],
                     hook: Callable[..., list[str]] | None = None) -> list[str]:
    """The method's own rules on output ``step`` (``hook = transition_hook(method)``; none without one). A chain
    method's hook sees the previous state (None for state 0); an independent-samples method's sees None for
    every output, which depends on no other."""
    if hook is None:
        return []
    from qalign_repro.methods import METHODS

    chained = step > 0 and METHODS.get(method).kind == "chain"
    return list(hook(prev if chained else None, out))


@functools.lru_cache(maxsize=4)
def _local_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """One load per process (campaigns check a store after every kill); never from the network."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def run_decoder(meta: Mapping[str, Any]) -> tuple[Callable[[list[int]], str] | None, str | None]:
    """``(decode, None)`` with the run's tokenizer, or ``(None, why not)``: only the tokenizer is loaded, from
    the shipped asset or a local folder (the stored ``meta.model.path`` first, else ``meta.config.model``), and
    never from a hub (``local_files_only``), so fsck stays fast and offline."""
    # cast: each is a dict by the isinstance check beside it (mypy does not narrow a repeated ``.get``)
    config = cast(dict[str, Any], meta.get("config") if isinstance(meta.get("config"), dict) else {})
    model = cast(dict[str, Any], config.get("model") if isinstance(config.get("model"), dict) else {})
    backend = cast(dict[str, Any], config.get("backend") if isinstance(config.get("backend"), dict) else {})
    if backend.get("generator") == "toy":  # the toy LM's "tokenizer" is its letter table
        from qalign_repro.lm.toy import ToyGenerator

        return ToyGenerator(model).decode, None
    stored = cast(dict[str, Any], meta.get("model") if isinstance(meta.get("model"), dict) else {})
    path = stored.get("path")
    try:
        if not path or not Path(str(path)).is_dir():
            from qalign_repro.models.folders import resolve_model_path

            path = resolve_model_path(model, "model")
        tok = _local_tokenizer(str(path), bool(model.get("trust_remote_code", False)))
    except Exception as exc:  # noqa: BLE001 - any failure only means this one check is skipped, and said so
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        return None, f"text vs completion_ids not checked: the run's tokenizer ({path or model.get('name')}) " \
                     f"is not available locally ({type(exc).__name__}: {first})"
    return (lambda ids: tok.decode(ids, skip_special_tokens=True)), None


# -- the store -------------------------------------------------------------------------------------------------
def _meta_checks(rep: Report, meta: Mapping[str, Any], n_steps: int) -> None:
    from omegaconf import OmegaConf

    from qalign_repro.store.run_names import config_hash, run_name

    if "run_name" in meta and meta["run_name"] != rep.name:
        rep.add("meta-name", f"meta.run_name={meta['run_name']!r} but the store is filed as {rep.name!r}")
    status = meta.get("status")
    if status is not None and status not in STATUSES:
        rep.add("meta-status", f"meta.status={status!r}; allowed: {', '.join(STATUSES)}")
    done = meta.get("steps_done")
    if done is not None and (not _is_count(done) or done > n_steps):
        rep.add("meta-steps", f"meta.steps_done={done!r} but only {n_steps} whole steps are stored",
                repairable=True)
    if status == "done" and _is_count(meta.get("steps")) and n_steps < meta["steps"]:
        rep.add("meta-steps", f"meta.status=done with steps={meta['steps']} but only {n_steps} steps are stored",
                repairable=True)
    config = meta.get("config")
    if config is None:
        if "config_hash" in meta:
            rep.add("meta-config", "meta has a config_hash but no config to check it against")
        return
    if not isinstance(config, dict):
        rep.add("meta-config", f"meta.config is a {type(config).__name__}, not a mapping")
        return
    try:
        cfg = OmegaConf.create(config)
        recomputed, expected_name = config_hash(cfg), run_name(cfg)
    except Exception as exc:  # a config the naming code cannot read is itself the finding
        rep.add("meta-config", f"meta.config cannot be read ({type(exc).__name__}: {exc})")
        return
    if meta.get("config_hash") != recomputed:
        rep.add("meta-config", f"meta.config_hash={meta.get('config_hash')!r} but meta.config hashes to "
                               f"{recomputed!r} (config edited after the run started?)")
    if expected_name != rep.name:
        rep.add("meta-config", f"meta.config names the run {expected_name!r}, not {rep.name!r}")
    for key, cfg_key in (("seed", "seed"), ("max_new_tokens", "max_new_tokens")):
        if key in meta and key in config and meta[key] != config[cfg_key]:
            rep.add("meta-config", f"meta.{key}={meta[key]!r} differs from meta.config.{cfg_key}={config[cfg_key]!r}")
    method = (config.get("method") or {}).get("name") if isinstance(config.get("method"), dict) else None
    if "method" in meta and method is not None and meta["method"] != method:
        rep.add("meta-config", f"meta.method={meta['method']!r} differs from meta.config.method.name={method!r}")


def _iter_outputs(conn: sqlite3.Connection) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """(instance idx, [(step, value), ...]) streamed one instance at a time (memory bounded)."""
    cur = conn.execute("SELECT idx, step, value FROM outputs ORDER BY idx, step")
    current: int | None = None
    rows: list[tuple[int, str]] = []
    for idx, step, value in cur:
        if idx != current:
            if current is not None:
                yield current, rows
            current, rows = idx, []
        rows.append((step, value))
    if current is not None:
        yield current, rows


def _check_instances(rep: Report, conn: sqlite3.Connection, meta: Mapping[str, Any]) -> list[str]:
    ids: list[str] = []
    keys: list[str] = []
    for pos, (idx, raw) in enumerate(conn.execute("SELECT idx, input FROM instances ORDER BY idx")):
        if idx != pos:
            rep.add("instances", f"instance indices are not 0..n-1 (found {idx} at position {pos})")
        if ("instances", (idx,)) in rep.damaged:  # inputs are not derived data: truncation cannot restore them
            rep.add("checksum", "input fails its checksum (changed outside the pipeline)", instance=idx)
        try:
            inp = _loads(raw)
        except ValueError:
            rep.add("instances", "input is not valid JSON", instance=idx)
            ids.append("")
            keys.append("")
            continue
        if not isinstance(inp, dict) or not isinstance(inp.get("id"), str):
            rep.add("instances", "input has no string 'id'", instance=idx)
            ids.append("")
            keys.append("")
            continue
        if "idx" in inp and inp["idx"] != idx:
            rep.add("instances", f"input.idx={inp['idx']!r} differs from the row index", instance=idx)
        # K chains of one prompt (method.chains) share its doc id; (id, chain) is the instance's identity
        ids.append(inp["id"])
        keys.append(inp["id"] if "chain" not in inp else f"{inp['id']}#chain{inp['chain']}")
    if len(set(keys)) != len(keys):
        rep.add("instances", "instance ids are not unique")
    k = int(meta.get("chains", 1) or 1)
    doc_ids = meta.get("doc_ids")
    if doc_ids is not None and k > 1:
        doc_ids = [f"{d}#chain{j}" for d in doc_ids for j in range(k)]
    if doc_ids is not None and ids and list(doc_ids) != keys:
        rep.add("instances", f"instances {ids[:3]}... differ from meta.doc_ids {list(doc_ids)[:3]}...")
    rep.n_instances = len(ids)
    return ids


def _check_outputs(rep: Report, conn: sqlite3.Connection, meta: Mapping[str, Any],
                   decode: Callable[[list[int]], str] | None = None) -> None:
    max_new = meta.get("max_new_tokens") if _is_count(meta.get("max_new_tokens")) else None
    method = str(meta.get("method", ""))
    hook = transition_hook(method) if method else None
    valid_prefix: dict[int, int] = {}
    known = set(range(rep.n_instances))
    for idx, rows in _iter_outputs(conn):
        if idx not in known:
            rep.add("orphan", f"{len(rows)} output(s) for an instance that does not exist", instance=idx)
            continue
        rep.step_counts[idx] = len(rows)
        prev: dict[str, Any] | None = None
        prefix = 0
        for pos, (step, raw) in enumerate(rows):
            if step != pos:
                rep.add("step-gap", f"steps are not contiguous: expected step {pos}, found {step}",
                        instance=idx, step=pos, repairable=True)
                break
            if ("outputs", (idx, step)) in rep.damaged:
                rep.add("checksum", "output fails its checksum (changed outside the pipeline)", instance=idx,
                        step=step, repairable=True)
                break
            try:
                out = _loads(raw)
            except ValueError:
                rep.add("record", "output is not valid JSON", instance=idx, step=step, repairable=True)
                break
            bad = check_output(out, max_new)
            if not bad and hook is not None:
                bad = check_transition(method, step, prev, out, hook)
            if bad:
                rep.add("record", "; ".join(bad), instance=idx, step=step, repairable=True)
                break
            new_state = prev is None or (out["completion_ids"], out["text"]) != (prev["completion_ids"], prev["text"])
            if decode is not None and new_state and decode(out["completion_ids"]) != out["text"]:
                rep.add("text", "text differs from decode(completion_ids) with the run's tokenizer", instance=idx,
                        step=step, repairable=True)
                break
            prev, prefix = out, pos + 1
        valid_prefix[idx] = prefix
    for idx in known:
        rep.step_counts.setdefault(idx, 0)
        valid_prefix.setdefault(idx, 0)
    counts = {rep.step_counts[i] for i in known}
    # chains advance on their own (the async schedule), so while a run is in progress its instances may hold
    # different numbers of steps; a finished run holds the same number everywhere
    if len(counts) > 1 and meta.get("status") == "done":
        lo, hi = min(counts), max(counts)
        short = [i for i in sorted(known) if rep.step_counts[i] == lo][:5]
        rep.add("partial-step", f"instances hold different numbers of steps ({lo}..{hi}; e.g. instances {short} "
                                f"have {lo}): a step was stored for only some prompts", repairable=True)
    rep.consistent_steps = min(valid_prefix.values()) if valid_prefix else 0


def _check_evals(rep: Report, conn: sqlite3.Connection, ids: list[str]) -> None:
    steps = rep.consistent_steps
    for name, raw in conn.execute("SELECT name, value FROM fields WHERE name LIKE 'eval\\_%' ESCAPE '\\'"):
        rep.evals.append(name)
        if ("fields", (name,)) in rep.damaged:  # derived data: repair drops it and evaluate recomputes it
            rep.add("checksum", f"{name} fails its checksum (changed outside the pipeline)", repairable=True)
            rep.bad_evals.add(name)
            continue
        try:
            value = _loads(raw)
        except ValueError:
            rep.add("eval", f"{name} is not valid JSON", repairable=True)
            rep.bad_evals.add(name)
            continue
        why = _eval_misalignment(value, ids, steps)
        if why:
            rep.add("eval", f"{name} does not align with the instances: {why}", repairable=True)
            rep.bad_evals.add(name)


def _eval_misalignment(value: Any, ids: list[str], steps: int) -> str | None:
    if not isinstance(value, list):
        return f"a {type(value).__name__}, not a list"
    if len(value) != len(ids):
        return f"{len(value)} entries for {len(ids)} instances"
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            continue
        if "id" in entry and entry["id"] != ids[i]:
            return f"entry {i} has id {entry['id']!r}, instance {i} is {ids[i]!r}"
        lists = [v for v in entry.values() if isinstance(v, list)]
        lists += [v for m in entry.values() if isinstance(m, dict) for v in m.values() if isinstance(v, list)]
        longest = max((len(v) for v in lists), default=0)
        if longest > steps:
            return f"entry {i} grades {longest} outputs but {steps} consistent steps are stored"
    return None


def inspect_store(root: str | os.PathLike, name: str) -> Report:
    """Check one run's store; never writes. Raises StorageError only when there is no store to check."""
    path = store_path(root, name)
    rep = Report(name=name, path=path)
    if not path.is_file():
        raise StorageError(f"no run store at {str(path)!r}")
    try:
        conn = _open_ro(path)
    except sqlite3.Error as exc:
        rep.add("database", f"cannot open {str(path)!r} ({exc})")
        return rep
    try:
        conn.execute("BEGIN")  # one snapshot for every query below
        result = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if result != ["ok"]:
            rep.add("database", f"SQLite reports corruption: {'; '.join(result[:3])}")
            return rep
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"fields", "instances", "outputs"} - tables
        if missing:
            rep.add("database", f"not a run store: missing table(s) {sorted(missing)}")
            return rep
        damaged, rep.unchecked = checksum_failures(conn)
        rep.damaged = set(damaged)
        for table, key in damaged:
            if table == "fields" and not str(key[0]).startswith("eval_"):
                rep.add("checksum", f"field {key[0]!r} fails its checksum (changed outside the pipeline; "
                                    "truncation cannot restore it)")
        if rep.unchecked:
            rep.notes.append(f"{rep.unchecked} row(s) unchecked: a legacy store from before row checksums "
                             "(rows written from now on carry one)")
        row = conn.execute("SELECT value FROM fields WHERE name='meta'").fetchone()
        meta: Any = None
        if row is None:
            empty = conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 0
            rep.add("meta", "no meta record: the run was interrupted while its store was being created"
                    + (f"; it holds no data: delete {str(path.parent)!r} and rerun" if empty else ""))
        else:
            try:
                meta = _loads(row[0])
            except ValueError:
                rep.add("meta", "meta is not valid JSON")
            if meta is not None and not isinstance(meta, dict):
                rep.add("meta", f"meta is a {type(meta).__name__}, not an object")
                meta = None
        meta = meta or {}
        ids = _check_instances(rep, conn, meta)
        decode, why = run_decoder(meta) if meta else (None, None)
        if why:
            rep.notes.append(why)
        _check_outputs(rep, conn, meta, decode)
        stored_steps = min(rep.step_counts.values()) if rep.step_counts else 0
        if meta:
            _meta_checks(rep, meta, stored_steps)
        _check_evals(rep, conn, ids)
    except sqlite3.DatabaseError as exc:
        rep.add("database", f"reading {str(path)!r} failed ({exc})")
    finally:
        conn.close()
    return rep


def check_store(root: str | os.PathLike, name: str) -> list[Problem]:
    """The problems of one run's store (empty list: consistent). Read-only."""
    return inspect_store(root, name).problems


# -- repair ------------------------------------------------------------------------------------------------------
def backup_store(path: Path) -> Path:
    """Copy the database (committed state, WAL included) with SQLite's online backup API and fsync it."""
    dest = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    src = _open_ro(path)
    dst = sqlite3.connect(str(dest))
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest


def repair_store(root: str | os.PathLike, name: str) -> tuple[Report, Path | None]:
    """Truncate the store to its last consistent step (after a backup); returns the new report and the backup.

    Refuses (store untouched, backup None) when a problem is not of the kind truncation fixes, and raises
    StorageError when a writer holds the run's lock.
    """
    rep = inspect_store(root, name)
    if rep.ok or not rep.repairable:
        return rep, None
    with RunLock(rep.path.parent):
        rep = inspect_store(root, name)  # re-read under the lock
        if rep.ok or not rep.repairable:
            return rep, None
        backup = backup_store(rep.path)
        keep = rep.consistent_steps
        conn = sqlite3.connect(str(rep.path), timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                add_checksum_columns(conn)  # a legacy store: the rewritten meta gets its checksum
                conn.execute("DELETE FROM outputs WHERE step >= ?", (keep,))
                for ev in sorted(rep.bad_evals):
                    conn.execute("DELETE FROM fields WHERE name=?", (ev,))
                row = conn.execute("SELECT value FROM fields WHERE name='meta'").fetchone()
                if row is not None:
                    meta = json.loads(row[0])
                    if isinstance(meta, dict):
                        meta["steps_done"] = min(int(meta.get("steps_done") or 0), keep)
                        if meta.get("status") == "done" and keep < int(meta.get("steps") or 0):
                            meta["status"] = "running"
                        meta["repaired"] = {"truncated_to_steps": keep, "backup": backup.name,
                                            "dropped_evals": sorted(rep.bad_evals),
                                            "at": time.strftime("%Y-%m-%d %H:%M:%S")}
                        put_field(conn, "meta", json.dumps(meta, ensure_ascii=False, separators=(",", ":"),
                                                           allow_nan=False))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
    return inspect_store(root, name), backup


# -- command line ------------------------------------------------------------------------------------------------
def resolve_target(target: str, root: str) -> tuple[Path, str]:
    """``(root, name)`` for a run folder, its ``exp.sqlite`` or a bare run name under ``root``."""
    p = Path(target)
    if p.name == DB_NAME and p.is_file():
        p = p.parent
    if p.is_dir() and (p / DB_NAME).is_file():
        return p.resolve().parent.parent, p.resolve().name
    return Path(root), check_run_name(target)


def _print_report(rep: Report) -> None:
    steps = min(rep.step_counts.values()) if rep.step_counts else 0
    if rep.ok:
        print(f"run {rep.name}: ok ({rep.n_instances} instances x {steps} steps, evals: {len(rep.evals)})")
    else:
        print(f"run {rep.name}: {len(rep.problems)} problem(s)")
        for p in rep.problems[:MAX_LISTED]:
            print(f"  {p}")
        if len(rep.problems) > MAX_LISTED:
            print(f"  ... and {len(rep.problems) - MAX_LISTED} more")
    for note in rep.notes:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qalign_repro.fsck",
                                     description="Verify a run store; --repair truncates to the last consistent step.")
    parser.add_argument("target", help="run folder (<root>/runs/<name>), its exp.sqlite, or a run name")
    parser.add_argument("--root", default="results", help="output root for a bare run name (default: results)")
    parser.add_argument("--repair", action="store_true",
                        help="truncate to the last consistent step after a backup copy (never anything else)")
    args = parser.parse_args(argv)
    try:
        root, name = resolve_target(args.target, args.root)
        rep = inspect_store(root, name)
        _print_report(rep)
        if rep.ok or not args.repair:
            return 0 if rep.ok else 1
        if not rep.repairable:
            print(f"run {name}: not repaired: some problems are not fixed by truncation; the store is unchanged")
            return 1
        rep, backup = repair_store(root, name)
        if backup is not None:
            print(f"run {name}: truncated to {rep.consistent_steps} steps (backup: {backup})")
        _print_report(rep)
        return 0 if rep.ok else 1
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
