"""Task states as stored in the pool: plain strings, so Qlib's own tools keep reading them."""

from __future__ import annotations

from enum import Enum


class TaskStatus(str, Enum):
    """Status of a task document. The first four are Qlib's ``TaskManager`` states; the rest are ours:
    ``pruned`` is a rolling window a search's pruner dropped before it was ever queued."""

    WAITING = "waiting"
    RUNNING = "running"
    PART_DONE = "part_done"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"

    def __str__(self) -> str:
        return self.value


UNFINISHED = (TaskStatus.WAITING.value, TaskStatus.RUNNING.value, TaskStatus.PART_DONE.value)
"""States in which a task still has work ahead of it."""
