"""Follow-up tasks: the backtests a finished train-once training task queues before it commits.

At expansion (:func:`qlib_ext.workflow.sweep.train_once`) the strategy points of one model become
the training task's ``qlib_ext.sweep``. Once that task has trained, its attempt
(:mod:`qlib_ext.worker.attempt`, not the task body: the result is only the result) turns the sweep into
backtest tasks naming the training run (:func:`backtest_tasks`) and queues them while it still holds the
training task's lease (:func:`enqueue`), then commits the training task: the pool never looks finished in
between.
Unrelated to the lease-recovery pass (:meth:`qlib_ext.pool.manager.GridTaskManager.reclaim_expired`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from qlib_ext import defaults
from qlib_ext.pool.manager import Claim, GridTaskManager
from qlib_ext.pool.record import KIND_BACKTEST, META, Doc, TaskMeta

logger = logging.getLogger(__name__)


def backtest_tasks(task: dict, run_id: str, task_id: Any, artifacts: list | None = None) -> list[dict]:
    """The backtest tasks of a finished training task: one per sweep point, naming its run.

    Plain BSON-encodable dicts whose block is a :class:`TaskMeta`; each carries the training task's pool,
    experiment, grid hash, model and window, the sweep point's coordinates, strategy, config id and
    run name, and the sha256 of the training run's ``pred.pkl``/``label.pkl`` from ``artifacts`` (the
    training attempt's ``Outcome.ARTIFACTS``), which the backtest checks before reading them. Empty for a
    task without a sweep.
    """
    from qlib_ext.tracking.artifacts import SIGNAL_ARTIFACTS

    meta = TaskMeta.of(task)
    model_class = (task.get("model") or {}).get("class")
    signal = None if artifacts is None else [[k, v] for k, v in artifacts if k in SIGNAL_ARTIFACTS]
    return [{"record": copy.deepcopy(point["record"]),
             META: TaskMeta(pool=meta.pool, experiment=meta.experiment, grid_hash=meta.grid_hash, model=meta.model,
                            window=meta.window, config_id=point["config_id"], coords=point["coords"],
                            strategy=point["strategy"], run_name=point["run_name"], kind=KIND_BACKTEST,
                            model_class=model_class, parent_run_id=run_id, parent_task_id=str(task_id),
                             parent_artifacts=signal).to_dict()}
            for point in meta.sweep or []]


def enqueue(tm: GridTaskManager, claim: Claim, tasks: list[dict], lease_seconds: float) -> bool:
    """Queue a training task's backtests while its lease is still held; False if it was lost.

    Called before the training task commits, so the pool never looks finished in between; a
    retried training task queues its own set (the leaderboard keeps the committed run's only).
    """
    if not tm.renew(claim, lease_seconds):
        return False
    limit = claim.task.get(Doc.MAX_ATTEMPTS) or defaults.MAX_ATTEMPTS
    new, total = tm.create_tasks(tasks, max_attempts=limit)
    logger.info("follow-up: task %s queued %d of %d backtests", claim.id, new, total)
    return True

