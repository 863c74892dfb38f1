"""How a search puts its tasks into the pool, and reads them back.

Queue order: a trial's tasks get priority ``-(number * WINDOW_SLOTS + window index)``, so workers take
older trials first and, within a trial, windows in time order. With pruning, a trial's window ``i + 1``
is only queued once window ``i`` has been judged (see :mod:`qlib_ext.search.proposer`): a pruned
configuration's later windows never reach ``waiting``. They are inserted ``pruned`` instead, so
``status`` counts them, and no worker ever claims them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlib_ext import defaults
from qlib_ext.pool.manager import GridTaskManager, task_hash
from qlib_ext.pool.record import Doc, Outcome
from qlib_ext.pool.status import TaskStatus

WINDOW_SLOTS = 1000
"""Priority slots per trial: more rolling windows than this would order windows of two trials together."""

@dataclass(frozen=True)
class TaskState:
    """What a search needs to know about one of its tasks."""

    status: str
    metrics: dict  # the committed result's metrics ({} unless done)
    run_id: str | None


def priority(number: int, window: int) -> int:
    """Claim priority of window ``window`` of trial ``number`` (higher is claimed first)."""
    return -(number * WINDOW_SLOTS + window)


def insert(tm: GridTaskManager, tasks: list[dict], number: int, first_window: int = 0,
           status: str = TaskStatus.WAITING.value, max_attempts: int = defaults.MAX_ATTEMPTS) -> int:
    """Insert the tasks not yet in the pool with the search's priorities and ``status``; return how many.

    A task already there (a proposal equal to a point that ran, or a crash after a partial insert) is
    left as it is, except that a ``pruned`` one that is queued again goes back to ``waiting``.
    """
    if not tasks:
        return 0
    priorities = [priority(number, first_window + i) for i in range(len(tasks))]
    inserted = tm.insert_prioritized(tasks, priorities, status, max_attempts)
    if status == TaskStatus.WAITING.value:
        tm.move_status([task_hash(t) for t in tasks], TaskStatus.PRUNED.value, TaskStatus.WAITING.value)
    return inserted


def states(tm: GridTaskManager, hashes: list[str]) -> dict[str, TaskState]:
    """Status, committed metrics and run id of each task in ``hashes`` that is in the pool."""
    out = {}
    for doc in tm.by_hash(hashes):  # a 0.1.0 pool's `result` was renamed `outcome` when tm opened it
        outcome: dict[str, Any] = doc.get(Doc.OUTCOME) or {}
        out[doc[Doc.HASH]] = TaskState(doc.get(Doc.STATUS, ""), outcome.get(Outcome.METRICS) or {},
                                       outcome.get(Outcome.RUN_ID))
    return out
