"""End the MLflow runs of attempts whose worker died, so that no run stays RUNNING forever.

The worker that owns an attempt ends its run itself (:mod:`qlib_ext.worker.attempt`): FINISHED once the
result is committed, KILLED or FAILED otherwise. What no worker can end is the run of a worker that died
(``kill -9``, a lost host, a crash between the commit and ending the run) or a run MLflow would not end
at the time. The reaper compares each RUNNING run of a pool (a run is created with its tags
``qlib_ext.task_id``, ``qlib_ext.attempt`` and ``qlib_ext.worker``) with its task document:

* the task is ``running`` under that same worker and attempt: the attempt is live, the run is left alone;
* the task is ``done`` and this is its committed run (the worker died after committing): ended FINISHED;
* the run's result is spooled on its worker's disk (tag ``qlib_ext.spooled``, a store outage at commit)
  and nobody claimed the task since (``waiting`` or ``failed``, same attempt): left alone, the spool's
  replay commits it and ends the run;
* otherwise its attempt is over: ended KILLED, with the reason in the tag ``qlib_ext.discarded``.

FINISHED runs are never touched: FINISHED always means "committed in the pool". Runs are read before task
documents: a run is created only after its task was claimed, so a run we see belongs to a claim the
documents already show, and a live run is never mistaken for a dead one. Safe to run from several
processes at once (ending a run twice is harmless).
"""

from __future__ import annotations

import logging
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId

from qlib_ext import defaults
from qlib_ext.pool.manager import GridTaskManager
from qlib_ext.pool.record import Doc, Outcome, Tag
from qlib_ext.pool.status import ADOPTABLE, EndReason, RunStatus, TaskStatus

logger = logging.getLogger(__name__)


def reap_runs(tm: GridTaskManager, mlflow_uri: str, task_ids: list[Any] | None = None) -> int:
    """End the RUNNING runs of ``tm``'s pool whose attempt is over (only those of ``task_ids`` when given).

    Args:
        tm: the pool's task manager.
        mlflow_uri: tracking URI the pool's runs live in.
        task_ids: restrict to these tasks (e.g. the ones lease recovery just reclaimed).

    Returns:
        How many runs were ended.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = _running_runs(client, tm.pool_name, task_ids)
    if not runs:
        return 0
    docs = tm.owners(list({_oid(r.data.tags.get(Tag.TASK_ID)) for r in runs} - {None}))
    ended = 0
    for run in runs:
        verdict = _verdict(run, docs.get(_oid(run.data.tags.get(Tag.TASK_ID))))
        if verdict is not None:
            logger.warning("reaper: ending run %s (task %s) %s: %s", run.info.run_id, run.data.tags.get(Tag.TASK_ID),
                           *verdict)
            end_run(client, run.info.run_id, *verdict)
            ended += 1
    return ended


def _running_runs(client: Any, pool: str, task_ids: list[Any] | None) -> list[Any]:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    flt = f"tags.`{Tag.POOL}` = '{pool}' and attributes.status = '{RunStatus.RUNNING}'"
    wanted = None if task_ids is None else {str(t) for t in task_ids}
    runs: list[Any] = []
    token = None
    while exp_ids:
        page = client.search_runs(exp_ids, filter_string=flt, max_results=defaults.REAPER_PAGE_RUNS, page_token=token)
        runs.extend(r for r in page if wanted is None or r.data.tags.get(Tag.TASK_ID) in wanted)
        token = page.token
        if not token:
            break
    return runs


def _verdict(run: Any, doc: dict | None) -> tuple[RunStatus, str] | None:
    """How and why a RUNNING ``run`` must be ended, or None while its attempt may still commit."""
    tags = run.data.tags
    if doc is None or tags.get(Tag.ATTEMPT) in (None, "0"):
        return None  # its task is gone (a dropped pool), or no claim's run (``qlib-ext reproduce``)
    same_attempt = str(doc.get(Doc.ATTEMPT)) == tags.get(Tag.ATTEMPT)
    status = doc.get(Doc.STATUS)
    if status == TaskStatus.RUNNING.value and same_attempt and doc.get(Doc.WORKER) == tags.get(Tag.WORKER):
        return None
    if status == TaskStatus.DONE.value and (doc.get(Doc.OUTCOME) or {}).get(Outcome.RUN_ID) == run.info.run_id:
        return RunStatus.FINISHED, "committed; its worker did not end the run"
    if tags.get(Tag.SPOOLED) and status in ADOPTABLE and same_attempt:
        return None
    return RunStatus.KILLED, f"{EndReason.ATTEMPT_OVER}: attempt {tags.get(Tag.ATTEMPT)} by {tags.get(Tag.WORKER)}"


def end_run(client: Any, run_id: str, status: RunStatus, reason: str | None = None) -> None:
    """End one run with ``status``; a run ended KILLED gets ``reason`` as its ``qlib_ext.discarded`` tag.

    Raises:
        Exception: whatever MLflow raises (the caller retries later).
    """
    if status is RunStatus.KILLED:
        client.set_tag(run_id, Tag.DISCARDED, str(reason or EndReason.INTERRUPTED))
    client.set_terminated(run_id, status=status.value)


def _oid(value: Any) -> Any:
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        return None
