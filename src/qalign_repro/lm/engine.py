"""Request engines: how the step driver hands generation requests to a backend and gets finished ones back.

A generator's ``sample`` is a batch call that lasts as long as its longest completion. An engine decouples
submission from completion: the driver ``submit``s requests whenever a chain is ready and ``wait``s for
whichever finish first. Backends that batch continuously (vLLM's request API, OpenAI-compatible servers) give
each request back as soon as it is done, so a chain can submit its next proposal while others still generate;
``BatchedEngine`` adapts any ``Generator``: it runs everything submitted so far as ``sample`` calls of at most
``batch_size`` requests (lock-step underneath, but with independent samples submitted in bulk it still fills
every call).

Every request carries its own seed, so what comes back does not depend on which requests shared an engine step.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from qalign_repro.lm.base import Completion


@dataclass
class Request:
    key: Hashable
    prompt_ids: list[int]
    max_tokens: int
    seed: int


@dataclass
class EngineStats:
    """What the progress bar and the benchmarks report about an engine."""

    submitted: int = 0
    finished: int = 0
    generated_tokens: int = 0
    busy_s: float = 0.0             # wall time spent waiting on the engine
    seq_seconds: float = 0.0        # integral of requests in flight over that time
    extra: dict[str, Any] = field(default_factory=dict)

    def waited(self, seconds: float, in_flight: int) -> None:
        """``seconds`` spent waiting on the engine with ``in_flight`` requests in it."""
        self.busy_s += seconds
        self.seq_seconds += seconds * in_flight

    def completed(self, comps: list[Completion]) -> None:
        self.finished += len(comps)
        self.generated_tokens += sum(len(c.token_ids) for c in comps)

    def mean_in_flight(self) -> float:
        return self.seq_seconds / self.busy_s if self.busy_s > 0 else 0.0


class RequestEngine(Protocol):
    #: True when finished requests come back before the slowest request of their batch is done
    continuous: bool
    stats: EngineStats

    def submit(self, request: Request) -> None: ...

    def wait(self) -> list[tuple[Hashable, Completion]]:
        """Block until at least one submitted request finished (when any is in flight) and return the
        finished ones; an empty list only when nothing is in flight."""

    def in_flight(self) -> int: ...

    def close(self) -> None: ...


class BatchedEngine:
    """Any ``Generator`` as an engine: ``wait`` runs every queued request through ``sample`` (chunks of
    ``batch_size``) and returns them all."""

    continuous = False

    def __init__(self, generator: Any, batch_size: int, temperature: float = 1.0):
        self.generator, self.batch_size, self.temperature = generator, int(batch_size), float(temperature)
        self.queue: list[Request] = []
        self.stats = EngineStats()

    def submit(self, request: Request) -> None:
        self.queue.append(request)
        self.stats.submitted += 1

    def in_flight(self) -> int:
        return len(self.queue)

    def wait(self) -> list[tuple[Hashable, Completion]]:
        if not self.queue:
            return []
        batch, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        t0 = time.perf_counter()
        comps = self.generator.sample([r.prompt_ids for r in batch], [r.max_tokens for r in batch],
                                      [r.seed for r in batch], temperature=self.temperature)
        dt = time.perf_counter() - t0
        self.stats.waited(dt, len(batch))
        self.stats.completed(comps)
        return [(r.key, c) for r, c in zip(batch, comps)]

    def close(self) -> None:
        self.queue.clear()


def engine_for(generator: Any, batch_size: int, temperature: float, continuous: bool) -> RequestEngine:
    """The generator's own continuous engine when it has one and ``continuous`` is asked for, else batches."""
    make = getattr(generator, "request_engine", None)
    engine = make(temperature=temperature) if continuous and make is not None else None
    return engine if engine is not None else BatchedEngine(generator, batch_size, temperature)


class ShuffledEngine:
    """A stand-in for a continuously batching engine on any generator: each ``wait`` finishes a seeded random
    subset of what is in flight (1 to all of it), in random order. Tests and the toy backend use it to check
    that the async schedule's results do not depend on the order in which requests finish."""

    continuous = True

    def __init__(self, generator: Any, temperature: float = 1.0, seed: int = 0):
        import numpy as np

        self.generator, self.temperature = generator, float(temperature)
        self.rng = np.random.default_rng(seed)
        self.queue: list[Request] = []
        self.stats = EngineStats()
        self.max_seen = 0

    def submit(self, request: Request) -> None:
        self.queue.append(request)
        self.stats.submitted += 1
        self.max_seen = max(self.max_seen, len(self.queue))

    def in_flight(self) -> int:
        return len(self.queue)

    def wait(self) -> list[tuple[Hashable, Completion]]:
        if not self.queue:
            return []
        n = int(self.rng.integers(1, len(self.queue) + 1))
        pick = set(self.rng.permutation(len(self.queue))[:n].tolist())
        batch = [r for j, r in enumerate(self.queue) if j in pick]
        self.queue = [r for j, r in enumerate(self.queue) if j not in pick]
        batch = [batch[j] for j in self.rng.permutation(len(batch))]
        comps = self.generator.sample([r.prompt_ids for r in batch], [r.max_tokens for r in batch],
                                      [r.seed for r in batch], temperature=self.temperature)
        self.stats.finished += len(batch)
        return [(r.key, c) for r, c in zip(batch, comps)]

    def close(self) -> None:
        self.queue.clear()
