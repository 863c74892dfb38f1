"""The second stage of Qlib's ``DelayTrainerRM``, run by a worker (``qlib-ext worker --trainer delay``).

``DelayTrainerRM.train`` runs ``begin_task_train`` on each task itself (Qlib never skips that stage, not even
with ``skip_run_task=True``): an MLflow run with the task's params and the ``task`` object, ended FINISHED,
whose Recorder ``run_task`` commits in ``res`` with the task ``part_done``. ``DelayTrainerRM.worker()`` then
claims ``part_done`` tasks and runs ``end_task_train(res, experiment)``: it resumes *that* run, fits the
model, saves ``params.pkl``/``dataset`` and generates the task's records in it, and commits it ``done``.

A qlib-ext worker does the same with its leases, retries and timeouts. Each attempt resumes the one run
(:func:`reopen`): tagged with the attempt first, then RUNNING again, so the reaper and a stale attempt of the
same task judge it by its latest owner (:func:`still_ours`). A failed attempt ends the run FAILED and puts the
task back to ``part_done``; the next one resumes the same run, as Qlib's ``safe_fetch_task`` would.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qlib_ext.errors import TaskRejected
from qlib_ext.pool.codec import RecorderRef
from qlib_ext.pool.record import Doc, Tag
from qlib_ext.pool.status import RunStatus, TaskStatus, Trainer

if TYPE_CHECKING:
    from qlib_ext.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


def is_second_stage(task_doc: dict) -> bool:
    """Whether a claimed task document came from ``part_done`` (``DelayTrainerRM``'s ``end_task_train``)."""
    return task_doc.get(Doc.CLAIMED_FROM) == TaskStatus.PART_DONE.value


def begun_run(client: Any, task_doc: dict, mlflow_uri: str) -> tuple[RecorderRef, str]:
    """The Recorder ``begin_task_train`` left in ``res``, and the name of the experiment its run is in.

    Raises:
        TaskRejected: ``res`` holds no Recorder, or its run is not in this worker's tracking store (the message
            names both URIs and the flag that sets ours).
    """
    from mlflow.exceptions import MlflowException

    ref, task_id = task_doc.get(Doc.RES), task_doc.get(Doc.ID)
    if not isinstance(ref, RecorderRef) or not ref.run_id:
        raise TaskRejected(f"task {task_id} is part_done but its 'res' is a {type(ref).__name__}, not the Recorder "
                           f"Qlib's DelayTrainerRM.train (begin_task_train) commits there: nothing to resume")
    try:
        run = client.get_run(ref.run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise  # MLflow away: an infrastructure fault, retried
        raise TaskRejected(f"task {task_id}: run {ref.run_id} (begin_task_train's, tracking URI {ref.uri}) is not in "
                           f"this worker's MLflow {mlflow_uri}; pass the submitter's exp_manager URI as "
                           f"--mlflow-uri") from e
    return ref, client.get_experiment(run.info.experiment_id).name


def reopen(client: Any, run_id: str, tags: dict[str, str]) -> str:
    """Make ``run_id`` the attempt's run again: its tags first (this attempt's owner), then RUNNING, as Qlib's
    ``R.start(recorder_id=..., resume=True)`` does; an earlier attempt's ``qlib_ext.discarded`` tag removed."""
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, tags=items[i:i + 100])
    forget_discarded(client, run_id)
    client.update_run(run_id, status=RunStatus.RUNNING.value)
    return run_id


def forget_discarded(client: Any, run_id: str) -> None:
    """Remove a ``qlib_ext.discarded`` tag an earlier attempt of the resumed run left (a finished run has none)."""
    if Tag.DISCARDED in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, Tag.DISCARDED)


def still_ours(client: Any, run_id: str, worker: str, attempt: int) -> bool:
    """Whether the resumed run still names this attempt as its owner (no later attempt has reopened it)."""
    tags = client.get_run(run_id).data.tags
    return tags.get(Tag.WORKER) == worker and tags.get(Tag.ATTEMPT) == str(attempt)


def left_for_delay(pool: str, counts: dict[str, int], trainer: str) -> str:
    """The line ``qlib-ext worker`` ends with when TrainerRM's stage left ``part_done`` tasks ('' otherwise): they
    wait for ``DelayTrainerRM``'s second stage, which only ``--trainer delay`` runs."""
    n = counts.get(TaskStatus.PART_DONE.value, 0)
    if not n or trainer != Trainer.RM:
        return ""
    return (f"\n{n} part_done task(s) of pool {pool} wait for the second stage of Qlib's DelayTrainerRM "
            f"(end_task_train), which TrainerRM's workers leave alone; run it with: "
            f"qlib-ext worker --pool {pool} --trainer delay (and this command's other flags)")


def only_second_stage_left(settings: WorkerSettings) -> bool:
    """Whether TrainerRM's workers (``settings.trainer == "rm"``) would find nothing but ``part_done`` tasks, so
    ``qlib-ext worker`` need not start any (:func:`left_for_delay` then says what to run)."""
    from qlib_ext.pool.manager import GridTaskManager, open_db

    if settings.trainer != Trainer.RM:
        return False
    db = open_db(settings.mongo_url, settings.db_name)
    try:
        tm = GridTaskManager(settings.pool, db, migrate=False)
        return tm.unfinished(Trainer.RM.pending) == 0 and tm.counts().get(TaskStatus.PART_DONE.value, 0) > 0
    finally:
        db.client.close()
