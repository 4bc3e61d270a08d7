"""Security basics: nothing is unpickled (stores are JSON in SQLite, weights are safetensors), no model code
is trusted by default, and run names / globs cannot reach outside the output root. API keys: see
test_server_faults.py (read from the environment, never written to stores, logs or Hydra's files)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import yaml
from _helpers import REPO
from badkit import cli_error, toy

from qalign_repro.store.storage import RunStore

#: code that can execute data: unpickling, unsafe YAML, arbitrary evaluation
UNSAFE = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b", re.M), "imports an unpickler"),
    (re.compile(r"\b(pickle|dill|joblib|marshal)\.loads?\("), "unpickles"),
    (re.compile(r"\bread_pickle\("), "unpickles (pandas)"),
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"\byaml\.(unsafe_)?load\((?![^)]*Loader\s*=\s*yaml\.SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
]
#: reviewed exceptions: (file, why it is safe)
ALLOWED = {
    "src/qalign_repro/tasks/_gsm_symbolic_templates.py":
        "eval of template expressions shipped in the package, AST-whitelisted by compile_expr, no builtins",
}


def _sources() -> list[Path]:
    return sorted(p for d in ("src", "scripts") for p in (REPO / d).rglob("*.py"))


def test_nothing_is_unpickled_or_evaluated():
    findings = []
    for path in _sources():
        rel = str(path.relative_to(REPO))
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE:
            for m in pattern.finditer(text):
                if rel in ALLOWED and what == "eval/exec":
                    continue
                line = text.count("\n", 0, m.start()) + 1
                findings.append(f"{rel}:{line}: {what}")
    assert findings == []


def test_no_model_config_trusts_remote_code():
    for path in sorted((REPO / "src" / "qalign_repro" / "conf").glob("*/*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        assert cfg.get("trust_remote_code", False) is False, path


def test_stores_hold_json_text_only(tmp_path):
    """No BLOB (where a pickle could hide): every stored value is JSON text."""
    store = RunStore(tmp_path, "r1", create=True, meta={"m": 1})
    store.add_instances([{"id": "a", "prompt_ids": [1, 2]}])
    store.commit_step(0, {0: {"text": "x", "reward": 0.5}})
    store.write_eval("grades", [{"id": "a", "correct": [True]}])
    store.close()
    conn = sqlite3.connect(tmp_path / "runs" / "r1" / "exp.sqlite")
    for table, column in (("fields", "value"), ("instances", "input"), ("outputs", "value")):
        for (kind, value) in conn.execute(f"SELECT typeof({column}), {column} FROM {table}"):
            assert kind == "text"
            json.loads(value)
    conn.close()


@pytest.mark.parametrize("runs", ["../*", "../../**", "/etc/*", "*/../*"])
def test_run_globs_cannot_reach_outside_the_output_root(tmp_path, runs, preloaded):
    """``runs=`` patterns match run names listed under <root>/runs, never paths."""
    outside = tmp_path / "outside" / "runs" / "victim"
    outside.mkdir(parents=True)
    (outside / "exp.sqlite").write_bytes(b"x")
    root = tmp_path / "root"
    RunStore(root, "inside", create=True, meta={}).close()
    line = cli_error("evaluate", toy(root, f"runs={runs}"))
    assert "matches no run" in line and "\n" not in line
    assert (outside / "exp.sqlite").read_bytes() == b"x"
