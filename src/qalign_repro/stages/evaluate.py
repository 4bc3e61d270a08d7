"""``python -m qalign_repro.evaluate``: grade every stored output of the selected runs.

Writes the expkit eval ``grades`` (one entry per instance: answers, correctness per output and any extra task
metrics). Pure function of the stored outputs, so rerunning gives the same eval; a run that gained steps
since its last evaluation is graded again, a fully graded one is skipped.

``evaluate.rescore=<RM>`` also scores every stored output with a second reward model and stores the rewards as
the eval ``reward:<its name>`` (``store/rescores.py``); ``predict.reward=reward:<name>`` then selects with them
(BoN and WMV under another RM) while accuracy still comes from the grades. ``<RM>``: a ``conf/reward`` name
(``tiny``, ``toy``, ``tulu3_8b_rm``, ...) or a mapping, ``{from: <conf/reward name>, path: <folder or hub id>}``
or a whole reward config (``{name: toy2, seed: 1}``). It runs on this config's reward backend (``backend=...``).
Idempotent and resumable like the grades: only outputs not scored yet by the same RM (same config, weights and
backend) are scored, and the partial eval is committed as it goes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from qalign_repro.cli import CONF_DIR, entry_point
from qalign_repro.errors import ConfigError, StorageError
from qalign_repro.store import rescores
from qalign_repro.store.listing import select_runs
from qalign_repro.store.storage import RunStore, list_runs
from qalign_repro.tasks import get_task


class RunDeleted(StorageError):
    """The run's store went away after evaluate selected it (deleted, or replaced by a new run of that name)."""


def _db_inode(store: RunStore) -> int | None:
    try:
        return store.storage.path(store.name).stat().st_ino
    except FileNotFoundError:
        return None


def _still_there(store: RunStore, inode: int | None) -> None:
    """Raise RunDeleted when the store opened as ``inode`` is gone. SQLite keeps reading a deleted file through
    its open handle, so without this check a deleted run read as "already evaluated", and taking the lock
    re-created its folder (with only the lock file, which is removed again here)."""
    if inode is not None and _db_inode(store) == inode:
        return
    lock = store.lock().path
    lock.unlink(missing_ok=True)
    try:
        lock.parent.rmdir()
    except OSError:  # not empty: a new run of that name is being created there
        pass
    raise RunDeleted(f"run {store.name!r} was deleted while evaluate ran ({lock.parent} is gone); nothing was graded "
                     "for it")


def grade_instance(task: Any, instance: dict[str, Any]) -> dict[str, Any]:
    doc = instance["input"]["doc"]
    answers, correct = [], []
    metrics: dict[str, list[float]] = {}
    cache: dict[str, dict[str, Any]] = {}
    for out in instance["outputs"]:
        text = out["text"]
        if text not in cache:  # QAlign repeats states: grade each distinct text once
            cache[text] = task.grade(doc, text)
        g = cache[text]
        answers.append(g.get("answer"))
        correct.append(bool(g.get("correct")))
        for key, value in g.items():
            if key not in ("answer", "correct") and isinstance(value, (bool, int, float)):
                metrics.setdefault(key, []).append(float(value))
    return {"id": instance["input"]["id"], "answer": answers, "correct": correct, "metrics": metrics}


def evaluate_run(root: str, name: str) -> list[dict[str, Any]]:
    store = RunStore(root, name)
    inode = _db_inode(store)
    with store.lock():
        _still_there(store, inode)
        store.verify()  # a damaged store is named as such, not reported through whatever value it garbled
        done = store.steps_done()
        if store.has_eval("grades"):
            grades = store.read_eval("grades")
            if len(grades) == store.n_instances() and all(len(g["correct"]) == done for g in grades):
                print(f"run {name}: already evaluated ({done} outputs per prompt); nothing to do")
                return grades
        task = get_task(store.meta["config"]["dataset"])
        grades = [grade_instance(task, inst) for inst in store.iter_instances()]
        store.write_eval("grades", grades)
    n_out = sum(len(g["correct"]) for g in grades)
    acc = sum(sum(g["correct"]) for g in grades) / max(n_out, 1)
    print(f"run {name}: graded {n_out} outputs of {len(grades)} prompts; mean per-output accuracy {acc:.3f}")
    return grades


