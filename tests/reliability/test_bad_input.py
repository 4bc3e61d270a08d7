"""Bad-input catalogue: every case stops with one actionable line (what is wrong, which value, what is
allowed) and leaves the stored data alone. Each case runs against an output root that already holds a
finished, evaluated run, so an input that damaged stored data would show.

Cases that are not handled well yet are ``xfail(strict=True)`` with the fix in the reason: they flip to
failures (and must be un-marked) once the fix lands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from badkit import assert_unchanged, cli_error, copy_root, snapshot, toy
from crashkit import Fault, PhaseBoard, dump_store, run_forked, run_names

from qalign_repro.store.fsck import check_store

BASE = ["method=qalign", "dataset.n=3", "steps=3"]
GSM = ["dataset=gsm8k", "dataset.n=2"]


@pytest.fixture(scope="module")
def populated(tmp_path_factory, preloaded) -> Path:
    """An output root with one finished and evaluated toy QAlign run (made in forked children)."""
    from badkit import _stage

    from qalign_repro.cli import compose_config

    root = tmp_path_factory.mktemp("populated") / "root"
    cfg = compose_config(toy(root, *BASE))
    for stage in ("run", "evaluate"):
        ep = run_forked(lambda s=stage: _stage(s)(cfg), Fault(), board=PhaseBoard(), log=root.parent / "log")
        assert ep.returncode == 0, ep.log
    return root


@pytest.fixture()
def root(populated, tmp_path) -> Path:
    return copy_root(populated, tmp_path / "root")


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD_ROWS = '{"question": "Tom has 3 apples.", "answer": "#### 3"}\n{"question": "Two?", "answer": "#### 2"}\n'


@dataclass
class Case:
    id: str
    overrides: list[str]
    pattern: str  # regex the printed line must match (after "error: ")
    stage: str = "run"
    data: str | bytes | None = None  # contents of a data file passed as +dataset.path
    new_empty_run_ok: bool = False  # the error comes after the run's (empty) store was created
    xfail: str | None = None
    raises: type[BaseException] = AssertionError  # how the xfail case fails today
    extra: list[str] = field(default_factory=list)


CASES = [
    # -- config structure (Hydra) -------------------------------------------------------------------------
    Case("unknown-model", ["model=gpt5"], r"model=gpt5 is not a known option; allowed: .*\btoy\b"),
    Case("unknown-reward", ["reward=rm9"], r"reward=rm9 is not a known option; allowed: .*\btoy\b"),
    Case("unknown-method-evaluate", ["method=best_of"], r"method=best_of is not a known option; allowed: .*qalign",
         stage="evaluate"),
    Case("misspelled-key", ["max_new_token=8"], r"unknown config key 'max_new_token'; did you mean 'max_new_tokens'\?"),
    Case("misspelled-nested-key", ["dataset.subsetseed=1"],
         r"unknown config key 'dataset.subsetseed'; did you mean 'dataset.subset_seed'\?"),
    Case("override-syntax", ["steps=[1,2"], r"'\[1,2'"),
    # -- values -------------------------------------------------------------------------------------------
    Case("beta-inf", ["beta=inf"], r"beta=inf is invalid; allowed: a finite number > 0"),
    Case("beta-negative", ["beta=-0.5"], r"beta=-0.5 is invalid; allowed: a finite number > 0"),
    Case("steps-negative", ["steps=-2"], r"steps=-2 is invalid; allowed: an integer >= 1"),
    Case("steps-fraction", ["steps=2.5"], r"steps=2.5 is invalid; allowed: an integer >= 1"),
    Case("temperature-qalign", ["temperature=1.5"],
         r"temperature=1.5 with method=qalign breaks exactness .*allowed: temperature=1.0, or set allow_inexact=true"),
    Case("temperature-nan", ["method=ancestral", "temperature=nan"], r"temperature=nan is invalid; allowed: a finite"),
    Case("max-new-tokens-vs-context", ["max_new_tokens=64"],
         r"max_new_tokens=64 does not fit the model context \(64 tokens\); allowed: < 64"),
    Case("batch-size-zero", ["batch_size=0"], r"batch_size=0 is invalid; allowed: an integer >= 1"),
    Case("shard-index", ["shard.count=2", "shard.index=2"], r"shard.index=2 is invalid; allowed: 0..1"),
    Case("seed-text", ["seed=abc"], r"seed='abc' is invalid; allowed: an integer >= 0"),
    Case("dataset-n-text", ["dataset.n=abc"], r"dataset.n='abc' is invalid; allowed: an integer >= 1"),
    Case("nan-elsewhere-in-config", ["reward.scale=nan"], r"reward.scale=nan is not a finite number; allowed: a finite number"),
    # -- names and paths ------------------------------------------------------------------------------------
    Case("run-name-separator", ["run_name=a/b"], r"invalid run name 'a/b': .*no path separators"),
    Case("run-name-absolute", ["run_name=/etc/passwd"], r"invalid run name '/etc/passwd'"),
    Case("same-name-other-config", ["run_name=RUN0", "beta=2"],
         r"run 'RUN0' was created with a different config; pick another run_name"),
    # -- data files -----------------------------------------------------------------------------------------
    Case("data-missing", GSM, r"data file '.*/nothing\.jsonl' does not exist", extra=["+dataset.path=MISSING"]),
    Case("data-empty", GSM, r"data file '.*/data\.jsonl' is empty", data=""),
    Case("data-bad-json-line", GSM, r"/data\.jsonl:3: malformed JSON line",
         data=GOOD_ROWS + '{"question": "broken", "answer": \n'),
    Case("data-missing-field", GSM,
         r"/data\.jsonl:2: field 'answer' is missing; allowed: a non-empty string",
         data=GOOD_ROWS.splitlines()[0] + '\n{"question": "no answer"}\n'),
    Case("data-null-question", GSM, r"/data\.jsonl:2: field 'question' is null; allowed: a non-empty string",
         data=GOOD_ROWS.splitlines()[0] + '\n{"question": null, "answer": "#### 2"}\n'),
    Case("data-gsm8k-answer-without-hashes", GSM,
         r"/data\.jsonl:1: field 'answer' has no '#### <number>' line .*allowed: a worked solution",
         data='{"question": "Two?", "answer": "it is 2"}\n' + GOOD_ROWS),
    Case("data-n-larger-than-the-set", ["dataset=gsm8k", "dataset.n=3"],
         r"dataset.n=3 is invalid for 'gsm8k', which has 2 docs; allowed: an integer 1..2, or null for all 2",
         data=GOOD_ROWS),
    Case("data-missing-field-truthfulqa", ["dataset=truthfulqa", "dataset.n=1"],
         r"/data\.jsonl:1: field 'mc1_targets' is missing; allowed: an object", data='{"question": "q"}\n'),
    Case("data-source-unknown", [*GSM, "dataset.source=web"],
         r"dataset.source='web' is invalid for 'gsm8k'; allowed: bundled, hub"),
    Case("data-not-utf8", GSM, r"/data\.jsonl:3: not UTF-8 text", data=GOOD_ROWS.encode() + b"\xff\xfe\n"),
    Case("data-line-not-object", GSM, r"/data\.jsonl:3: .*object", data=GOOD_ROWS + "42\n"),
    Case("data-path-is-folder", GSM, r"data file '.*' is a folder", extra=["+dataset.path=FOLDER"]),
    Case("data-path-on-generated-task", ["dataset=arith"], r"dataset.path=.* is not used by arith", data=GOOD_ROWS),
    Case("hub-source-on-generated-task", ["dataset=arith", "dataset.source=hub"],
         r"dataset.source='hub'; allowed: generated"),
    # -- later stages ---------------------------------------------------------------------------------------
    Case("evaluate-no-such-run", ["seed=9"], r"no run '.*' under .* run `python -m qalign_repro.run` with them first",
         stage="evaluate"),
    Case("evaluate-runs-match-nothing", ["runs=nomatch*"], r"runs=nomatch\* matches no run under .*existing: ",
         stage="evaluate"),
    Case("predict-ci", ["predict.ci=1.5"], r"predict.ci=1.5 is invalid; allowed: a number in \(0, 1\)",
         stage="predict"),
    Case("predict-rule", ["predict.rules=[best]"], r"predict.rules=\['best'\] has unknown rule\(s\) \['best'\]; allowed:",
         stage="predict"),
]


def _overrides(case: Case, root: Path, tmp: Path) -> list[str]:
    run0 = run_names(root)[0]
    extra = []
    for o in case.extra:
        o = o.replace("MISSING", str(tmp / "nothing.jsonl")).replace("FOLDER", str(tmp))
        extra.append(o)
    if case.data is not None:
        extra.append(f"+dataset.path={write(tmp / 'data.jsonl', case.data)}")
    return toy(root, *BASE, *(o.replace("RUN0", run0) for o in case.overrides), *extra)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail, raises=c.raises)]
                          if c.xfail else []) for c in CASES])
def test_bad_input_is_one_actionable_line_and_changes_nothing(case, root, tmp_path):
    before = snapshot(root)
    line = cli_error(case.stage, _overrides(case, root, tmp_path))
    assert "\n" not in line
    assert line.startswith("error: ")
    pattern = case.pattern.replace("RUN0", re.escape(run_names(root)[0]))
    assert re.search(pattern, line), line
    assert_unchanged(root, before, new_empty_run_ok=case.new_empty_run_ok)


# -- output root -------------------------------------------------------------------------------------------------
def test_output_root_not_writable(tmp_path):
    blocker = write(tmp_path / "a-file", "x")
    line = cli_error("run", toy(blocker / "sub", *BASE))
    assert "\n" not in line
    assert "output folder" in line and "is not writable (Not a directory)" in line, line
    assert blocker.read_text() == "x"


# -- the store itself -----------------------------------------------------------------------------------------
def _db(root: Path) -> Path:
    return root / "runs" / run_names(root)[0] / "exp.sqlite"


def _single_file(db: Path) -> bytes:
    """Fold the WAL into the main file (what a cleanly closed store looks like) and return its bytes."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    return db.read_bytes()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed-header"])
