"""Fault-injection harness for the crash-consistency suite.

Why fork instead of ``python -m``: a fresh interpreter costs seconds (Hydra, torch imports) on the 2-core CI
machine, and the suite kills runs dozens of times. A forked child shares the already imported modules, runs a
stage function (``execute``, ``evaluate_run``, ``predict``) exactly as the CLI would, and is SIGKILLed by the
parent: a real process death, with the kernel dropping its locks and open files.

Kill kinds:
* ``hook``  ``QALIGN_KILL_AT=<point>:<step>`` — the project's own hook (before/in/after a step's commit);
* ``tx``    the n-th storage transaction of the child (``before`` it starts, ``in`` it before COMMIT,
            ``after`` COMMIT) — reaches the meta / instances / eval writes the step hook does not;
* ``phase`` a random delay after the child's m-th entry into generation / RM scoring / grading / table
            writing, so the kill lands inside that call: with simulated call durations (``slow``: the toy
            backends are instant) the child sleeps ``delay`` < ``slow`` and kills itself there; with real ones
            (HF) a timer thread of the child fires while the call computes. Either way the landing point does
            not depend on how fast the parent gets scheduled on a loaded machine;
* ``time``  a plain random delay after the start (``point=""``), or after the first generator call
            (``point="run"``: measured from there, start-up time does not matter);
* ``replace`` just before the n-th ``os.replace`` (a table written to its temp file, not yet renamed).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("startup", "generate", "reward", "commit", "grade", "write", "other")
_P = {name: i for i, name in enumerate(PHASES)}
#: the toy pipeline (pure numpy backends): fast enough to be killed dozens of times
TOY = ["backend=toy", "model=toy", "reward=toy", "max_new_tokens=4", "progress=false"]
#: meta keys that legitimately differ between two runs of the same config (timings, host, versions)
VOLATILE_META = {"environment", "wall_time_s", "finished", "time_in_generate_s", "time_in_reward_s"}
#: meta keys a kill after the last step leaves stale (see test_finalisation_after_kill_at_the_end)
FINALISATION_META = {"status", "steps_done", "diagnostics"}


class PhaseBoard:
    """Shared memory between parent and child: current phase and how often each phase was entered."""

    def __init__(self) -> None:
        self.arr = mp.RawArray("i", 1 + len(PHASES))

    def enter(self, phase: str) -> None:
        i = _P[phase]
        self.arr[1 + i] += 1
        self.arr[0] = i

    @property
    def phase(self) -> str:
        return PHASES[self.arr[0]]

    def count(self, phase: str) -> int:
        return self.arr[1 + _P[phase]]

    def reset(self) -> None:
        for i in range(len(self.arr)):
            self.arr[i] = 0


@dataclass
class Fault:
    """One planned kill (or none: ``kind=None`` runs to completion)."""

    kind: str | None = None  # hook | tx | phase | time | replace
    point: str = ""  # hook: before_commit|in_commit|after_commit; tx: before|in|after; phase: a PHASES name;
    #                  time: "" (from the start) | "run" (from the first generator call)
    n: int = 0  # hook: step; tx / replace: call number (1-based); phase: occurrence (1-based)
    delay: float = 0.0  # phase/time: seconds

    def env(self) -> dict[str, str]:
        return {"QALIGN_KILL_AT": f"{self.point}:{self.n}"} if self.kind == "hook" else {}

    def __str__(self) -> str:
        if self.kind is None:
            return "none"
        if self.kind == "time":
            return f"time{'@run' if self.point else ''}+{self.delay * 1000:.0f}ms"
        if self.kind == "phase":
            return f"{self.point}#{self.n}+{self.delay * 1000:.0f}ms"
        return f"{self.kind}:{self.point}:{self.n}"


@dataclass
class Episode:
    fault: Fault
    returncode: int
    phase: str
    seconds: float
    log: str = ""
    #: seconds from the start to the first generator call (the start-up cost: imports done, data, store)
    startup: float | None = None

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def _instrument(board: PhaseBoard, fault: Fault, slow: float) -> None:
    """Child side: mark phases, slow the backends by ``slow`` s per call, arm transaction kills."""
    from qalign_repro.methods.base import RunContext
    from qalign_repro.stages import evaluate, predict
    from qalign_repro.store.storage import SQLiteStorage

    def marked(phase: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            board.enter(phase)
            if fault.kind == "phase" and fault.point == phase and board.count(phase) == fault.n:
                if slow:  # simulated duration: die inside it
                    time.sleep(min(fault.delay, slow))
                    os.kill(os.getpid(), signal.SIGKILL)
                threading.Timer(fault.delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            if slow:
                time.sleep(slow)
            try:
                return fn(*args, **kwargs)
            finally:
                board.enter("other")
        return wrapper

    RunContext.sample = marked("generate", RunContext.sample)
    RunContext.collect = marked("generate", RunContext.collect)  # the step driver's engine waits
    RunContext.score = marked("reward", RunContext.score)
    evaluate.grade_instance = marked("grade", evaluate.grade_instance)
    predict._atomic_write = marked("write", predict._atomic_write)

    orig_tx = SQLiteStorage.transaction.__wrapped__  # the generator behind @contextmanager
    counter = {"n": 0}

    def die(where: str) -> None:
        if fault.kind == "tx" and fault.point == where and counter["n"] == fault.n:
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def transaction(self: SQLiteStorage, exp_id: str):
        counter["n"] += 1
        die("before")
        board.enter("commit")
        gen = orig_tx(self, exp_id)
        conn = next(gen)
        try:
            yield conn
        except BaseException as exc:
            with contextlib.suppress(StopIteration):
                gen.throw(exc)
            raise
        die("in")
        with contextlib.suppress(StopIteration):
            next(gen)  # COMMIT
        board.enter("other")
        die("after")

    SQLiteStorage.transaction = transaction

    orig_replace = os.replace
    replaces = {"n": 0}

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        replaces["n"] += 1
        if fault.kind == "replace" and replaces["n"] == fault.n:
            os.kill(os.getpid(), signal.SIGKILL)
        orig_replace(src, dst, **kwargs)

    os.replace = replace


def run_forked(fn: Callable[[], Any], fault: Fault, *, board: PhaseBoard, log: Path, slow: float = 0.0,
               timeout: float = 300.0, env: dict[str, str] | None = None,
               on_poll: Callable[[], None] | None = None) -> Episode:
    """Run ``fn`` in a forked child with ``fault`` armed; wait for it (killing it as planned).

    ``env`` is added to the child's environment; ``on_poll`` is called in the parent while it waits (the
    server-fault tests restart servers from there)."""
    board.reset()
    sys.stdout.flush()
    sys.stderr.flush()
    log_start = log.stat().st_size if log.exists() else 0  # the log is shared by episodes: keep this one's
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
            print(f"--- episode, fault {fault}")
            os.environ.update({**(env or {}), **fault.env()})
            _instrument(board, fault, slow)
            fn()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(code)
    deadline = t0 + timeout
    armed_at: float | None = None
    if fault.kind == "time" and not fault.point:
        armed_at = t0 + fault.delay
    status = None
    startup = None
    while status is None:
        done_pid, st = os.waitpid(pid, os.WNOHANG)
        if done_pid:
            status = st
            break
        now = time.monotonic()
        if startup is None and board.count("generate"):
            startup = now - t0
            if fault.kind == "time" and fault.point == "run":
                armed_at = now + fault.delay
        if on_poll is not None:
            on_poll()
        if (armed_at is not None and now >= armed_at) or now > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    text = ""
    if log.exists():
        with log.open("rb") as fh:
            fh.seek(log_start)
            text = fh.read().decode(errors="replace")[-20000:]
    return Episode(fault, rc, board.phase, time.monotonic() - t0, text, startup)


def toy_config(root: Path, *extra: str) -> Any:
    """A composed and validated toy config writing under ``root``."""
    from qalign_repro.cli import compose_config

    return compose_config([*TOY, f"output_root={root}", *extra])


# -- looking at stores -------------------------------------------------------------------------------------------
def run_names(root: Path) -> list[str]:
    return sorted(p.parent.name for p in (Path(root) / "runs").glob("*/exp.sqlite"))


def dump_store(root: Path, name: str) -> dict[str, Any]:
    """Raw rows of a store (the stored JSON text, so equality is byte equality of the data)."""
    conn = sqlite3.connect(f"file:{Path(root) / 'runs' / name / 'exp.sqlite'}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        fields = dict(conn.execute("SELECT name, value FROM fields ORDER BY name"))
        return {
            "meta": json.loads(fields.pop("meta", "{}")),
            "fields": fields,
            "instances": conn.execute("SELECT idx, input FROM instances ORDER BY idx").fetchall(),
            "outputs": conn.execute("SELECT idx, step, value FROM outputs ORDER BY idx, step").fetchall(),
        }
    finally:
        conn.close()


def stable_meta(meta: dict[str, Any], drop: set[str] = frozenset()) -> dict[str, Any]:
    """Meta without timings/host (and ``drop``); the output root is where the copy lives, not what it is."""
    out = {k: v for k, v in meta.items() if k not in VOLATILE_META | set(drop)}
    if isinstance(out.get("config"), dict):
        out["config"] = {k: v for k, v in out["config"].items() if k != "output_root"}
    return out


def steps_done(dump: dict[str, Any]) -> int:
    counts: dict[int, int] = {idx: 0 for idx, _ in dump["instances"]}
    for idx, _step, _v in dump["outputs"]:
        counts[idx] += 1
    return min(counts.values()) if counts else 0


def file_digest(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (for "nothing changed" checks of non-store outputs)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@dataclass
class Campaign:
    """The record of one kill/resume sequence (for the assertions and the docs' figures)."""

    episodes: list[Episode] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(e.killed for e in self.episodes)

    def phases(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.episodes:
            if e.killed:
                key = e.fault.kind if e.fault.kind in ("hook", "tx") else f"{e.fault.kind}:{e.phase}"
                out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> str:
        return ", ".join(f"{e.fault}->{'KILLED@' + e.phase if e.killed else e.returncode} ({e.seconds:.1f}s)"
                         for e in self.episodes)


# -- kill/resume campaigns over ``run`` ---------------------------------------------------------------------------
HOOK_POINTS = ("before_commit", "in_commit", "after_commit")
#: kinds of the episodes after the first, cycled (each campaign meets every kind more than once)
KIND_CYCLE = ("phase", "hook", "tx", "phase", "time", "hook")


def plan(rng: random.Random, kind: str, done: int, steps: int, tx_before_steps: int, startup: float,
         est_step: float, last: bool, phase_delay: float, final_txs: int = 1,
         phase_points: tuple[str, ...] = ("generate", "reward"), phase_index: int = 0) -> Fault:
    """A random fault of ``kind`` that still lies ahead of the run's progress (``done`` steps stored).

    Faults advance the run by a few steps at most, so that a campaign meets its number of kills; only the
    ``last`` one may hit the ``final_txs`` transactions after the final step (status, diagnostics).
    A time kill could miss (the run finishing first), so it is only planned while >= 4 steps remain."""
    if kind == "time" and steps - done < 4:
        kind = "hook"
    if kind == "hook":
        return Fault("hook", rng.choice(HOOK_POINTS), min(steps - 1, done + rng.choice([0, 0, 1, 2])))
    if kind == "tx":
        remaining = steps - done
        n = rng.choice([tx_before_steps + remaining + k for k in range(1, final_txs + 1)] if last
                       else range(1, tx_before_steps + 1))
        return Fault("tx", rng.choice(["before", "in", "after"]), n)
    if kind == "phase":
        # alternate generation / RM calls, so every campaign kills inside both
        point = phase_points[phase_index % len(phase_points)]
        return Fault("phase", point, rng.randint(1, 2), rng.uniform(0.0, phase_delay))
    if rng.random() < 0.3:  # during start-up (data, store, backends)
        return Fault("time", "", 0, rng.uniform(0.2 * startup, 0.9 * startup))
    return Fault("time", "run", 0, rng.uniform(0.0, 1.5 * est_step))  # among the first steps


def _check_intermediate(root: Path, name: str, fault: Fault, ep: Episode, done: int,
                        reference: dict[str, Any], whole_steps: bool = True) -> int:
    """Assertions at one intermediate point; returns the steps now stored. With ``whole_steps=False`` (chains
    that advance on their own) each instance holds a prefix of its own steps instead of all holding the same."""
    from qalign_repro.store.fsck import check_store

    now = dump_store(root, name)
    new_done = steps_done(now)
    problems = check_store(root, name)
    assert problems == [], f"after {fault}: fsck found {[str(p) for p in problems]}"
    assert new_done >= done, f"{fault}: steps went back from {done} to {new_done}"
    cells = [(i, s) for i, s, _ in now["outputs"]]
    if now["instances"]:
        assert now["instances"] == reference["instances"], str(fault)
    if not whole_steps:
        # each instance: steps 0..n_i-1, none twice; and exactly the uninterrupted run's rows there
        per: dict[int, list[int]] = {i: [] for i, _ in now["instances"]}
        for i, s in cells:
            per[i].append(s)
        assert all(steps == list(range(len(steps))) for steps in per.values()), str(fault)
        ref_rows = {(i, s): v for i, s, v in reference["outputs"]}
        assert all(ref_rows[(i, s)] == v for i, s, v in now["outputs"]), str(fault)
        return new_done
    if fault.kind == "hook" and ep.killed:
        assert new_done == fault.n + (fault.point == "after_commit"), (str(fault), new_done)
    # whole steps only: exactly (instance, step) for every instance and step < new_done, none twice
    assert sorted(cells) == [(i, s) for i, _ in now["instances"] for s in range(new_done)], str(fault)
    # and what is stored is exactly what the uninterrupted run stored at those steps
    assert now["outputs"] == [row for row in reference["outputs"] if row[1] < new_done], str(fault)
    return new_done


def campaign(cfg: Any, ref_cfg: Any, *, steps: int, target_kills: int, seed: int, board: PhaseBoard,
             logdir: Path, slow: float, phase_delay: float, kinds: tuple[str, ...] = KIND_CYCLE,
             phase_points: tuple[str, ...] = ("generate", "reward"),
             whole_steps: bool = True) -> tuple[Campaign, dict[str, Any], dict[str, Any]]:
    """Kill/resume the run of ``cfg`` until ``target_kills`` kills happened, then finish it.

    Returns the record, the final store and the store of an uninterrupted run of ``ref_cfg`` (same config,
    another output root). The first episode is a step-hook kill, so no random kill lands in the
    store-creation window (test_crash_edges.py covers that one)."""
    from qalign_repro.stages.run import execute

    root, ref_root = Path(cfg.output_root), Path(ref_cfg.output_root)
    ref = run_forked(lambda: execute(ref_cfg), Fault(), board=board, log=logdir / "reference.log", slow=slow)
    assert ref.returncode == 0, ref.log
    (name,) = run_names(ref_root)
    reference = dump_store(ref_root, name)
    startup = ref.startup or 0.0
    est_step = (ref.seconds - startup) / steps

    rng = random.Random(seed)
    record = Campaign()
    done = 0
    while record.kills < target_kills:
        exists = (root / "runs" / name / "exp.sqlite").is_file()
        has_instances = exists and bool(dump_store(root, name)["instances"])
        tx_before = 1 if has_instances else (2 if exists else 3)
        # the last kill aims at the transactions after the final step; their count assumes one commit per step,
        # which holds only for lock-step runs
        last = whole_steps and target_kills >= 4 and record.kills == target_kills - 1
        kind = "hook" if not exists else "tx" if last else kinds[(len(record.episodes) - 1) % len(kinds)]
        fault = plan(rng, kind, done, steps, tx_before, startup, est_step, last, phase_delay,
                     final_txs=2 if cfg.method.name == "qalign" else 1,  # qalign also stores diagnostics
                     phase_points=phase_points, phase_index=sum(e.fault.kind == "phase" for e in record.episodes))
        ep = run_forked(lambda: execute(cfg), fault, board=board, log=logdir / "episodes.log", slow=slow)
        record.episodes.append(ep)
        assert ep.killed or ep.returncode == 0, f"{fault}: exit {ep.returncode}\n{ep.log}"
        done = _check_intermediate(root, name, fault, ep, done, reference, whole_steps)
        if ep.returncode == 0 and done == steps:
            break
    final = run_forked(lambda: execute(cfg), Fault(), board=board, log=logdir / "episodes.log", slow=slow)
    assert final.returncode == 0, final.log
    record.episodes.append(final)
    return record, dump_store(root, name), reference


def assert_same_as_reference(final: dict[str, Any], reference: dict[str, Any]) -> None:
    """Byte equality of the stored data (raw JSON rows) and of the meta that does not depend on timing."""
    assert final["instances"] == reference["instances"]
    assert final["outputs"] == reference["outputs"]
    assert final["fields"] == reference["fields"]
    assert stable_meta(final["meta"], FINALISATION_META) == stable_meta(reference["meta"], FINALISATION_META)