# -- evaluate.rescore ---------------------------------------------------------------------------------------------
#: what ``evaluate.rescore`` accepts, for the one-line errors
RESCORE_ALLOWED = ("null, a conf/reward name ({names}), or a mapping: {{from: <conf/reward name>, path: <folder or "
                   "hub id>, ...}} or a whole reward config {{name: ..., ...}}")
#: a partial rescore is committed at most this often (each commit rewrites the whole eval)
COMMIT_EVERY_S = 30.0


def _reward_options() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "reward").glob("*.yaml"))


def _bad_rescore(value: Any, why: str = "is invalid") -> ConfigError:
    return ConfigError(f"evaluate.rescore={value!r} {why}; allowed: "
                       + RESCORE_ALLOWED.format(names=", ".join(_reward_options())))


def rescore_config(value: Any) -> dict[str, Any] | None:
    """The reward config ``evaluate.rescore`` names (None: no rescore), every value resolved; a one-line
    ConfigError for a value that names no reward config or leaves a required key unset."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        value = {"from": value}
    if not isinstance(value, Mapping):
        raise _bad_rescore(value)
    spec = dict(value)
    base = spec.pop("from", None)
    if base is not None:
        if not isinstance(base, str) or not (CONF_DIR / "reward" / f"{base}.yaml").is_file():
            raise _bad_rescore(base, "names no reward config")
        node = OmegaConf.merge(OmegaConf.load(CONF_DIR / "reward" / f"{base}.yaml"), spec)
    else:
        node = OmegaConf.create(spec)
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        raise ConfigError(f"evaluate.rescore={base or value!r} leaves {', '.join(missing)} unset; allowed: "
                          f"evaluate.rescore={{from: {base or '<conf/reward name>'}, {missing[0]}: <value>}}")
    out = cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))
    if not isinstance(out.get("name"), str) or not out["name"]:
        raise _bad_rescore(value, "has no name (the eval is called reward:<name>)")
    return out


@dataclass
class Rescore:
    """One ``evaluate.rescore``: the eval it writes, the reward config, and the record that says which RM made
    the eval (config, weights, backend): a stored eval is extended only by the RM with the same record."""

    key: str
    node: dict[str, Any]
    record: dict[str, Any]
    batch_size: int
    build: Callable[[], Any]
    _reward: Any = None

    def reward(self) -> Any:
        """The reward model, loaded on first use (a fully rescored run never loads it)."""
        if self._reward is None:
            self._reward = self.build()
        return self._reward

    def close(self) -> None:
        if self._reward is not None:
            self._reward.close()


def plan_rescore(cfg: DictConfig) -> Rescore | None:
    """The configured rescore, checked before any run is touched: the reward config, the weights' fingerprint
    (a local folder is validated here) and the reward backend."""
    node = rescore_config(cast(dict[str, Any], OmegaConf.to_container(cfg.evaluate, resolve=True)).get("rescore")
                          if cfg.get("evaluate") is not None else None)
    if node is None:
        return None
    from qalign_repro.models.folders import resolve_model_path, weights_fingerprint
    from qalign_repro.rm import REWARDS

    REWARDS.get(str(cfg.backend.reward))  # an unknown reward backend: one line, before any grading
    weights = None
    if (node.get("kind") or "model") == "model" and (node.get("path") is not None or node.get("asset")):
        weights = weights_fingerprint(resolve_model_path(node, "evaluate.rescore"))

    def build() -> Any:
        from qalign_repro.backends import build_reward_model

        return build_reward_model(cfg, node)

    record = {"reward": node, "weights": weights, "backend": str(cfg.backend.reward)}
    return Rescore(rescores.eval_name(str(node["name"])), node, record, int(cfg.batch_size), build)


def _score_queue(rescore: Rescore, messages: list[Any], texts: list[str]) -> tuple[list[float], list[int]]:
    values: list[float] = []
    tokens: list[int] = []
    for s in range(0, len(texts), rescore.batch_size):
        res = rescore.reward().score(messages[s:s + rescore.batch_size], texts[s:s + rescore.batch_size])
        values += [float(v) for v in res.rewards]
        tokens += [int(t) for t in res.tokens]
    return values, tokens


def rescore_run(root: str, name: str, rescore: Rescore) -> list[dict[str, Any]]:
    """Score the outputs of run ``name`` that the eval ``rescore.key`` does not hold yet with the rescore RM
    (each distinct text of an instance once), committing the eval as it goes; return the eval."""
    store = RunStore(root, name)
    inode = _db_inode(store)
    with store.lock():
        _still_there(store, inode)
        store.verify()
        records = dict(store.meta.get(rescores.META_KEY) or {})
        counts = store.step_counts()
        inputs = store.inputs()
        entries = None
        if records.get(rescore.key) == rescore.record and store.has_eval(rescore.key):
            entries = store.read_eval(rescore.key)
            if len(entries) != len(inputs) or any(e.get("id") != i["id"] for e, i in zip(entries, inputs)):
                entries = None
        if entries is not None and all(len(e["reward"]) >= counts.get(i["idx"], 0) for e, i in zip(entries, inputs)):
            print(f"run {name}: already rescored with {rescore.node['name']} (eval {rescore.key!r}); nothing to do")
            return entries
        if entries is None:  # none yet, or made by another RM (config, weights or backend): start over
            entries = [{"id": i["id"], "reward": [], "tokens": []} for i in inputs]
            store.update_meta(**{rescores.META_KEY: {**records, rescore.key: rescore.record}})
        scored, last_commit = 0, time.monotonic()
        queue: tuple[list[Any], list[str]] = ([], [])
        waiting: list[tuple[int, list[str], dict[str, int]]] = []

        def flush() -> None:
            nonlocal scored, last_commit
            values, tokens = _score_queue(rescore, *queue)
            for p, texts, where in waiting:
                entries[p]["reward"] += [values[where[t]] for t in texts]
                entries[p]["tokens"] += [tokens[where[t]] for t in texts]
                scored += len(texts)
            queue[0].clear()
            queue[1].clear()
            waiting.clear()
            if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                store.write_eval(rescore.key, entries)
                last_commit = time.monotonic()

        for p, inst in enumerate(store.iter_instances()):
            texts = [o.get("text") or "" for o in inst["outputs"][len(entries[p]["reward"]):]]
            if not texts:
                continue
            where: dict[str, int] = {}
            for t in texts:  # QAlign repeats states: score each distinct text of the instance once
                if t not in where:
                    where[t] = len(queue[1])
                    queue[0].append(inst["input"]["messages"])
                    queue[1].append(t)
            waiting.append((p, texts, where))
            if len(queue[1]) >= rescore.batch_size:
                flush()
        if waiting:
            flush()
        store.write_eval(rescore.key, entries)
    n_out = sum(len(e["reward"]) for e in entries)
    mean = sum(sum(e["reward"]) for e in entries) / max(n_out, 1)
    print(f"run {name}: rescored {scored} outputs with {rescore.node['name']} -> eval {rescore.key!r} "
          f"({n_out} outputs; mean reward {mean:.4g}); select with it: predict.reward={rescore.key}")
    return entries


@entry_point
def main(cfg: DictConfig) -> None:
    """Grade the selected runs' outputs and store them as the ``grades`` eval (and, with ``evaluate.rescore``,
    their rewards under a second RM as the eval ``reward:<name>``)."""
    rescore = plan_rescore(cfg)  # bad values fail before any run is graded
    names = select_runs(cfg)
    gone = []
    try:
        for name in names:
            try:
                if name not in list_runs(cfg.output_root):  # deleted since select_runs listed it
                    raise RunDeleted(f"run {name!r} was deleted while evaluate ran; nothing was graded for it")
                evaluate_run(cfg.output_root, name)
                if rescore is not None:
                    rescore_run(cfg.output_root, name, rescore)
            except RunDeleted as exc:
                print(f"warning: {exc}; skipped", file=sys.stderr)
                gone.append(name)
    finally:
        if rescore is not None:
            rescore.close()
    if gone and len(gone) == len(names):
        raise StorageError(f"every selected run ({', '.join(gone)}) was deleted while evaluate ran; nothing to grade")


if __name__ == "__main__":
    # call the importable module's main, so Hydra launchers (submitit, ray) pickle the job by reference
    from qalign_repro.stages.evaluate import main as _main

    _main()
