"""The step driver: one scheduler for ``run``, the Python API and ``calibrate``.

Methods decide outputs (pure functions of config, chain state and k); the driver decides *when* each request is
made and commits what the method decided. Two schedules:

- ``lockstep`` (the reference): output k of every live chain in one batched ``Method.step`` call, then k + 1.
  Every method supports it; methods with several generate/score rounds per output (CARDS, SSS) run only so.
- ``async``: per-request methods only. Independent samples (``kind = "samples"``) are all submitted at once, up
  to ``in_flight`` requests, k-major so every prompt's first outputs come first; a chain (``kind = "chain"``)
  submits its next proposal as soon as its previous step is decided, so on an engine that batches continuously
  (vLLM, servers) every live chain always has a request in the engine and nobody waits for the slowest chain
  of a "step". Finished requests are scored in micro-batches of ``rm_batch``.

Both give byte-identical stored data for the same seed: randomness comes from ``(seed, prompt id, k)`` and every
request carries its own seed, so the order in which requests run changes nothing. Commits are per (chain, k),
grouped by whatever was decided together, each group one transaction; a chain's outputs are committed in step
order (independent samples that finish early wait for their predecessors), so a kill loses only what was in
flight or waiting and each chain resumes from its own last committed output.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from qalign_repro.errors import ConfigError
from qalign_repro.lm.base import Completion
from qalign_repro.lm.engine import Request, RequestEngine, engine_for
from qalign_repro.methods.base import Chain, Method, Proposal, RunContext

SCHEDULES = ("auto", "lockstep", "async")
Commit = Callable[[dict[tuple[int, int], dict[str, Any]]], None]


@dataclass
class Schedule:
    """A resolved schedule: ``mode`` is lockstep or async; ``in_flight`` bounds the requests in the engine;
    ``rm_batch`` is the micro-batch of finished proposals the RM scores at once (async)."""

    mode: str
    in_flight: int
    rm_batch: int
    continuous: bool = True


def resolve_schedule(name: str, method: Method, n_chains: int, *, in_flight: int | None = None,
                     rm_batch: int | None = None, batch_size: int = 64) -> Schedule:
    """``auto`` = the best the method supports (async for per-request methods, lock-step for the others).

    Default ``in_flight``: every live chain for chains (one request each); for independent samples 4 batches'
    worth, enough for an engine to batch while bounding memory. Default ``rm_batch``: for chains an eighth of
    the requests in flight (at least 1, at most ``batch_size``): large enough that RM calls are not dominated by
    overhead, small enough that few chains wait for their score; for independent samples, whose requests never
    wait for a score, a full ``batch_size``."""
    name = str(name)
    if name not in SCHEDULES:
        raise ConfigError(f"schedule={name!r} is not a known option; allowed: {', '.join(SCHEDULES)}")
    mode = "async" if name == "auto" and method.per_request else ("lockstep" if name == "auto" else name)
    if mode == "async" and not method.per_request:
        raise ConfigError(f"schedule=async needs a method that makes one request per output; method={method.name} "
                          "runs batched steps only; allowed: schedule=lockstep or schedule=auto")
    if in_flight is None:
        in_flight = max(1, n_chains) if method.kind == "chain" else max(4 * batch_size, 1)
    if rm_batch is None:
        rm_batch = (min(max(1, min(in_flight, max(n_chains, 1)) // 8), batch_size) if method.kind == "chain"
                    else batch_size)
    return Schedule(mode=mode, in_flight=int(in_flight), rm_batch=max(1, int(rm_batch)))


@dataclass
class Progress:
    """Counters of one drive (for the bar, the closing line and the run's meta)."""

    total: int
    committed: int = 0
    chains_done: int = 0
    n_chains: int = 0
    proposals: int = 0       # decided outputs k > 0 of chains
    accepted: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def postfix(self, kind: str, occupancy: float | None) -> dict[str, str]:
        out = {"chains": f"{self.chains_done}/{self.n_chains}"}
        if kind == "chain":
            out["acceptance"] = f"{self.accepted / self.proposals:.2f}" if self.proposals else "-"
        out["tok/s"] = f"{self.tokens / max(self.elapsed(), 1e-9):.0f}"
        if occupancy is not None:
            out["engine"] = f"{occupancy:.0%}"
        return out


class Driver:
    """Drives ``method`` over ``chains`` until each has ``steps`` outputs; ``commit`` stores a group."""

    def __init__(self, method: Method, ctx: RunContext, chains: list[Chain], steps: int, commit: Commit,
                 schedule: Schedule, *, progress: bool = False, desc: str | None = None):
        self.method, self.ctx, self.chains, self.steps, self.commit = method, ctx, chains, int(steps), commit
        self.schedule = schedule
        todo = sum(max(0, self.steps - c.done) for c in chains)
        self.progress = Progress(total=todo, n_chains=len(chains),
                                 chains_done=sum(c.done >= self.steps for c in chains))
        self.engine: RequestEngine | None = None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            done = sum(min(c.done, self.steps) for c in chains)
            self._bar = tqdm(total=done + todo, initial=done, desc=desc or f"{method.name} outputs",
                             file=sys.stderr, dynamic_ncols=True, unit="out")

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _committed(self, group: dict[tuple[int, int], dict[str, Any]], by_idx: dict[int, Chain]) -> None:
        if not group:
            return
        self.commit(group)
        p = self.progress
        for (idx, k), out in group.items():
            chain = by_idx[idx]
            p.committed += 1
            p.tokens += int(out.get("tokens_generated", 0))
            if self.method.kind == "chain" and k > 0:
                p.proposals += 1
                p.accepted += bool(out.get("accepted"))
            if chain.done >= self.steps and k == self.steps - 1:
                p.chains_done += 1
        occupancy = None
        if self.engine is not None and self.schedule.in_flight:
            live = max(1, min(self.schedule.in_flight, len(self.chains) - p.chains_done
                              if self.method.kind == "chain" else self.schedule.in_flight))
            occupancy = min(1.0, self.engine.stats.mean_in_flight() / live)
        if self._bar is not None:
            self._bar.update(len(group))
            self._bar.set_postfix({**p.postfix(self.method.kind, occupancy),
                                   **self.method.postfix(list(group.values()))}, refresh=False)
        _note_progress(p, self.steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.engine is not None:
            self.engine.close()

    # -- schedules --------------------------------------------------------------------------------------------
    def run(self) -> Progress:
        try:
            if self.schedule.mode == "lockstep":
                self._lockstep()
            else:
                self._async()
        finally:
            self.close()
        return self.progress

    def _lockstep(self) -> None:
        by_idx = {c.idx: c for c in self.chains}
        while True:
            live = [c for c in self.chains if c.done < self.steps]
            if not live:
                return
            k = min(c.done for c in live)  # after an asynchronous run was killed, the laggards catch up first
            group = [c for c in live if c.done == k]
            outputs = self.method.step(self.ctx, group, k)
            for c, o in zip(group, outputs):
                c.last, c.done = o, k + 1
            self._committed({(c.idx, k): o for c, o in zip(group, outputs)}, by_idx)

    def _async(self) -> None:
        ctx, method, steps = self.ctx, self.method, self.steps
        by_idx = {c.idx: c for c in self.chains}
        self.engine = engine = engine_for(ctx.generator, ctx.batch_size, ctx.temperature, self.schedule.continuous)
        ready: deque[tuple[Chain, int]]
        if method.kind == "chain":
            ready = deque((c, c.done) for c in self.chains if c.done < steps)
        else:
            start = min((c.done for c in self.chains), default=steps)
            ready = deque((c, k) for k in range(start, steps) for c in self.chains if k >= c.done)
        pending: dict[Hashable, Proposal] = {}
        finished: list[tuple[Proposal, Completion]] = []
        early: dict[int, dict[int, dict[str, Any]]] = {}  # samples decided before their predecessors
        while ready or pending or finished:
            while ready and len(pending) < self.schedule.in_flight:
                chain, k = ready.popleft()
                prop = method.propose(ctx, chain, k)
                if prop.completion is not None:  # already known (a warm start): straight to scoring
                    finished.append((prop, prop.completion))
                    continue
                key = (chain.idx, k)
                pending[key] = prop
                engine.submit(Request(key=key, prompt_ids=prop.prompt_ids, max_tokens=prop.max_tokens, seed=prop.seed))
            if pending:
                done = ctx.collect(engine)
                finished.extend((pending.pop(key), comp) for key, comp in done)
                # score when a micro-batch is ready, or when nothing else can finish without the RM first
                if len(finished) < self.schedule.rm_batch and engine.in_flight() > 0:
                    continue
            batch, finished = finished, []
            group = self._decide(batch)
            if method.kind == "chain":
                for (idx, k), out in sorted(group.items()):
                    chain = by_idx[idx]
                    chain.last, chain.done = out, k + 1
                    if k + 1 < steps:
                        ready.append((chain, k + 1))
                self._committed(group, by_idx)
            else:
                ordered: dict[tuple[int, int], dict[str, Any]] = {}
                for (idx, k), out in group.items():
                    early.setdefault(idx, {})[k] = out
                for idx in sorted({idx for idx, _ in group}):
                    chain, waiting = by_idx[idx], early[idx]
                    while chain.done in waiting:
                        out = waiting.pop(chain.done)
                        ordered[(idx, chain.done)] = out
                        chain.last, chain.done = out, chain.done + 1
                self._committed(ordered, by_idx)

    def _decide(self, batch: list[tuple[Proposal, Completion]]) -> dict[tuple[int, int], dict[str, Any]]:
        if not batch:
            return {}
        ctx, method = self.ctx, self.method
        texts = [method.scored_text(ctx, p, c) for p, c in batch]
        rewards, scored = ctx.score([p.chain.messages for p, _ in batch], texts)
        return {(p.chain.idx, p.k): method.decide(ctx, p, c, t, float(r), n)
                for (p, c), t, r, n in zip(batch, texts, rewards, scored)}


def _note_progress(p: Progress, steps: int) -> None:
    """Tell the Ctrl-C handler what is safely stored (one line instead of a traceback)."""
    try:
        from qalign_repro.progress_note import note
    except ImportError:  # pragma: no cover - the module ships with the package
        return
    note(f"{p.committed} outputs committed ({p.chains_done} of {p.n_chains} chains complete at {steps} steps)")


def drive(method: Method, ctx: RunContext, chains: list[Chain], steps: int, commit: Commit, *,
          schedule: str = "auto", in_flight: int | None = None, rm_batch: int | None = None,
          progress: bool = False, desc: str | None = None) -> Progress:
    """Advance every chain to ``steps`` outputs (from its own ``done``), committing as outputs are decided."""
    sched = resolve_schedule(schedule, method, len(chains), in_flight=in_flight, rm_batch=rm_batch,
                             batch_size=ctx.batch_size)
    return Driver(method, ctx, chains, steps, commit, sched, progress=progress, desc=desc).run()
