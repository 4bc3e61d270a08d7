"""Merging the shards of a run back into one run, for the stages after ``run`` (predict, plot, listings).

``python -m qalign_repro.run shard.index=i shard.count=n`` stores prompts ``docs[i::n]`` (round robin, see
``run.shard_docs``) as an independent, resumable run named ``<group>.shard<i>of<n>``; its meta holds
``group`` and ``shard: {index, count}``. Evaluate grades each shard on its own. Everything that aggregates
over prompts (accuracy, bootstrap CIs, FLOPs) must see the whole group, in the original prompt order, so that
a sharded run gives exactly the numbers of the unsharded run with the same seed (randomness derives from
``(seed, prompt id, step)``, never from a shard's position).

This module gives that view without copying data:
    group_runs(root, names)            -> {group: [run names sorted by shard index]}
    check_group(root, group, names)    -> raises ShardError naming missing / unfinished / mismatched shards
    iter_group_instances(root, names)  -> instances of all shards, streamed in the original prompt order
    MergedRun(root, names)             -> a read-only, RunStore-like object over a whole group
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from qalign_repro.errors import DataError
from qalign_repro.store.storage import RunStore

_SHARD_SUFFIX = re.compile(r"^(?P<group>.+)\.shard(?P<index>\d+)of(?P<count>\d+)$")


class ShardError(DataError):
    """A sharded run cannot be merged (a shard is missing, unfinished or from another config)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    group: str
    index: int
    count: int


def shard_info(name: str, meta: dict[str, Any] | None = None) -> ShardInfo:
    """Group and position of a run: from its meta (``group``, ``shard``), else parsed from its name."""
    meta = meta or {}
    shard = meta.get("shard") or {}
    if meta.get("group") and shard:
        return ShardInfo(name, str(meta["group"]), int(shard.get("index", 0)), int(shard.get("count", 1)))
    m = _SHARD_SUFFIX.match(name)
    if m:
        return ShardInfo(name, m["group"], int(m["index"]), int(m["count"]))
    return ShardInfo(name, name, 0, 1)


def _meta(root: str | os.PathLike, name: str) -> dict[str, Any]:
    store = RunStore(root, name, readonly=True)
    try:
        return store.meta
    finally:
        store.close()


def group_runs(root: str | os.PathLike, names: Iterable[str]) -> dict[str, list[str]]:
    """Group run names by the run they are shards of; each list is sorted by shard index.

    The key is the group name (the name the unsharded run has). An unsharded run is a group of one. When the
    same config is stored both unsharded and sharded (or with two shard counts), the sharded variants are keyed
    ``<group>.shards<count>`` so that no two variants are pooled. Groups are returned sorted (stable tables)."""
    variants: dict[tuple[str, int], list[ShardInfo]] = {}
    for name in sorted(set(names)):
        info = shard_info(name, _meta(root, name))
        variants.setdefault((info.group, info.count), []).append(info)
    per_group: dict[str, int] = {}
    for group, _count in variants:
        per_group[group] = per_group.get(group, 0) + 1
    out: dict[str, list[str]] = {}
    for (group, count), infos in variants.items():
        key = group if per_group[group] == 1 or count == 1 else f"{group}.shards{count}"
        out[key] = [i.name for i in sorted(infos, key=lambda i: i.index)]
    return dict(sorted(out.items()))


def check_group(root: str | os.PathLike, group: str, names: Sequence[str], require_done: bool = True) -> int:
    """Check that ``names`` are all the shards of ``group``, from one config, and (optionally) finished.

    Returns the number of steps every shard has stored. Raises ShardError with every problem found, each
    naming the shard, so the user knows exactly which ``shard.index`` to (re)run."""
    infos, metas, steps = [], {}, {}
    for name in names:
        store = RunStore(root, name, readonly=True)
        try:
            metas[name] = store.meta
            steps[name] = store.steps_done() if store.n_instances() else 0
        finally:
            store.close()
        infos.append(shard_info(name, metas[name]))
    problems = []
    counts = sorted({i.count for i in infos})
    if len(counts) != 1:
        problems.append(f"shards disagree on shard.count ({counts}): {', '.join(names)}")
    count = counts[-1] if counts else 1
    have = {i.index: i.name for i in infos}
    missing = [f"{group}.shard{k}of{count}" for k in range(count) if k not in have]
    if missing:
        problems.append(f"missing shard(s): {', '.join(missing)} (run them with shard.count={count} "
                        f"shard.index={','.join(str(k) for k in range(count) if k not in have)})")
    hashes = {metas[n].get("config_hash") for n in names}
    if len(hashes) > 1:
        problems.append(f"shards were made with different configs (config hashes {sorted(map(str, hashes))})")
    want = {n: int(metas[n].get("steps") or 0) for n in names}
    if require_done:
        unfinished = [f"{n} ({steps[n]}/{want[n]} steps, status {metas[n].get('status')!r})" for n in names
                      if metas[n].get("status") != "done" or steps[n] < want[n]]
        if unfinished:
            problems.append(f"unfinished shard(s): {'; '.join(unfinished)}; rerun them to resume")
    if problems:
        raise ShardError(f"run {group!r} cannot be merged: " + "; ".join(problems))
    return min(steps.values()) if steps else 0


