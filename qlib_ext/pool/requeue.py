"""The operator's commands on a pool's queue: ``retry`` (back into the queue) and ``cancel`` (out of it).

A task goes back to the state its work starts from: ``waiting``, or ``part_done`` for a task of Qlib's
``DelayTrainerRM`` whose second stage (``end_task_train``) is what failed or was cancelled; its ``res``
(the Recorder of the run ``begin_task_train`` made, which that stage resumes) is kept. ``claimed_from``
records which: written by every claim, and by ``cancel`` on a ``part_done`` task. Each command is one or two
``update_many`` guarded by status, so running it twice, or beside working workers, is harmless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlib_ext.pool.record import Doc
from qlib_ext.pool.status import TaskStatus

if TYPE_CHECKING:
    from qlib_ext.pool.manager import GridTaskManager

LATER = TaskStatus.PART_DONE.value
"""Where ``DelayTrainerRM``'s tasks wait for their second stage."""


def retry(tm: GridTaskManager, task_id: Any = None, failed_only: bool = False) -> int:
    """Requeue tasks: ``failed`` (and ``cancelled`` unless ``failed_only``), or the one ``task_id``.

    Attempts start again from zero; the ``errors`` history is kept. A targeted task may be in any state
    but ``running`` (cancel it first); a re-run done task loses its committed result (a second-stage task
    keeps ``res``, its begun run). Returns the number of tasks requeued.
    """
    if task_id is not None:
        flt = {Doc.ID: task_id, Doc.STATUS: {"$ne": TaskStatus.RUNNING.value}}
    else:
        statuses = [TaskStatus.FAILED.value] + ([] if failed_only else [TaskStatus.CANCELLED.value])
        flt = {Doc.STATUS: {"$in": statuses}}
    back = {Doc.ATTEMPT: 0, Doc.REQUEUED_AT: tm.now()}
    later = {"$set": {Doc.STATUS: LATER, **back}, "$unset": {Doc.LEASE_UNTIL: "", Doc.OUTCOME: ""}}
    first = {"$set": {Doc.STATUS: TaskStatus.WAITING.value, **back},
             "$unset": {Doc.LEASE_UNTIL: "", Doc.OUTCOME: "", Doc.RES: ""}}
    second_stage = {"$or": [{Doc.CLAIMED_FROM: LATER}, {Doc.STATUS: LATER}]}
    n = tm.task_pool.update_many({"$and": [flt, second_stage]}, later).modified_count
    return n + tm.task_pool.update_many({"$and": [flt, {"$nor": [second_stage]}]}, first).modified_count


def cancel(tm: GridTaskManager, now: bool = False) -> int:
    """Stop waiting and ``part_done`` tasks from being claimed (status ``cancelled``); with ``now`` running ones too.

    A cancelled running task fails its owner's next heartbeat (the lease is no longer held), so the
    worker interrupts it, ends its MLflow run KILLED and cannot commit. ``retry`` undoes this.
    Returns the number of tasks cancelled.
    """
    stamp = {Doc.STATUS: TaskStatus.CANCELLED.value, Doc.CANCELLED_AT: tm.now()}
    n = tm.task_pool.update_many({Doc.STATUS: LATER}, {"$set": {**stamp, Doc.CLAIMED_FROM: LATER}}).modified_count
    statuses = [TaskStatus.WAITING.value] + ([TaskStatus.RUNNING.value] if now else [])
    update = {"$set": stamp, "$unset": {Doc.LEASE_UNTIL: ""}}
    return n + tm.task_pool.update_many({Doc.STATUS: {"$in": statuses}}, update).modified_count
