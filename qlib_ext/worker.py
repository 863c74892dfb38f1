"""Worker processes that drain a pool: claim under a lease, run the task, commit under fencing.

Each worker is a separate OS process (not a thread: Qlib's data handling and backtests hold the
GIL) that initialises Qlib once and then runs tasks until the pool is finished. A parent process
starts N of them, forwards Ctrl-C/SIGTERM and restarts a worker that died while work remained.
"""

from __future__ import annotations

import _thread
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

from pymongo.errors import PyMongoError

from qlib_ext import defaults

logger = logging.getLogger(__name__)

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
"""Thread-pool sizes set in each worker so that workers x threads stays within the cores."""


@dataclass
class WorkerSettings:
    """Everything a worker process needs; plain data so it crosses the process boundary."""

    pool: str
    mongo_url: str  # resolved MongoDB URL (never "embedded": the parent resolves it)
    mlflow_uri: str  # MLflow tracking URI (sqlite:///... or http://...)
    provider_uri: str  # Qlib data directory
    region: str = "cn"  # Qlib region of the data
    db_name: str = defaults.TASK_DB_NAME  # MongoDB database holding the pools
    lease_seconds: float = defaults.LEASE_SECONDS  # lease length, s
    heartbeat_seconds: float = defaults.HEARTBEAT_SECONDS  # lease renewal interval, s
    grace_seconds: float = defaults.GRACE_SECONDS  # time a running task gets after SIGTERM, s
    threads: int = 1  # threads per worker for LightGBM / OpenMP / BLAS
    exit_when_idle: bool = False  # exit as soon as nothing is waiting (else: when nothing is unfinished)
    cache_dir: str | None = None  # shared prepared-dataset cache directory (None: no cache)
    log_level: int = logging.WARNING  # level of the worker's log output
    qlib_kwargs: dict = field(default_factory=dict)  # further qlib.init arguments from the workflow


def auto_threads(workers: int, cores: int | None = None) -> int:
    """Threads per worker so that ``workers * threads <= cores`` (at least 1)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


def limit_threads(task: dict, threads: int) -> dict:
    """Pin LightGBM's ``num_threads`` in the task's model kwargs unless the workflow set it."""
    model = task.get("model", {})
    if "LGB" in str(model.get("class", "")):
        kwargs = model.setdefault("kwargs", {})
        if "num_threads" not in kwargs and "n_jobs" not in kwargs:
            kwargs["num_threads"] = threads
    return task


# ---------------------------------------------------------------------- inside a worker process
def worker_main(settings: WorkerSettings) -> None:
    """Entry point of one worker process: configure threads and Qlib, then drain the pool."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(settings.threads)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = _install_stop_handlers(settings.grace_seconds)
    _init_qlib(settings)
    n = Worker(settings, stop).loop()
    logger.info("worker %s: exiting after %d tasks", os.getpid(), n)


