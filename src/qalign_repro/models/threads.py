"""How many CPU threads torch uses for the in-process HF backends.

Why this exists: torch starts one intra-op thread per core. For the shipped tiny models (1.8 M and 3.6 M
parameters) every op takes microseconds, so extra threads only add synchronisation, and on a machine that other
processes share, each of the thousands of ops per step waits for an OpenMP thread that is not scheduled. The
README's API example took 86 s that way on a loaded 2-core machine (measured 2026-12-01 at load average 5: the
4-prompt x 8-step example 93 s wall with 2 threads, 17 s with 1; the sampling alone of 1 prompt x 8 steps at load
2: 1.2-10.1 s with 2 threads, 0.2-0.5 s with 1). Larger models keep torch's default, and an explicit
``OMP_NUM_THREADS`` always wins.
"""

from __future__ import annotations

import os
from typing import Any

#: below this many parameters (all CPU models together) one thread is faster than several
SMALL_MODEL_PARAMS = 50_000_000


def tune_cpu_threads(*backends: Any) -> int | None:
    """Use one torch thread when every given backend is an in-process HF model on the CPU and together they are
    small; returns the thread count it set, or None when it left torch alone (GPU, other backends, a large model,
    or ``OMP_NUM_THREADS`` set by the user)."""
    if os.environ.get("OMP_NUM_THREADS") or not backends:
        return None
    for b in backends:
        if getattr(b, "name", None) != "hf" or not str(getattr(b, "device", "")).startswith("cpu"):
            return None
    if sum(int(getattr(b, "n_params", 0) or 0) for b in backends) >= SMALL_MODEL_PARAMS:
        return None
    import torch

    torch.set_num_threads(1)
    return 1