def _interleave(iterators: list[Iterator[Any]]) -> Iterator[tuple[int, Any]]:
    """Round robin over shard streams: item j of shard s is prompt ``j * count + s`` of the unsharded run.

    A round-robin split gives shard sizes that never grow with the shard index and differ by at most one, so
    every round is served by shards 0..k-1 and only the last round may be partial; anything else means the
    streams are not the shards of one run, and merging them would silently reorder prompts."""
    alive = list(range(len(iterators)))
    partial = False
    while alive:
        got: list[int] = []
        for s in alive:
            try:
                item = next(iterators[s])
            except StopIteration:
                continue
            if partial or s != len(got):
                raise ShardError("shard sizes do not match a round-robin split of one run's prompts")
            got.append(s)
            yield s, item
        partial = len(got) < len(alive)
        alive = got


def iter_group_instances(root: str | os.PathLike, names: Sequence[str], check: bool = True
                         ) -> Iterator[dict[str, Any]]:
    """Stream ``{"input", "outputs"}`` of all shards of one group in the original prompt order.

    ``names`` are the group's runs sorted by shard index (as ``group_runs`` returns them). ``input["idx"]`` is
    rewritten to the prompt's position in the unsharded run; ``input["shard"]`` records where it came from.
    Memory: one instance per shard at a time."""
    if check and len(names) > 1:
        check_group(root, shard_info(names[0], _meta(root, names[0])).group, names, require_done=False)
    stores = [RunStore(root, n, readonly=True) for n in names]
    try:
        count = len(stores)
        for s, inst in _interleave([st.iter_instances() for st in stores]):
            local = int(inst["input"].get("idx", 0))
            inst["input"] = {**inst["input"], "idx": local * count + s,
                             "shard": {"index": s, "count": count, "idx": local}}
            yield inst
    finally:
        for st in stores:
            st.close()


class MergedRun:
    """Read-only view of a whole group with the RunStore methods the later stages read.

    ``name`` is the group name; ``meta`` is shard 0's meta with the group's totals (prompts, wall time, doc ids
    in original order, the shard names it was merged from). With one member it is that run."""

    def __init__(self, root: str | os.PathLike, names: Sequence[str], require_done: bool = False):
        if not names:
            raise ShardError("no runs to merge")
        self.root = root
        self.members = list(names)
        info = shard_info(names[0], _meta(root, names[0]))
        self.group = info.group
        sharded = len(names) > 1 or info.count > 1
        self.name = self.group if sharded else names[0]
        if sharded:  # also a lone shard: its siblings are missing
            check_group(root, self.group, names, require_done=require_done)
        self._stores = [RunStore(root, n, readonly=True) for n in names]

    # -- RunStore-compatible reads --------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        metas = [s.meta for s in self._stores]
        if len(metas) == 1:
            return metas[0]
        merged = dict(metas[0])
        doc_ids = _interleave_lists([m.get("doc_ids") or [] for m in metas])
        status = "done" if all(m.get("status") == "done" for m in metas) else "running"
        merged.update(run_name=self.group, status=status, doc_ids=doc_ids,
                      shard={"index": 0, "count": 1, "merged_from": list(self.members)},
                      steps_done=self.steps_done(),
                      wall_time_s=sum(float(m.get("wall_time_s") or 0.0) for m in metas),
                      hosts=sorted({str((m.get("environment") or {}).get("host")) for m in metas}))
        return merged

    def n_instances(self) -> int:
        return sum(s.n_instances() for s in self._stores)

    def steps_done(self) -> int:
        return min(s.steps_done() if s.n_instances() else 0 for s in self._stores)

    def has_eval(self, key: str) -> bool:
        return all(s.has_eval(key) for s in self._stores)

    def read_eval(self, key: str) -> list[dict[str, Any]]:
        return _interleave_lists([s.read_eval(key) for s in self._stores])

    def inputs(self) -> list[dict[str, Any]]:
        return [inst["input"] for inst in self.iter_instances()]

    def iter_instances(self) -> Iterator[dict[str, Any]]:
        if len(self._stores) == 1:  # an unsharded run
            return self._stores[0].iter_instances()
        return iter_group_instances(self.root, self.members, check=False)

    def close(self) -> None:
        for s in self._stores:
            s.close()

    def __enter__(self) -> MergedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _interleave_lists(parts: list[list[Any]]) -> list[Any]:
    return [item for _, item in _interleave([iter(p) for p in parts])]


def open_groups(root: str | os.PathLike, names: Iterable[str], require_done: bool = False
                ) -> Iterator[MergedRun]:
    """One MergedRun per group among ``names`` (a convenience for stages that loop over runs)."""
    for members in group_runs(root, names).values():
        yield MergedRun(root, members, require_done=require_done)
