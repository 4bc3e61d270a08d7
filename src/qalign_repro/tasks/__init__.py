"""Benchmarks: one module per task, registered in ``TASKS`` (see tasks/base.py)."""

from qalign_repro.tasks.base import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
