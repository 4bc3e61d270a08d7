"""``python -m qalign_repro.runs``: what is stored under output_root, and how far each run got.

One row per run (shards are listed one by one, so a missing or stalled shard is visible): status, progress
(steps stored / steps asked for), method, dataset, model, experiment, shard, prompts, wall time, host and GPU
from the provenance the run stage writes into every run's meta. Progress is counted from the store itself, so
it is live for a run that is still writing.

Status: ``done``; ``running`` (the lock holder is alive, or lives on another host); ``interrupted`` (the meta
says running but its process on this host is gone: rerun the same command to resume); ``created``.

Usage: ``python -m qalign_repro.runs [output_root=results] [experiment_name=general] [runs='gsm8k-*']
[format=md|csv]``. No Hydra and no torch import, so it answers instantly on a login node.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qalign_repro.errors import StorageError
from qalign_repro.store.shards import shard_info
from qalign_repro.store.storage import LOCK_NAME, RunStore, list_runs

if TYPE_CHECKING:
    import pandas as pd
    from omegaconf import DictConfig

COLUMNS = ["run", "experiment", "dataset", "method", "model", "shard", "status", "progress", "chains_done", "outputs",
           "prompts", "wall_time", "host", "gpu", "git_sha", "finished"]
_LOCK_TEXT = re.compile(r"pid (?P<pid>\d+) on host (?P<host>\S+)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_status(run_dir: Path, status: str) -> str:
    """Refine a meta status of "running" with the lock file (written by the run's writer, never taken here)."""
    if status != "running":
        return status
    try:
        text = (run_dir / LOCK_NAME).read_text()
    except OSError:
        return status
    m = _LOCK_TEXT.search(text)
    if not m:
        return status
    if m["host"] != socket.gethostname():
        return f"running on {m['host']}"
    return "running" if _pid_alive(int(m["pid"])) else "interrupted"


def format_seconds(seconds: float | None) -> str:
    if not seconds:
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_row(root: str | os.PathLike, name: str) -> dict[str, Any]:
    store = RunStore(root, name, readonly=True)
    try:
        meta = store.meta
        n = store.n_instances()
        counts = store.step_counts() if n else {}
        done = min(counts.values()) if counts else 0
    finally:
        store.close()
    env = meta.get("environment") or {}
    info = shard_info(name, meta)
    steps = int(meta.get("steps") or 0)
    return {
        "run": name,
        "experiment": meta.get("experiment_name", ""),
        "dataset": meta.get("dataset", ""),
        "method": meta.get("method", ""),
        "model": (meta.get("model") or {}).get("name") or ((meta.get("config") or {}).get("model") or {}).get("name", ""),
        "shard": f"{info.index}/{info.count}" if info.count > 1 else "",
        "status": live_status(store.dir, str(meta.get("status", ""))),
        # chains advance on their own: the least-advanced chain, and how many chains are complete
        "progress": f"{done}/{steps}",
        "chains_done": f"{sum(c >= steps for c in counts.values())}/{n}" if n else "",
        "outputs": f"{sum(min(c, steps) for c in counts.values())}/{n * steps}" if n else "",
        "prompts": n // max(int(meta.get("chains", 1) or 1), 1),
        "wall_time": format_seconds(meta.get("wall_time_s")),
        "host": env.get("host", ""),
        "gpu": env.get("gpu") or ("cpu" if env else ""),
        "git_sha": (env.get("git_sha") or "")[:10],
        "finished": meta.get("finished", ""),
    }


def list_table(root: str | os.PathLike, experiment: str | None = None, patterns: list[str] | None = None
               ) -> pd.DataFrame:
    """One row per stored run, sorted by experiment, dataset and name."""
    rows = []
    for name in list_runs(root):
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        try:
            row = run_row(root, name)
        except StorageError as exc:
            row = {c: "" for c in COLUMNS} | {"run": name, "status": f"unreadable ({exc})"}
        if experiment and row["experiment"] != experiment:
            continue
        rows.append(row)
    import pandas as pd  # here, not at the top: evaluate and predict import select_runs from this module

    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["experiment", "dataset", "run"], kind="stable").reset_index(drop=True)


def select_runs(cfg: Any) -> list[str]:
    """Run names a later stage (evaluate, predict, plot) works on: ``runs`` null = this config's run, "all" =
    every run of ``experiment_name``, or a list of glob patterns over run names. Here, with the listing, and not
    in the CLI plumbing: it is a question about what the store holds."""
    from omegaconf import OmegaConf

    from qalign_repro.store.run_names import run_name

    root = cfg.output_root
    spec = cfg.get("runs")
    existing = list_runs(root)
    if spec is None:
        name = run_name(cfg)
        if name not in existing:
            raise StorageError(
                f"no run {name!r} under {root}/runs for these overrides; run `python -m qalign_repro.run` "
                f"with them first (existing runs: {', '.join(existing) or 'none'})"
            )
        return [name]
    if spec == "all":
        experiments = {n: RunStore(root, n, readonly=True).meta.get("experiment_name") for n in existing}
        picked = [n for n, e in experiments.items() if e == cfg.experiment_name]
        if not picked:
            counts: dict[str, int] = {}
            for e in experiments.values():
                counts[str(e)] = counts.get(str(e), 0) + 1
            held = ", ".join(f"{e} ({k} run{'s' * (k > 1)})" for e, k in sorted(counts.items())) or "none"
            raise StorageError(
                f"runs=all matches no run of experiment_name={cfg.experiment_name} under {root}/runs (runs=all "
                f"takes every run of experiment_name; the runs there belong to: {held}); allowed: "
                "experiment_name=<one of those> (or the experiment=... you ran with), or runs='[<glob>]'")
    else:
        patterns = [spec] if isinstance(spec, str) else list(cast(list[str], OmegaConf.to_container(spec)))
        picked = [n for n in existing if any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not picked:
        raise StorageError(f"runs={spec} matches no run under {root}/runs (existing: {', '.join(existing) or 'none'})")
    return picked


def _default_root() -> str:
    from omegaconf import OmegaConf

    from qalign_repro.cli import CONF_DIR

    # cast: config.yaml is a mapping (``load`` is typed as either container)
    return str(cast("DictConfig", OmegaConf.load(CONF_DIR / "config.yaml")).get("output_root", "results"))


def parse_args(argv: list[str]) -> dict[str, Any]:
    allowed = {"output_root", "experiment_name", "runs", "format"}
    args: dict[str, Any] = {"output_root": None, "experiment_name": None, "runs": None, "format": "md"}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in allowed:
            raise SystemExit(f"error: unknown argument {a!r}; allowed: {', '.join(sorted(k + '=...' for k in allowed))}")
        args[key] = value
    if args["format"] not in ("md", "csv"):
        raise SystemExit(f"error: format={args['format']} is invalid; allowed: md, csv")
    return args


def main(argv: list[str] | None = None) -> None:
    """Print the runs table (markdown by default)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = args["output_root"] or _default_root()
    patterns = [p for p in (args["runs"] or "").split(",") if p] or None
    table = list_table(root, args["experiment_name"], patterns)
    if table.empty:
        print(f"no runs under {root}/runs" + (f" for experiment {args['experiment_name']}" if args["experiment_name"] else ""))
        return
    print(table.to_csv(index=False) if args["format"] == "csv" else table.to_markdown(index=False))
    counts = table["status"].value_counts().to_dict()
    print("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" ({len(table)} runs under {root})")


if __name__ == "__main__":
    main()
