"""One worker process draining a pool: claim under a lease, run the task, commit under fencing.

Each worker is a separate OS process (not a thread: Qlib's data handling and backtests hold the
GIL) that initialises Qlib once and then runs tasks until the pool is finished. The loop never
dies on a task error or a store outage (huey's ``Worker.loop``); :mod:`qlib_ext.worker.group` starts N
workers and restarts dead ones.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from qlib_ext import defaults
from qlib_ext.errors import StoreError, TaskDecodeError
from qlib_ext.pool.manager import Claim
from qlib_ext.pool.record import Outcome
from qlib_ext.pool.status import TaskStatus
from qlib_ext.worker.settings import THREAD_ENV_VARS, WorkerSettings, limit_threads
from qlib_ext.worker.timeouts import ChildProcessTask, ChildTaskFailed, InProcessTask, TaskInterrupted, TaskTimeout

logger = logging.getLogger(__name__)

STORE_ERRORS = (PyMongoError, StoreError)
"""What an unreachable store raises: retried with back-off, never fatal."""
def worker_main(settings: WorkerSettings) -> None:
    """Entry point of one worker process: configure threads and Qlib, then drain the pool."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(settings.threads)
    if settings.log_dir:
        _redirect_output(Path(settings.log_dir))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = _install_stop_handlers(settings.grace_seconds)
    _init_qlib(settings)
    n = Worker(settings, stop).loop()
    logger.info("worker %s: exiting after %d tasks", os.getpid(), n)


