"""Test-time methods (see methods/base.py): one module per method, registered in ``METHODS``."""

from qalign_repro.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