@pytest.mark.parametrize("stage", ["run", "evaluate"])
def test_corrupted_store_is_reported_and_left_alone(root, damage, stage):
    db = _db(root)
    data = _single_file(db)
    bad = {"garbage": b"not a database " * 64, "truncated": data[: len(data) // 2],
           "zeroed-header": b"\0" * 100 + data[100:]}[damage]
    db.write_bytes(bad)
    line = cli_error(stage, toy(root, *BASE))
    assert "\n" not in line
    assert re.search(r"store '.*exp\.sqlite' is not a readable run database", line), line
    assert db.read_bytes() == bad  # not "repaired", not overwritten
    assert check_store(root, run_names(root)[0])  # and fsck agrees


@pytest.mark.parametrize("stage", ["run", "evaluate"])
def test_a_row_edited_outside_the_pipeline_is_one_line_naming_the_store(root, stage):
    """Valid JSON, one value changed: the stage names the damaged store and fsck, not some config value."""
    import json
    import sqlite3

    db = _db(root)
    conn = sqlite3.connect(db, isolation_level=None)
    (value,) = conn.execute("SELECT value FROM outputs WHERE idx=1 AND step=1").fetchone()
    out = json.loads(value)
    out["reward"] = out["reward"] + 1.0
    conn.execute("UPDATE outputs SET value=? WHERE idx=1 AND step=1", (json.dumps(out),))
    conn.close()
    line = cli_error(stage, toy(root, *BASE))
    assert "\n" not in line
    assert re.search(rf"run '{re.escape(run_names(root)[0])}': its store is damaged: output of instance 1 at step 1 "
                     r"fails its checksum .*qalign_repro\.fsck .*--repair", line), line


# -- reward model returning NaN / inf --------------------------------------------------------------------------
def _poison_rewards(monkeypatch, value: float, from_call: int) -> None:
    """The toy RM returns ``value`` for the first output from its ``from_call``-th call on."""
    from qalign_repro.rm.toy import ToyReward

    orig = ToyReward.score
    calls = {"n": 0}

    def score(self, prompts, completions):
        calls["n"] += 1
        res = orig(self, prompts, completions)
        if calls["n"] >= from_call:
            res.rewards = np.array(res.rewards, dtype=np.float64)
            res.rewards[0] = value
        return res

    monkeypatch.setattr(ToyReward, "score", score)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_rm_non_finite_stops_the_chain_with_nothing_stored_and_rerun_resumes(tmp_path, monkeypatch, value):
    from qalign_repro.cli import compose_config
    from qalign_repro.methods.base import NonFiniteRewardError
    from qalign_repro.stages.run import execute

    args = toy(tmp_path / "r", "method=qalign", "dataset.n=3", "steps=5")
    ref = execute(compose_config(toy(tmp_path / "ref", "method=qalign", "dataset.n=3", "steps=5")))
    ref.close()
    with monkeypatch.context() as m:
        _poison_rewards(m, value, from_call=3)  # step 2's RM call
        with pytest.raises(NonFiniteRewardError) as info:
            execute(compose_config(args))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"reward model returned {value}" in msg and "nothing was stored for this step" in msg and "rerun" in msg
    (name,) = run_names(tmp_path / "r")
    assert dump_store(tmp_path / "r", name)["outputs"] == [r for r in dump_store(tmp_path / "ref", name)["outputs"]
                                                           if r[1] < 2]
    assert check_store(tmp_path / "r", name) == []
    execute(compose_config(args)).close()  # the RM is fixed: the rerun resumes at step 2
    assert dump_store(tmp_path / "r", name)["outputs"] == dump_store(tmp_path / "ref", name)["outputs"]


# -- empty completion ------------------------------------------------------------------------------------------
def test_empty_completion_is_an_error_before_anything_is_stored(tmp_path, monkeypatch):
    from qalign_repro.cli import _USER_ERRORS, compose_config
    from qalign_repro.lm.base import Completion
    from qalign_repro.lm.toy import ToyGenerator
    from qalign_repro.stages.run import execute

    def sample(self, prompts, max_tokens, seeds, temperature=1.0, return_entropies=False, prefixes=None):
        return [Completion(token_ids=[], text="", finish_reason="stop", prompt_tokens=len(p)) for p in prompts]

    monkeypatch.setattr(ToyGenerator, "sample", sample)
    root = tmp_path / "r"
    with pytest.raises(_USER_ERRORS, match="empty completion"):
        execute(compose_config(toy(root, "method=qalign", "dataset.n=2", "steps=3")))
    (name,) = run_names(root)
    assert dump_store(root, name)["outputs"] == []


# -- disk full while committing -----------------------------------------------------------------------------------
def _fill_disk_after(monkeypatch, extra_pages: int) -> None:
    """Simulate a full disk: every store opened from now on may grow by ``extra_pages`` pages only."""
    from qalign_repro.store.storage import SQLiteStorage

    orig = SQLiteStorage._open

    def _open(self, path):
        conn = orig(self, path)
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count={pages + extra_pages}")
        return conn

    monkeypatch.setattr(SQLiteStorage, "_open", _open)


def _disk_full_run(tmp_path, monkeypatch):
    from qalign_repro.cli import compose_config
    from qalign_repro.stages.run import execute

    args = toy(tmp_path / "r", "method=qalign", "dataset.n=3", "steps=40")
    execute(compose_config([*args, "steps=3"])).close()  # 3 committed steps, then the disk fills up
    (name,) = run_names(tmp_path / "r")
    before = dump_store(tmp_path / "r", name)
    with monkeypatch.context() as m:
        _fill_disk_after(m, 2)
        try:
            execute(compose_config(args))
            err: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - the kind of error is what the tests look at
            err = exc
    return args, name, before, err


def test_disk_full_keeps_every_committed_step_and_rerun_resumes(tmp_path, monkeypatch):
    from qalign_repro.cli import compose_config
    from qalign_repro.stages.run import execute

    args, name, before, err = _disk_full_run(tmp_path, monkeypatch)
    assert err is not None
    root = tmp_path / "r"
    now = dump_store(root, name)
    assert check_store(root, name) == []  # whole steps only, the partial step rolled back
    assert [row for row in now["outputs"] if row[1] < 3] == before["outputs"]
    execute(compose_config(args)).close()  # space is back
    ref = execute(compose_config(toy(tmp_path / "ref", "method=qalign", "dataset.n=3", "steps=40")))
    ref.close()
    assert dump_store(root, name)["outputs"] == dump_store(tmp_path / "ref", name)["outputs"]


def test_disk_full_is_a_one_line_error(tmp_path, monkeypatch):
    from qalign_repro.errors import StorageError

    _args, _name, _before, err = _disk_full_run(tmp_path, monkeypatch)
    assert isinstance(err, StorageError) and "\n" not in str(err) and "full" in str(err), repr(err)

