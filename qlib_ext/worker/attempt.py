"""One attempt at a task, from its claim to the end of its MLflow run, in this order:

1. **claim** (:meth:`~qlib_ext.pool.manager.GridTaskManager.claim`, in the loop): the task is ``running``
   under this worker's lease and a new attempt number;
2. **check**: the definition decoded as plain data, its shape and the module allow-list checked before
   anything of it is imported (a task that can never run fails at once, without a run);
3. **open the run** (:func:`open_run`): created RUNNING in MLflow with all its tags (pool, task, attempt,
   worker, grid nesting) and its params;
4. **run** the body (:func:`qlib_ext.worker.body.run_grid_task`) in-process, or in a forked child when
   the task has a timeout, under a heartbeat that renews the lease: records, then the timings, short
   metric names, the run plot and the sanity flags, all while the run is RUNNING; the body never ends it;
5. **follow-up**: a train-once training task queues its backtests while it still holds the lease;
6. **fenced commit** (:meth:`~qlib_ext.pool.manager.GridTaskManager.commit`); while the store is away the
   result is spooled to local disk (:mod:`qlib_ext.worker.spool`) and the commit retried or replayed;
7. **end the run**: FINISHED only once the commit succeeded; KILLED when the commit was refused or the
   attempt was interrupted or timed out; FAILED once the task's failure is recorded in the pool.

So FINISHED in MLflow always means "committed in the pool". The reaper
(:mod:`qlib_ext.tracking.reaper`) is left with the runs of workers that died.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from pymongo.errors import PyMongoError

from qlib_ext import defaults
from qlib_ext.errors import ChildTaskFailed, StoreError, TaskInterrupted, TaskTimeout
from qlib_ext.pool.manager import Claim, GridTaskManager
from qlib_ext.pool.record import META, Doc, Outcome, Tag, TaskMeta
from qlib_ext.pool.status import EndReason, RunStatus, TaskStatus
from qlib_ext.tracking.reaper import end_run
from qlib_ext.worker.timeouts import ChildProcessTask, InProcessTask

if TYPE_CHECKING:
    from qlib_ext.worker.loop import Worker
    from qlib_ext.worker.settings import WorkerSettings
    from qlib_ext.worker.spool import Spooled

logger = logging.getLogger(__name__)

STORE_ERRORS = (PyMongoError, StoreError)
"""What an unreachable store raises: retried with back-off, never fatal."""

_experiments: dict[tuple[str, str], str] = {}  # (tracking URI, experiment name) -> id, per process
_identities: dict[str, dict] = {}  # provider URI -> data identity, per process


class Attempt:
    """One claimed task on its way to a committed result or a recorded failure, and its MLflow run.

    Used by the worker's main thread only; the heartbeat thread and the stop timer only interrupt the
    task runner. Every way out of :meth:`run` ends the run or leaves it to a later step that will (a
    spooled result's commit; the reaper when MLflow would not answer).
    """

    def __init__(self, worker: Worker, claim: Claim, run_id: str | None = None):
        from qlib_ext.worker.delayed import is_second_stage

        self.worker, self.s, self.tm, self.claim = worker, worker.s, worker.tm, claim
        self.run_id = run_id
        self.resumed = is_second_stage(claim.task)  # DelayTrainerRM's end_task_train: begin_task_train's run

    def run(self) -> None:
        """Check, open the run, run the body, queue follow-ups, commit, end the run.

        Raises:
            PyMongoError, StoreError: the store went away outside the commit (the loop backs off).
        """
        from qlib_ext.worker.body import run_grid_task
        from qlib_ext.worker.heartbeat import HeartbeatThread

        claim, s = self.claim, self.s
        runner = ChildProcessTask(s.task_timeout) if s.task_timeout else InProcessTask()
        logger.info("worker %s: claimed task %s (attempt %d)", claim.worker, claim.id, claim.attempt)
        self.worker.stop.task_started(runner)
        # the heartbeat holds the lease from the claim to the commit (opening the run and queueing follow-ups
        # included): the lease is a few heartbeats long, shorter than a slow MLflow can take
        with HeartbeatThread(self.tm, claim, s.lease_seconds, s.heartbeat_seconds,
                             on_lost=lambda: runner.interrupt(EndReason.LEASE_LOST)) as heartbeat:
            try:
                task = self._checked()
                experiment = self._open(task)
                if heartbeat.lost.is_set():
                    raise TaskInterrupted(EndReason.LEASE_LOST)
                result = runner.run(run_grid_task, task, self.run_id, cache_dir=s.cache_dir,
                                    fast_backtest=s.fast_backtest, experiment=experiment)
            except TaskInterrupted as e:
                self._interrupted(e.reason)
                return
            except Exception as e:  # noqa: BLE001 - any task error is recorded on the task, never fatal
                self.failed(e)
                return
            finally:
                self.worker.stop.task_ended()
            result = {**result, Outcome.WORKER: claim.worker, Outcome.ATTEMPT: claim.attempt}
            followed = self._follow_up(task, result)
        if followed:
            self._commit(result)

    def _open(self, task: dict) -> str | None:
        """Open the attempt's run (a new one, or the one ``begin_task_train`` made: :mod:`~qlib_ext.worker.delayed`);
        return the experiment of a task Qlib submitted (None: the task's ``qlib_ext`` block names it)."""
        from qlib_ext.worker.delayed import begun_run

        claim, s = self.claim, self.s
        experiment = None if META in task else s.experiment or s.pool  # a task Qlib submitted
        resume = None
        if self.resumed:
            ref, experiment = begun_run(_client(s.mlflow_uri), claim.task, s.mlflow_uri)
            resume = ref.run_id
        self.run_id = open_run(s.mlflow_uri, task, str(claim.id), claim.worker, claim.attempt,
                               device=self.worker.device, experiment=experiment, pool=s.pool,
                               provider_uri=s.provider_uri, resume=resume)
        return experiment

    def _checked(self) -> dict:
        """The claimed task's definition, checked before anything of it is imported: its shape, then
        the allow-list of modules; with LightGBM's threads pinned."""
        from qlib_ext.pool.allowlist import check_modules
        from qlib_ext.pool.codec import check_shape
        from qlib_ext.worker.settings import limit_threads

        task = check_shape(self.claim.task.get(Doc.DEF), self.claim.id)
        check_modules(task, tuple(self.s.allowed_modules))
        return limit_threads(task, self.s.threads)

    # ------------------------------------------------------------------ the result
    def _follow_up(self, task: dict, result: dict) -> bool:
        """Queue a train-once training task's backtests before it commits (never a finished-looking pool
        in between); False when the attempt ended here."""
        from qlib_ext.worker.follow_up import backtest_tasks, enqueue

        try:
            backtests = backtest_tasks(task, result[Outcome.RUN_ID], self.claim.id, result.get(Outcome.ARTIFACTS))
            if not backtests or enqueue(self.tm, self.claim, backtests, self.s.lease_seconds):
                return True
        except STORE_ERRORS:
            self._end(RunStatus.KILLED, EndReason.STORE_AWAY)
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a sweep point that does not expand: the task's failure
            self.failed(e)
            return False
        logger.warning("worker %s: lease on task %s lost before its backtests were queued", self.claim.worker,
                       self.claim.id)
        self._end(RunStatus.KILLED, EndReason.LOST_BEFORE_FOLLOW_UP)
        return False

    def _commit(self, result: dict) -> None:
        """Commit under fencing, then end the run; while the store is away, keep the result spooled on disk."""
        from qlib_ext.worker import spool

        try:
            ok = commit_once(self.tm, self.claim, result)
        except STORE_ERRORS as e:
            path = spool.write(self.s.pool, self.claim, result)
            logger.warning("worker %s: cannot commit task %s (%s); result spooled to %s", self.claim.worker,
                           self.claim.id, e, path)
            self._mark_spooled(str(path))
            ok = self.worker.store_retry(lambda: commit_once(self.tm, self.claim, result), give_up_on_stop=False)
            if ok is None:
                return  # stopped while the store is away: the run stays RUNNING until a replay commits it
            spool.remove(path)
        self.settle(ok, EndReason.LOST_BEFORE_COMMIT)

    def settle(self, committed: bool, refused: EndReason) -> None:
        """End the run after a commit: FINISHED if it was accepted, else KILLED for ``refused``."""
        if committed:
            logger.info("worker %s: committed task %s (attempt %d, run %s)", self.claim.worker, self.claim.id,
                        self.claim.attempt, self.run_id)
            self._end(RunStatus.FINISHED)
        else:
            self._end(RunStatus.KILLED, refused)

    def _mark_spooled(self, path: str) -> None:
        """Tag the run as waiting in a spool, so the reaper leaves it RUNNING while its commit is pending."""
        try:
            _client(self.s.mlflow_uri).set_tag(self.run_id, Tag.SPOOLED, path)
        except Exception as e:  # noqa: BLE001 - without the tag the reaper may end it early; the commit still ends it
            logger.warning("worker %s: could not tag run %s as spooled (%s)", self.claim.worker, self.run_id, e)

    # ------------------------------------------------------------------ the other ends
    def _interrupted(self, reason: str) -> None:
        claim = self.claim
        if reason == EndReason.LEASE_LOST:
            logger.warning("worker %s: lease on task %s lost (reclaimed or cancelled); task abandoned",
                           claim.worker, claim.id)
        else:
            logger.warning("worker %s: task %s interrupted (%s); handing it back", claim.worker, claim.id, reason)
            self.worker.store_retry(lambda: self.tm.fail(claim, str(reason), count_attempt=False))
        self._end(RunStatus.KILLED, reason)

    def failed(self, exc: Exception) -> None:
        """Record a failed attempt (rejected at once, handed back after an infrastructure fault, or one
        attempt used), then end its run: KILLED after a timeout, FAILED otherwise."""
        from qlib_ext.worker.faults import INFRA, RECURRING, REJECTED, classify, describe, root_cause

        if isinstance(exc, ChildTaskFailed):
            error, kind = str(exc), exc.kind
        elif isinstance(exc, TaskTimeout):
            error, kind = f"TaskTimeout: {exc}", None
        else:
            error, kind = describe(exc), classify(exc)
        if kind == REJECTED:
            self.reject(error)
            return
        if kind == RECURRING:
            cause = root_cause(exc) if not isinstance(exc, ChildTaskFailed) else error.strip().splitlines()[-1]
            self.reject(f"{error}\nnot retried: this error recurs identically on every attempt ({cause}); fix the "
                        f"task, then `qlib-ext retry {self.s.pool} --failed` or resubmit")
            return
        delay = self._infra(error) if kind == INFRA else None
        if delay is None:
            logger.error("worker %s: task %s failed (attempt %d): %s", self.claim.worker, self.claim.id,
                         self.claim.attempt, error.strip().splitlines()[-1] if error.strip() else exc)
            status = self.worker.store_retry(lambda: self.tm.fail(self.claim, error, max_attempts=self.s.max_attempts))
            logger.warning("worker %s: task %s -> %s", self.claim.worker, self.claim.id, status or "(lease lost)")
        if isinstance(exc, TaskTimeout):
            self._end(RunStatus.KILLED, EndReason.TIMED_OUT)
        else:
            self._end(RunStatus.FAILED)
        if delay is not None:
            self.worker.stop.event.wait(delay)

    def reject(self, error: str) -> None:
        """Fail a task that can never succeed as written, now, without using its other attempts (a rejection, or
        an error that would recur identically)."""
        claim = self.claim
        logger.error("worker %s: task %s rejected: %s", claim.worker, claim.id, error.strip().splitlines()[-1])
        status = self.worker.store_retry(lambda: self.tm.fail(claim, error, max_attempts=claim.attempt))
        logger.warning("worker %s: task %s -> %s", claim.worker, claim.id, status or "(lease lost)")
        self._end(RunStatus.FAILED)

    def _infra(self, error: str) -> float | None:
        """Hand the task back without using an attempt after a fault outside it (MLflow, store, disk); the
        back-off to wait, or None once it has had ``INFRA_RETRIES`` such retries (it then counts as an attempt)."""
        retries = int(self.claim.task.get(Doc.INFRA_RETRIES) or 0)
        if retries >= defaults.INFRA_RETRIES:
            return None
        delay = min(defaults.INFRA_BACKOFF_SECONDS * 2 ** retries, defaults.OUTAGE_MAX_SECONDS)
        logger.error("worker %s: task %s hit an infrastructure fault (%s); handed back without using an attempt "
                     "(%d of %d), backing off %.1fs", self.claim.worker, self.claim.id,
                     error.strip().splitlines()[-1], retries + 1, defaults.INFRA_RETRIES, delay)
        self.worker.store_retry(lambda: self.tm.fail(self.claim, error, count_attempt=False, infra=True))
        return delay

    def _end(self, status: RunStatus, reason: str | None = None) -> None:
        """End the run (if one was opened); when MLflow does not answer, the reaper ends it later. A resumed run
        (``DelayTrainerRM``'s) is left alone once a later attempt of the task has reopened it."""
        from qlib_ext.worker import delayed

        if self.run_id is None:
            return
        client = _client(self.s.mlflow_uri)
        try:
            if self.resumed and status is not RunStatus.FINISHED and not delayed.still_ours(
                    client, self.run_id, self.claim.worker, self.claim.attempt):
                logger.warning("worker %s: run %s was reopened by a later attempt; not ending it %s",
                               self.claim.worker, self.run_id, status)
                return
            if self.resumed and status is RunStatus.FINISHED:
                delayed.forget_discarded(client, self.run_id)  # a reaper that judged it before we reopened it
            end_run(client, self.run_id, status, reason)
        except Exception as e:  # noqa: BLE001 - MLflow away: the reaper ends it once MLflow answers
            logger.warning("worker %s: could not end run %s %s (%s); the reaper ends it later", self.claim.worker,
                           self.run_id, status, e)
            self.worker.unreaped.add(self.claim.id)


def commit_once(tm: GridTaskManager, claim: Claim, result: dict) -> bool:
    """One fenced commit; True also when an earlier try of ours got through but its reply was lost.

    A task Qlib submitted gets its run's Recorder in ``res`` (:func:`qlib_recorder`), as Qlib's
    ``run_task(task_train, ...)`` commits it, so ``TrainerRM.train`` finds it there.
    """
    res = qlib_recorder(result) if result.get(Outcome.QLIB_RECORDER) else None
    if tm.commit(claim, result, res=res):
        return True
    status, run_id = tm.committed_run(claim.id)
    return status == TaskStatus.DONE.value and run_id == result.get(Outcome.RUN_ID)


def qlib_recorder(result: dict) -> Any:
    """Qlib's ``MLflowRecorder`` of the result's run, as ``task_train`` returns it (status FINISHED: the
    attempt ends the run FINISHED right after the commit, or the reaper does).

    Raises:
        Exception: whatever MLflow raises while reading the run (the store-outage path retries the commit).
    """
    from qlib.workflow.recorder import MLflowRecorder

    uri = result[Outcome.TRACKING_URI]
    run = _client(uri).get_run(result[Outcome.RUN_ID])
    recorder = MLflowRecorder(result[Outcome.EXPERIMENT_ID], uri, mlflow_run=run)
    recorder.status = RunStatus.FINISHED.value
    return recorder


def replay(worker: Worker, item: Spooled) -> None:
    """Commit a result spooled by a dead worker of this host, then end its run (FINISHED or KILLED)."""
    from qlib_ext.worker import spool

    ok = commit_once(worker.tm, item.claim, item.result)
    spool.remove(item.path)
    logger.warning("worker %s: replayed spooled result of task %s: %s", os.getpid(), item.claim.id,
                   f"committed task {item.claim.id}" if ok else "refused (task taken over)")
    Attempt(worker, item.claim, run_id=item.result.get(Outcome.RUN_ID)).settle(ok, EndReason.SPOOL_REFUSED)


# ---------------------------------------------------------------------- the run
def open_run(mlflow_uri: str, task: dict, task_id: str, worker: str, attempt: int, device: str | None = None, *,
             experiment: str | None = None, pool: str | None = None, provider_uri: str | None = None,
             resume: str | None = None) -> str:
    """Create the attempt's MLflow run, RUNNING, and return its id.

    ``experiment`` and ``pool`` name the experiment and the pool of a task without a ``qlib_ext`` block
    (one Qlib submitted); a block's own win. ``resume``: the run to reopen instead (``DelayTrainerRM``'s
    second stage, in the run ``begin_task_train`` made: :func:`qlib_ext.worker.delayed.reopen`).

    The run is born with all its tags in one call (MLflow's context tags, qlib-ext's, the grid nesting, the
    worker's ``device`` when it was given GPUs), so the reaper never sees it half tagged; its params follow in
    batches of 100, then the task's dataset input on the data at ``provider_uri``
    (:mod:`qlib_ext.tracking.datasets`; None: no dataset input).

    Raises:
        Exception: whatever MLflow raises (classified by :mod:`qlib_ext.worker.faults`: MLflow away is an
            infrastructure fault).
    """
    from mlflow.entities import Param
    from mlflow.tracking.context.registry import resolve_tags

    from qlib_ext.tracking import mlflow_ui
    from qlib_ext.tracking.datasets import log_dataset
    from qlib_ext.worker.body import mlflow_tags

    meta = TaskMeta.of(task)
    client = _client(mlflow_uri)
    experiment_id = _experiment_id(mlflow_uri, meta.experiment or experiment or "workflow")
    ui_tags, params = mlflow_ui.run_decoration(client, experiment_id, task, task_id)
    tags = mlflow_tags(task, task_id, worker, attempt)
    tags[Tag.POOL] = str(meta.pool or pool or "")
    device_tag = {Tag.DEVICE: device} if device else {}
    tags = resolve_tags({**tags, **ui_tags, **device_tag})
    if resume is None:
        run_id = client.create_run(experiment_id, run_name=meta.run_name, tags=tags).info.run_id
    else:
        from qlib_ext.worker.delayed import reopen

        run_id = reopen(client, resume, tags)
    batch = [Param(k, str(v)) for k, v in params.items()]
    try:
        for i in range(0, len(batch), 100):
            client.log_batch(run_id, params=batch[i:i + 100])
        if provider_uri:
            log_dataset(client, run_id, task, provider_uri, data_identity(provider_uri))
    except Exception:
        with contextlib.suppress(Exception):  # best effort: the error that matters is the one raised
            end_run(client, run_id, RunStatus.FAILED)
        raise
    return run_id


def run_outside_pool(settings: WorkerSettings, task: dict, task_id: str) -> dict:
    """Run ``task`` in a run of its own outside any pool (``qlib-ext reproduce``); return its result.

    No claim and no commit: the run ends FINISHED when the body returns, FAILED when it raises. Must run
    where ``qlib.init`` was called as in a worker (:func:`qlib_ext.worker.loop.init_qlib`).
    """
    from qlib_ext.worker.body import run_grid_task

    run_id = open_run(settings.mlflow_uri, task, task_id, "reproduce", 0, settings.provider_uri)
    try:
        result = run_grid_task(task, run_id, cache_dir=settings.cache_dir, fast_backtest=settings.fast_backtest)
    except BaseException:
        end_run(_client(settings.mlflow_uri), run_id, RunStatus.FAILED)
        raise
    end_run(_client(settings.mlflow_uri), run_id, RunStatus.FINISHED)
    return result


def data_identity(provider_uri: str) -> dict:
    """The identity of the data at ``provider_uri`` (:func:`qlib_ext.worker.settings.data_identity`), read once
    per process: a worker's data does not change under it (``check_worker_data`` refuses a host whose does)."""
    from qlib_ext.worker.settings import data_identity as read

    if provider_uri not in _identities:
        _identities[provider_uri] = read(provider_uri)
    return _identities[provider_uri]


def _client(mlflow_uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=mlflow_uri)


def _experiment_id(mlflow_uri: str, name: str) -> str:
    """The id of experiment ``name``, created beside the tracking DB if missing (cached per process)."""
    from qlib_ext.tracking.experiment import ensure_experiment

    key = (mlflow_uri, name)
    if key not in _experiments:
        _experiments[key] = ensure_experiment(mlflow_uri, name)
    return _experiments[key]
