"""What is safely stored so far, in words, for the one line a Ctrl-C prints (cli.entry_point).

Why module state: the step driver knows the progress, the entry point catches the interrupt, and neither should
import the other. The driver calls ``note()`` after each commit with text that completes "interrupted after
...", e.g. ``note("12 steps committed (3 of 16 prompts complete)")``.
"""

from __future__ import annotations

_last: str | None = None


def note(text: str) -> None:
    """Record the latest committed progress (replaces the previous note)."""
    global _last
    _last = str(text)


def last() -> str | None:
    """The latest note of this process, or None when nothing was committed yet."""
    return _last


def clear() -> None:
    global _last
    _last = None
