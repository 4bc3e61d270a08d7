"""Generator backends (see lm/base.py)."""

from qalign_repro.lm.base import GENERATORS, Completion, Generator

__all__ = ["GENERATORS", "Completion", "Generator"]