def _init_qlib(settings: WorkerSettings) -> None:
    import qlib

    exp_manager = {"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                   "kwargs": {"uri": settings.mlflow_uri, "default_exp_name": "Experiment"}}
    kwargs = {"kernels": settings.threads, "logging_level": settings.log_level, **settings.qlib_kwargs}
    qlib.init(provider_uri=settings.provider_uri, region=settings.region, exp_manager=exp_manager,
              mongo={"task_url": settings.mongo_url, "task_db_name": settings.db_name}, **kwargs)


class _StopState:
    """Set by SIGTERM/SIGINT: stop claiming; interrupt a running task once its grace period is over."""

    def __init__(self, grace_seconds: float):
        self.event = threading.Event()
        self.grace = grace_seconds
        self.task_running = False
        self._timer: threading.Timer | None = None

    def request(self, signum: int, _frame: object) -> None:
        if self.event.is_set():
            return
        logger.warning("worker %s: got signal %s; finishing current task (grace %.0fs)", os.getpid(),
                       signum, self.grace)
        self.event.set()
        if self.task_running:
            self._timer = threading.Timer(self.grace, _thread.interrupt_main)
            self._timer.daemon = True
            self._timer.start()


def _install_stop_handlers(grace_seconds: float) -> _StopState:
    state = _StopState(grace_seconds)
    signal.signal(signal.SIGTERM, state.request)
    signal.signal(signal.SIGINT, state.request)
    return state


class Worker:
    """The loop of one worker process. One iteration claims and runs at most one task; a task's
    error is recorded on the task and never ends the loop."""

    def __init__(self, settings: WorkerSettings, stop: _StopState):
        from qlib_ext.queue import GridTaskManager

        self.s = settings
        self.stop = stop
        self.tm = GridTaskManager(settings.pool)
        self._backoff = defaults.POLL_MIN_SECONDS

    def loop(self) -> int:
        """Run until stopped or the pool is finished; return the number of tasks run."""
        n = 0
        while not self.stop.event.is_set():
            try:
                ran = self.step()
            except PyMongoError as e:
                logger.warning("worker %s: task store unreachable (%s); retrying in %.1fs", os.getpid(), e,
                               self._backoff)
                ran = None
            if ran is False:
                return n
            if ran:
                n += 1
                self._backoff = defaults.POLL_MIN_SECONDS
            else:
                self.stop.event.wait(self._backoff)
                self._backoff = min(self._backoff * 2, defaults.POLL_MAX_SECONDS)
        return n

    def step(self) -> bool | None:
        """True: ran a task. None: nothing to claim yet. False: the pool is finished for us."""
        self.tm.recover_expired()
        claim = self.tm.claim(self.s.lease_seconds)
        if claim is None:
            finished = self.s.exit_when_idle or self.tm.unfinished() == 0
            return False if finished else None
        self.run_claimed(claim)
        return True

    def run_claimed(self, claim) -> None:
        """Run one claimed task under a heartbeat; commit its result or record its failure."""
        from qlib_ext.heartbeat import HeartbeatThread
        from qlib_ext.tasks import run_grid_task

        task = limit_threads(claim.task["def"], self.s.threads)
        logger.info("worker %s: claimed task %s (attempt %d)", claim.worker, claim.id, claim.attempt)
        self.stop.task_running = True
        try:
            with HeartbeatThread(self.tm, claim, self.s.lease_seconds, self.s.heartbeat_seconds):
                result = run_grid_task(task, task_id=str(claim.id), worker=claim.worker, attempt=claim.attempt,
                                       cache_dir=self.s.cache_dir)
        except KeyboardInterrupt:
            logger.warning("worker %s: task %s interrupted; handing it back", claim.worker, claim.id)
            self._retry_store(lambda: self.tm.fail(claim, "worker stopped", count_attempt=False))
            return
        except Exception:
            logger.exception("worker %s: task %s failed (attempt %d)", claim.worker, claim.id, claim.attempt)
            error = traceback.format_exc()
            self._retry_store(lambda: self.tm.fail(claim, error))
            return
        finally:
            self.stop.task_running = False
        self._retry_store(lambda: self.tm.commit(claim, result))

    def _retry_store(self, op):
        """Retry a store write with capped back-off: a finished result must not be lost to an outage."""
        delay = defaults.POLL_MIN_SECONDS
        while True:
            try:
                return op()
            except PyMongoError as e:
                logger.warning("worker %s: store write failed (%s); retrying in %.1fs", os.getpid(), e, delay)
                time.sleep(delay)
                delay = min(delay * 2, defaults.POLL_MAX_SECONDS)


# ---------------------------------------------------------------------- the parent
class WorkerGroup:
    """N worker processes started from this (parent) process.

    ``poll()`` restarts a worker that died (crash, OOM kill) while the pool still has unfinished
    tasks, up to ``max_restarts`` times per slot; the dead worker's task comes back when its lease
    expires. ``stop()`` asks every worker to finish its task (SIGTERM, grace period) and exit.
    """

    def __init__(self, settings: WorkerSettings, n: int, max_restarts: int = 3):
        self.settings, self.n, self.max_restarts = settings, n, max_restarts
        self._ctx = mp.get_context("spawn")
        self.procs: list[mp.Process] = []
        self._restarts = [0] * n
        self.stopping = False

    def start(self) -> WorkerGroup:
        self.procs = [self._spawn() for _ in range(self.n)]
        return self

    def _spawn(self) -> mp.Process:
        proc = self._ctx.Process(target=worker_main, args=(WorkerSettings(**asdict(self.settings)),))
        proc.start()
        return proc

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def poll(self) -> None:
        for i, p in enumerate(self.procs):
            if p.exitcode in (None, 0) or self.stopping or self._restarts[i] >= self.max_restarts:
                continue
            if _pool_unfinished(self.settings):
                logger.warning("worker %s died (exit %s); restarting it", p.pid, p.exitcode)
                self._restarts[i] += 1
                self.procs[i] = self._spawn()

    def stop(self, *_args: object) -> None:
        self.stopping = True
        for p in self.procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    def exit_code(self) -> int:
        return 0 if all(p.exitcode == 0 for p in self.procs) else 1


def run_workers(settings: WorkerSettings, n: int, on_tick=None, tick_seconds: float = 1.0) -> int:
    """Run ``n`` workers until they exit; Ctrl-C/SIGTERM stops them gracefully. Returns 0 on a clean exit.

    ``on_tick()`` is called about every ``tick_seconds`` (the progress display of ``qlib-ext run``).
    """
    group = WorkerGroup(settings, n).start()
    old = {s: signal.signal(s, group.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while group.alive():
            time.sleep(tick_seconds)
            group.poll()
            if on_tick is not None:
                on_tick()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return group.exit_code()


def _pool_unfinished(settings: WorkerSettings) -> bool:
    from qlib_ext.queue import GridTaskManager, open_db

    try:
        return GridTaskManager(settings.pool, open_db(settings.mongo_url, settings.db_name)).unfinished() > 0
    except Exception:  # an unreachable store is no reason to stop restarting
        return True