def _redirect_output(log_dir: Path) -> None:
    """Send this process's stdout/stderr (file descriptors too, for LightGBM's C++ output) to a log
    file: Qlib prints its analysis tables, and N workers printing over a progress line is noise."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir / f"worker-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _init_qlib(settings: WorkerSettings) -> None:
    import qlib

    exp_manager = {"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                   "kwargs": {"uri": settings.mlflow_uri, "default_exp_name": "Experiment"}}
    kwargs = {"kernels": settings.threads, "logging_level": settings.log_level, **settings.qlib_kwargs}
    qlib.init(provider_uri=settings.provider_uri, region=settings.region, exp_manager=exp_manager,
              mongo={"task_url": settings.mongo_url, "task_db_name": settings.db_name}, **kwargs)


class StopState:
    """Set by SIGTERM/SIGINT: stop claiming; interrupt the running task once its grace period is over."""

    def __init__(self, grace_seconds: float):
        self.event = threading.Event()
        self.grace = grace_seconds
        self._runner: Any = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def request(self, signum: int, _frame: object) -> None:
        """Signal handler: the first signal starts the graceful stop; later ones change nothing."""
        if self.event.is_set():
            return
        logger.warning("worker %s: got signal %s; no new tasks, current one gets %.0fs", os.getpid(), signum,
                       self.grace)
        self.event.set()
        self._arm()

    def task_started(self, runner: Any) -> None:
        """The worker runs a task through ``runner``; a stop already requested starts its grace now."""
        with self._lock:
            self._runner = runner
        if self.event.is_set():
            self._arm()

    def task_ended(self) -> None:
        with self._lock:
            self._runner = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm(self) -> None:
        with self._lock:
            if self._runner is None or self._timer is not None:
                return
            self._timer = threading.Timer(self.grace, self._runner.interrupt, ("worker stopped",))
            self._timer.daemon = True
            self._timer.start()


def _install_stop_handlers(grace_seconds: float) -> StopState:
    state = StopState(grace_seconds)
    signal.signal(signal.SIGTERM, state.request)
    signal.signal(signal.SIGINT, state.request)
    return state


def task_db(settings: WorkerSettings) -> Any:
    """The pool's database through a worker's client (:func:`qlib_ext.pool.manager.open_db`, ``worker=True``):
    an unreachable store fails fast, and the loop retries with its own back-off."""
    from qlib_ext.pool.manager import open_db

    return open_db(settings.mongo_url, settings.db_name, worker=True)


# ---------------------------------------------------------------------- the loop
class Worker:
    """The loop of one worker process. One iteration claims and runs at most one task; neither a
    task's error nor an unreachable store ends the loop."""

    def __init__(self, settings: WorkerSettings, stop: StopState):
        from qlib_ext.pool.manager import GridTaskManager

        self.s = settings
        self.stop = stop
        self.tm = GridTaskManager(settings.pool, task_db(settings), migrate=False)
        self._backoff = defaults.POLL_MIN_SECONDS
        self._outage = False
        self._unreaped: set[Any] = set()  # tasks whose dead runs MLflow could not end yet (retried each step)
        if settings.task_timeout:
            _warm_up(settings.mlflow_uri)

    def loop(self) -> int:
        """Run until stopped or the pool is finished; return the number of tasks run."""
        while self.s.start_after and not os.path.exists(self.s.start_after) and not self.stop.event.is_set():
            self.stop.event.wait(0.1)
        n = 0
        while not self.stop.event.is_set():
            try:
                ran = self.step()
            except STORE_ERRORS as e:
                self._outage = True
                logger.warning("worker %s: task store unreachable (%s); retrying in %.1fs", os.getpid(), e,
                               self._backoff)
                ran = None
            except Exception:  # noqa: BLE001 - the loop never dies (huey): log, back off, go on
                logger.exception("worker %s: unexpected error in the worker loop; retrying in %.1fs", os.getpid(),
                                 self._backoff)
                ran = None
            else:
                if self._outage:
                    logger.warning("worker %s: task store reachable again", os.getpid())
                    self._outage = False
            if ran is False:
                break
            if ran:
                n += 1
                self._backoff = defaults.POLL_MIN_SECONDS
            else:
                self.stop.event.wait(self._backoff)
                cap = defaults.OUTAGE_MAX_SECONDS if self._outage else defaults.POLL_MAX_SECONDS
                self._backoff = min(self._backoff * 2, cap)
        self._reap(None)
        return n

    def step(self) -> bool | None:
        """True: ran a task. None: nothing to claim yet. False: the pool is finished for us."""
        if not self.tm.migrated:
            self.tm.migrate()
        self._replay_spool()
        if self._unreaped:
            self._reap(list(self._unreaped))
        recovered = self.tm.reclaim_expired(self.s.max_attempts)
        if recovered:
            self._reap([c.id for c in recovered])
        try:
            claim = self.tm.claim(self.s.lease_seconds)
        except TaskDecodeError as e:  # claimed, but its def/res is not plain data: fail it, go on
            self._rejected(e.claim, f"{type(e).__name__}: {e}")
            return True
        if claim is None:
            finished = self.s.exit_when_idle or self.tm.unfinished() == 0
            return False if finished else None
        self.run_claimed(claim)
        return True

    def run_claimed(self, claim: Claim) -> None:
        """Run one claimed task under a heartbeat; commit its result or record why it did not finish."""
        from qlib_ext.worker.body import run_grid_task
        from qlib_ext.worker.heartbeat import HeartbeatThread

        runner = ChildProcessTask(self.s.task_timeout) if self.s.task_timeout else InProcessTask()
        logger.info("worker %s: claimed task %s (attempt %d)", claim.worker, claim.id, claim.attempt)
        self.stop.task_started(runner)
        try:
            task = self._checked(claim)
            with HeartbeatThread(self.tm, claim, self.s.lease_seconds, self.s.heartbeat_seconds,
                                 on_lost=lambda: runner.interrupt("lease lost")):
                result = runner.run(run_grid_task, task, task_id=str(claim.id), worker=claim.worker,
                                    attempt=claim.attempt, cache_dir=self.s.cache_dir,
                                    fast_backtest=self.s.fast_backtest)
        except TaskInterrupted as e:
            self._interrupted(claim, e.reason)
            return
        except Exception as e:  # noqa: BLE001 - any task error is recorded on the task, never fatal
            self._failed(claim, e)
            return
        finally:
            self.stop.task_ended()
        try:
            if not self._queue_follow_up(claim, task, result):
                return
        except STORE_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a sweep point that does not expand: the task's failure
            self._failed(claim, e)
            return
        self._commit(claim, result)

    def _queue_follow_up(self, claim: Claim, task: dict, result: dict) -> bool:
        """Queue a train-once training task's backtests before it commits (never a finished-looking pool
        in between); False when the lease was lost, and the run is discarded."""
        from qlib_ext.worker.follow_up import backtest_tasks, enqueue

        backtests = backtest_tasks(task, result[Outcome.RUN_ID], claim.id)
        if backtests and not enqueue(self.tm, claim, backtests, self.s.lease_seconds):
            self._discard(result, "lease lost before its backtests were queued")
            return False
        return True

    # ------------------------------------------------------------------ outcomes
    def _interrupted(self, claim: Claim, reason: str) -> None:
        if reason == "lease lost":
            logger.warning("worker %s: lease on task %s lost (reclaimed or cancelled); task abandoned",
                           claim.worker, claim.id)
        else:
            logger.warning("worker %s: task %s interrupted (%s); handing it back", claim.worker, claim.id, reason)
            self._store(lambda: self.tm.fail(claim, reason, count_attempt=False))
        self._reap([claim.id])

    def _checked(self, claim: Claim) -> dict:
        """The claimed task's definition, checked before anything of it is imported: its shape, then
        the allow-list of modules; with LightGBM's threads pinned."""
        from qlib_ext.pool.allowlist import check_modules
        from qlib_ext.pool.codec import check_shape

        task = check_shape(claim.task.get("def"), claim.id)
        check_modules(task, tuple(self.s.allowed_modules))
        return limit_threads(task, self.s.threads)

    def _rejected(self, claim: Claim, error: str) -> None:
        """Fail a task that can never succeed as written, now, without using its other attempts."""
        logger.error("worker %s: task %s rejected: %s", claim.worker, claim.id, error.strip().splitlines()[-1])
        status = self._store(lambda: self.tm.fail(claim, error, max_attempts=claim.attempt))
        logger.warning("worker %s: task %s -> %s", claim.worker, claim.id, status or "(lease lost)")
        self._reap([claim.id])

    def _infra(self, claim: Claim, error: str) -> bool:
        """Hand a task back without using an attempt after a fault outside it (MLflow, store, disk), then
        back off; False once the task has had ``INFRA_RETRIES`` such retries (it then counts as an attempt)."""
        retries = int(claim.task.get("infra_retries") or 0)
        if retries >= defaults.INFRA_RETRIES:
            return False
        cause = error.strip().splitlines()[-1]
        delay = min(defaults.INFRA_BACKOFF_SECONDS * 2 ** retries, defaults.OUTAGE_MAX_SECONDS)
        logger.error("worker %s: task %s hit an infrastructure fault (%s); handed back without using an attempt "
                     "(%d of %d), backing off %.1fs", claim.worker, claim.id, cause, retries + 1,
                     defaults.INFRA_RETRIES, delay)
        self._store(lambda: self.tm.fail(claim, error, count_attempt=False, infra=True))
        self._reap([claim.id])
        self.stop.event.wait(delay)
        return True

    def _failed(self, claim: Claim, exc: Exception) -> None:
        from qlib_ext.worker.faults import INFRA, REJECTED, classify, describe

        if isinstance(exc, ChildTaskFailed):
            error, kind = str(exc), exc.kind
        elif isinstance(exc, TaskTimeout):
            error, kind = f"TaskTimeout: {exc}", None
        else:
            error, kind = describe(exc), classify(exc)
        if kind == REJECTED:
            self._rejected(claim, error)
            return
        if kind == INFRA and self._infra(claim, error):
            return
        logger.error("worker %s: task %s failed (attempt %d): %s", claim.worker, claim.id, claim.attempt,
                     error.strip().splitlines()[-1] if error.strip() else exc)
        status = self._store(lambda: self.tm.fail(claim, error, max_attempts=self.s.max_attempts))
        logger.warning("worker %s: task %s -> %s", claim.worker, claim.id, status or "(lease lost)")
        self._reap([claim.id])

    def _commit(self, claim: Claim, result: dict) -> None:
        """Commit under fencing; while the store is away, keep the result spooled on local disk."""
        from qlib_ext.worker import spool as spool

        try:
            ok = self._commit_once(claim, result)
        except STORE_ERRORS as e:
            path = spool.write(self.s.pool, claim, result)
            logger.warning("worker %s: cannot commit task %s (%s); result spooled to %s", claim.worker, claim.id,
                           e, path)
            ok = self._store(lambda: self._commit_once(claim, result), give_up_on_stop=False)
            if ok is None:
                return  # stopped while the store is away: the next worker here replays the spool
            spool.remove(path)
        if ok:
            logger.info("worker %s: committed task %s (attempt %d, run %s)", claim.worker, claim.id, claim.attempt,
                        result.get("run_id"))
        else:
            self._discard(result, "lease lost before commit")

    def _commit_once(self, claim: Claim, result: dict) -> bool:
        """One fenced commit; True also when an earlier try of ours got through but its reply was lost."""
        if self.tm.commit(claim, result):
            return True
        status, run_id = self.tm.committed_run(claim.id)
        return status == TaskStatus.DONE.value and run_id == result.get(Outcome.RUN_ID)

    def _discard(self, result: dict, reason: str) -> None:
        from qlib_ext.tracking.reaper import end_run

        try:
            end_run(self.s.mlflow_uri, result["run_id"], reason)
        except Exception:  # noqa: BLE001 - the reaper ends it later
            logger.exception("worker %s: could not end discarded run %s", os.getpid(), result.get("run_id"))

    def _replay_spool(self) -> None:
        """Commit results spooled by dead workers of this host (a live one is still retrying its own)."""
        from qlib_ext.worker import spool as spool

        for item in spool.pending(self.s.pool):
            if _owner_alive(item.claim.worker):
                continue
            ok = self._commit_once(item.claim, item.result)
            spool.remove(item.path)
            logger.warning("worker %s: replayed spooled result of task %s: %s", os.getpid(), item.claim.id,
                           f"committed task {item.claim.id}" if ok else "refused (task taken over)")
            if not ok:
                self._discard(item.result, "spooled result refused: task taken over")

    def _reap(self, task_ids: list[Any] | None) -> None:
        from qlib_ext.tracking.reaper import reap_runs

        try:
            reap_runs(self.tm, self.s.mlflow_uri, task_ids)
        except Exception as e:  # noqa: BLE001 - ghost runs are cosmetic; never stop the worker for them
            logger.warning("worker %s: could not end stale MLflow runs (%s); retrying later", os.getpid(), e)
            self._unreaped.update(task_ids or [])  # MLflow away: end them once it answers (no RUNNING ghosts)
        else:
            self._unreaped.difference_update(task_ids or [])

    def _store(self, op: Callable[[], Any], give_up_on_stop: bool = True) -> Any:
        """Retry a store write with capped back-off. When stopping, give up after a few tries (the
        lease then expires and lease recovery gets the task back); returns None when it gave up."""
        delay, tries = defaults.POLL_MIN_SECONDS, 0
        while True:
            try:
                return op()
            except STORE_ERRORS as e:
                tries += 1
                if self.stop.event.is_set() and (give_up_on_stop or tries >= 3):
                    logger.warning("worker %s: store unreachable while stopping (%s); giving up", os.getpid(), e)
                    return None
                logger.warning("worker %s: store write failed (%s); retrying in %.1fs", os.getpid(), e, delay)
                time.sleep(delay)
                delay = min(delay * 2, defaults.OUTAGE_MAX_SECONDS)


def _warm_up(mlflow_uri: str) -> None:
    """Do once, before the first fork, what every task child would otherwise redo (seconds each):
    import Qlib's record and backtest modules, and open MLflow's tracking store (schema checks)."""
    import mlflow
    import qlib.workflow.record_temp  # noqa: F401

    import qlib_ext.worker.body  # noqa: F401

    try:
        mlflow.MlflowClient(tracking_uri=mlflow_uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - an unreachable tracking server is the task's problem
        logger.warning("worker %s: MLflow warm-up failed (%s)", os.getpid(), e)


def _owner_alive(worker: str) -> bool:
    """Whether ``host:pid`` is a live process on this host other than us."""
    import socket

    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
