"""One worker process draining a pool: replay spooled results, recover the tasks of dead workers (this host's at
once, any host's once their lease expired), claim, run.

Each worker is a separate OS process (not a thread: Qlib's data handling and backtests hold the
GIL) that initialises Qlib once and then runs tasks until the pool is finished. What happens to one
claimed task, up to the end of its MLflow run, is :class:`qlib_ext.worker.attempt.Attempt`. The loop never
dies on a task error or a store outage (huey's ``Worker.loop``); :mod:`qlib_ext.worker.group` starts N
workers and restarts dead ones.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import TaskDecodeError
from qlib_ext.pool.status import EndReason
from qlib_ext.tables import log_to_terminal
from qlib_ext.worker.attempt import STORE_ERRORS, Attempt
from qlib_ext.worker.settings import THREAD_ENV_VARS, WorkerSettings

logger = logging.getLogger(__name__)


def worker_main(settings: WorkerSettings) -> None:
    """Entry point of one worker process: its device, threads and Qlib, then drain the pool."""
    from qlib_ext.worker import gpus

    gpus.isolate(settings.device, settings.gpus)  # before anything imports torch
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(settings.threads)
    if settings.log_dir:
        _redirect_output(Path(settings.log_dir))
    log_to_terminal(settings.log_level)  # control characters in pool data escaped
    stop = _install_stop_handlers(settings.grace_seconds)
    init_qlib(settings)
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


def init_qlib(settings: WorkerSettings) -> None:
    """``qlib.init`` as a worker does it: the pool's data and region, MLflow at the pool's tracking URI; the
    task's own child processes started as under ``qrun`` (:func:`start_children_as_qrun`)."""
    import qlib

    start_children_as_qrun()

    exp_manager = {"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                   "kwargs": {"uri": settings.mlflow_uri, "default_exp_name": "Experiment"}}
    kwargs = {"kernels": settings.threads, "logging_level": settings.log_level, **settings.qlib_kwargs}
    qlib.init(provider_uri=settings.provider_uri, region=settings.region, exp_manager=exp_manager,
              mongo={"task_url": settings.mongo_url, "task_db_name": settings.db_name}, **kwargs)
    system_metrics(socket.gethostname())


def system_metrics(node_id: str) -> None:
    """Turn on MLflow's system metrics for every run this process starts (Qlib's recorder starts each task's),
    sampled every ``SYSTEM_METRICS_SECONDS`` (env ``QLIB_EXT_SYSTEM_METRICS_SECONDS``; 0: off), logged under
    ``system/<node_id>/``: the worker's host, so runs from several hosts stay apart."""
    import mlflow

    seconds = float(os.environ.get("QLIB_EXT_SYSTEM_METRICS_SECONDS", defaults.SYSTEM_METRICS_SECONDS))
    if seconds <= 0:
        mlflow.disable_system_metrics_logging()
        return
    mlflow.enable_system_metrics_logging()
    mlflow.set_system_metrics_sampling_interval(seconds)
    mlflow.set_system_metrics_node_id(node_id)


def start_children_as_qrun() -> None:
    """Give this process the platform's default start method (fork on Linux), as a plain ``qrun`` has.

    Workers, the cache warmer and ``reproduce`` are started by spawn (a fresh interpreter, nothing of the
    parent's threads or clients), and a spawned process inherits ``spawn`` as its own default: every
    ``DataLoader(num_workers=n)`` of a PyTorch model and every joblib pool of Qlib's then started fresh
    interpreters that import torch and Qlib again (seconds and ~700 MB each, per loader and epoch; Qlib's
    GRU benchmark ran 5-18x slower than under ``qrun``). Resetting it makes them fork from the task again.
    """
    import multiprocessing as mp

    mp.set_start_method(None, force=True)


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
        if self._runner is None:  # idle (the pool finished: WorkerGroup.finish), nothing to hand back
            logger.info("worker %s: got signal %s while idle; exiting", os.getpid(), signum)
        else:
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
            self._timer = threading.Timer(self.grace, self._runner.interrupt, (EndReason.WORKER_STOPPED,))
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
        from qlib_ext.pool.status import Trainer
        from qlib_ext.worker import gpus

        self.s = settings
        self.trainer = Trainer(settings.trainer)  # what it claims: waiting (TrainerRM's), part_done (DelayTrainerRM's)
        self.device = gpus.label(settings.device, settings.gpus)  # "cuda:N", "cpu" or None (no GPUs configured)
        self.stop = stop
        self.tm = GridTaskManager(settings.pool, task_db(settings), migrate=False)
        self._backoff = defaults.POLL_MIN_SECONDS
        self._outage = False
        self.unreaped: set[Any] = set()  # tasks whose runs MLflow could not end yet (the reaper retries each step)
        if settings.task_timeout:
            _warm_up(settings.mlflow_uri)

    def loop(self) -> int:
        """Run until stopped or the pool is finished; return the number of tasks run."""
        while self.s.start_after and not os.path.exists(self.s.start_after) and not self.stop.event.is_set():
            self.stop.event.wait(defaults.START_AFTER_POLL_SECONDS)
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
        if self.unreaped:
            self._reap(list(self.unreaped))
        recovered = self.tm.reclaim_orphaned(self.s.max_attempts) + self.tm.reclaim_expired(self.s.max_attempts)
        if recovered:
            self._reap([c.id for c in recovered])  # their workers died or lost them: end their runs
        try:
            claim = self.tm.claim(self.s.lease_seconds, device=self.device, status=self.trainer.claims)
        except TaskDecodeError as e:  # claimed, but its def/res is not plain data: fail it, go on
            Attempt(self, e.claim).reject(f"{type(e).__name__}: {e}")
            return True
        if claim is None:
            finished = self.s.exit_when_idle or self.tm.unfinished(self.trainer.pending) == 0
            return False if finished else None
        Attempt(self, claim).run()
        return True

    def _replay_spool(self) -> None:
        """Commit results spooled by dead workers of this host (a live one is still retrying its own)."""
        from qlib_ext.worker import spool
        from qlib_ext.worker.attempt import replay

        for item in spool.pending(self.s.pool):
            if not _owner_alive(item.claim.worker):
                replay(self, item)

    def _reap(self, task_ids: list[Any] | None) -> None:
        from qlib_ext.tracking.reaper import reap_runs

        try:
            reap_runs(self.tm, self.s.mlflow_uri, task_ids)
        except Exception as e:  # noqa: BLE001 - ghost runs are cosmetic; never stop the worker for them
            logger.warning("worker %s: could not end stale MLflow runs (%s); retrying later", os.getpid(), e)
            self.unreaped.update(task_ids or [])  # MLflow away: end them once it answers (no RUNNING ghosts)
        else:
            self.unreaped.difference_update(task_ids or [])

    def store_retry(self, op: Callable[[], Any], give_up_on_stop: bool = True) -> Any:
        """Retry a store write with capped back-off. When stopping, give up after a few tries (the
        lease then expires and lease recovery gets the task back); returns None when it gave up."""
        delay, tries = defaults.POLL_MIN_SECONDS, 0
        while True:
            try:
                return op()
            except STORE_ERRORS as e:
                tries += 1
                if self.stop.event.is_set() and (give_up_on_stop or tries >= defaults.STOP_STORE_TRIES):
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

    from qlib_ext.pool.worker_name import split_worker

    host, pid = split_worker(worker)
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
