"""Helpers of the bad-input catalogue: what the CLI would print for an input, and "nothing stored changed".

Why in-process: the catalogue has dozens of cases and a fresh interpreter costs seconds; ``cli_error`` does
what ``cli.entry_point`` does (compose + validate, then the stage; a user error becomes one ``error: ...``
line) and lets every other exception escape, because the CLI would print that one as a traceback. A few
cases also go through the real command line (test_bad_input_cli.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from crashkit import TOY, dump_store, run_names


def _stage(name: str):
    from qalign_repro.store.listing import select_runs

    if name == "run":
        from qalign_repro.stages.run import execute

        return execute
    if name == "evaluate":
        from qalign_repro.stages.evaluate import evaluate_run

        return lambda cfg: [evaluate_run(cfg.output_root, n) for n in select_runs(cfg)]
    if name == "predict":
        from qalign_repro.stages.predict import predict

        return predict
    raise ValueError(name)


def cli_error(stage: str, overrides: list[str]) -> str:
    """The one line ``python -m qalign_repro.<stage> <overrides>`` prints (raises if the stage succeeds)."""
    from qalign_repro.cli import _USER_ERRORS, compose_config

    try:
        cfg = compose_config(overrides)
        _stage(stage)(cfg)
    except _USER_ERRORS as exc:
        return f"error: {exc}"
    raise AssertionError(f"{stage} {overrides} succeeded; expected an error")


def snapshot(root: Path) -> dict[str, Any]:
    """Logical content of every store plus every other file (not Hydra's logs, locks or SQLite side files)."""
    root = Path(root)
    files = {}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if p.is_file() and rel.parts[0] != "hydra" and p.name != "run.lock" and not p.name.startswith("exp.sqlite"):
                files[str(rel)] = p.read_bytes()
    return {"stores": {n: dump_store(root, n) for n in run_names(root)}, "files": files}


def assert_unchanged(root: Path, before: dict[str, Any], *, new_empty_run_ok: bool = False) -> None:
    """Stored data unchanged; a new run may only appear (when allowed) without any instance or output."""
    after = snapshot(root)
    for name, dump in before["stores"].items():
        assert after["stores"].get(name) == dump, f"store {name} changed"
    for name in set(after["stores"]) - set(before["stores"]):
        assert new_empty_run_ok, f"a new run {name} was created"
        assert not after["stores"][name]["outputs"], f"outputs stored in new run {name}"
    assert after["files"] == before["files"]


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def toy(root: Path, *extra: str) -> list[str]:
    return [*TOY, f"output_root={root}", *extra]
