"""End the MLflow runs of attempts that can no longer finish, so none stays RUNNING forever.

A worker killed with ``kill -9``, a task child killed at its timeout and a host that vanished all
leave their MLflow run RUNNING; a worker that finished its run but lost its lease before committing
leaves a FINISHED run that is not the task's result. The reaper compares each run of a pool
(tags ``qlib_ext.task_id``, ``qlib_ext.attempt``, ``qlib_ext.worker``) with its task document:

* a RUNNING run is live only while the task is ``running`` under that same worker and attempt;
  otherwise it is ended KILLED;
* a FINISHED run of a ``done`` task that is not the committed run is set KILLED and tagged
  ``qlib_ext.discarded`` (so each done task has exactly one FINISHED run: the committed one).

A RUNNING run without qlib-ext tags (its worker died between creating and tagging it) is matched
to its task by run name and ended once that task is no longer running, or was claimed again after
the run started.

Runs are read before task documents: a run is tagged only after its task was claimed, so a run we
see belongs to a claim the documents already show, and a live run is never mistaken for a ghost.
Safe to run from several processes at once (ending a run twice is harmless).
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from qlib_ext.pool.manager import GridTaskManager
from qlib_ext.pool.record import Doc, Tag
from qlib_ext.pool.status import TaskStatus

logger = logging.getLogger(__name__)

DISCARDED_TAG = Tag.DISCARDED
"""Tag on a FINISHED run whose result was never committed (another attempt's was)."""



def reap_runs(tm: GridTaskManager, mlflow_uri: str, task_ids: list[Any] | None = None) -> int:
    """End ghost runs of ``tm``'s pool (only those of ``task_ids`` when given); return how many.

    Args:
        tm: the pool's task manager.
        mlflow_uri: tracking URI the pool's runs live in.
        task_ids: restrict to these tasks (e.g. the ones lease recovery just reclaimed).
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = _pool_runs(client, tm.pool_name, task_ids)
    ended = _reap_untagged(client, tm) if task_ids is None else 0
    if not runs:
        return ended
    ids = {_oid(r.data.tags.get(Tag.TASK_ID)) for r in runs} - {None}
    docs = tm.owners(list(ids))
    for run in runs:
        verdict = _verdict(run, docs.get(_oid(run.data.tags.get(Tag.TASK_ID))))
        if verdict is not None:
            _end(client, run, verdict)
            ended += 1
    return ended


def _pool_runs(client: Any, pool: str, task_ids: list[Any] | None) -> list[Any]:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    flt = f"tags.`{Tag.POOL}` = '{pool}' and attributes.status != 'KILLED' and attributes.status != 'FAILED'"
    wanted = None if task_ids is None else {str(t) for t in task_ids}
    runs, token = [], None
    while exp_ids:
        page = client.search_runs(exp_ids, filter_string=flt, max_results=5000, page_token=token)
        runs.extend(r for r in page if wanted is None or r.data.tags.get(Tag.TASK_ID) in wanted)
        token = page.token
        if not token:
            break
    return runs


def _verdict(run: Any, doc: dict | None) -> str | None:
    """Why ``run`` must be ended, or None if it is live or the committed result."""
    if doc is None:
        return None  # its task is gone (dropped pool): not ours to judge
    tags, status = run.data.tags, run.info.status
    if status == "RUNNING" and Tag.ATTEMPT not in tags:
        return None  # still being tagged, or died while tagging: _reap_untagged decides once it is over
    live = (doc.get("status") == TaskStatus.RUNNING.value and str(doc.get(Doc.ATTEMPT)) == tags.get(Tag.ATTEMPT)
            and doc.get(Doc.WORKER) == tags.get(Tag.WORKER))
    if status == "RUNNING" and not live:
        return f"attempt {tags.get(Tag.ATTEMPT)} by {tags.get(Tag.WORKER)} is over"
    committed = (doc.get(Doc.OUTCOME) or {}).get("run_id")
    if status == "FINISHED" and doc.get("status") == TaskStatus.DONE.value and committed != run.info.run_id:
        return f"result not committed: the task's committed run is {committed}"
    return None


def _reap_untagged(client: Any, tm: GridTaskManager) -> int:
    """End RUNNING runs of the pool's experiment that never got all their qlib-ext tags (the worker died
    between creating the run and tagging it: Qlib sets tags one by one). Such a run is matched to its
    task by run name; it is dead when the task is not running, or was claimed again after it started."""
    experiment = tm.meta().experiment
    exp = client.get_experiment_by_name(experiment) if experiment else None
    if exp is None:
        return 0
    untagged = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
                if Tag.ATTEMPT not in r.data.tags and r.info.run_name]
    if not untagged:
        return 0
    docs = tm.by_run_name([r.info.run_name for r in untagged])
    ended = 0
    for run in untagged:
        started = dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.timezone.utc).replace(tzinfo=None)
        matches = docs.get(run.info.run_name, [])
        if matches and all(_claimed_after(d, started) for d in matches):
            _end(client, run, "its worker died before tagging it")
            ended += 1
    return ended


def _claimed_after(doc: dict, run_started: dt.datetime) -> bool:
    """Whether ``doc``'s current claim cannot own a run started at ``run_started`` (clock slack 5 s)."""
    if doc.get("status") != TaskStatus.RUNNING.value:
        return True
    claimed = doc.get("started_at")
    return isinstance(claimed, dt.datetime) and claimed - dt.timedelta(seconds=5) > run_started


def _end(client: Any, run: Any, reason: str) -> None:
    logger.warning("reaper: ending run %s (task %s) KILLED: %s", run.info.run_id,
                   run.data.tags.get(Tag.TASK_ID), reason)
    if run.info.status == "FINISHED":
        client.set_tag(run.info.run_id, DISCARDED_TAG, reason)
    client.set_terminated(run.info.run_id, status="KILLED")


def end_run(mlflow_uri: str, run_id: str, reason: str) -> None:
    """End one run KILLED with a ``qlib_ext.discarded`` reason (a fenced-out commit)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    client.set_tag(run_id, DISCARDED_TAG, reason)
    client.set_terminated(run_id, status="KILLED")


def _oid(value: Any) -> Any:
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        return None
