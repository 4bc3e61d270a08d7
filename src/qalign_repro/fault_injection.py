"""Test-only fault injection: ``QALIGN_KILL_AT=<point>:<step>`` SIGKILLs the process at that point.

Points: ``before_commit`` (step computed, nothing stored), ``in_commit`` (rows inserted, transaction not yet
committed), ``after_commit``. The crash-consistency tests use it to hit the exact moments a kill can hurt.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("QALIGN_KILL_AT")
    if not spec:
        return
    want_point, _, want_step = spec.partition(":")
    if want_point == point and want_step.isdigit() and int(want_step) == step:
        os.kill(os.getpid(), signal.SIGKILL)
