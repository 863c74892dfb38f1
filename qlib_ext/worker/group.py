"""A parent process running N local worker processes: start, restart the dead, stop gracefully."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess

from qlib_ext import defaults
from qlib_ext.worker.loop import worker_main
from qlib_ext.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


class WorkerGroup:
    """N worker processes started from this (parent) process. Not thread-safe; one owner.

    ``poll()`` restarts a worker that died (crash, OOM kill) while the pool still has unfinished
    tasks, up to ``max_restarts`` times per slot; the dead worker's task comes back when its lease
    expires. ``stop()`` asks every worker to finish its task (SIGTERM, grace period) and exit; a
    second ``stop()`` kills them (SIGKILL), for a user pressing Ctrl-C twice.
    """

    def __init__(self, settings: WorkerSettings, n: int, max_restarts: int = defaults.WORKER_RESTARTS):
        from qlib_ext.worker import gpus

        self.settings, self.n, self.max_restarts = settings, n, max_restarts
        self.devices = gpus.slots(settings.gpus, settings.workers_per_gpu, n)  # each slot's GPU, kept on restart
        self._ctx = mp.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self._restarts = [0] * n
        self.stopping = False
        self.finishing = False  # the pool is finished: idle workers were told to exit (finish())
        self.killed = False
        self.stop_signal: int | None = None  # the signal of the first stop(): SIGINT (Ctrl-C) or SIGTERM

    def start(self) -> WorkerGroup:
        # spawned interpreters read it at start-up: every worker sums a backtest in the same order
        os.environ.setdefault("PYTHONHASHSEED", defaults.PYTHON_HASH_SEED)
        self.procs = [self._spawn(i) for i in range(self.n)]
        return self

    def _spawn(self, slot: int) -> BaseProcess:
        settings = replace(self.settings, device=self.devices[slot])  # a copy per process
        proc = self._ctx.Process(target=worker_main, args=(settings,))
        proc.start()
        return proc

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def poll(self) -> None:
        """Restart workers that died with a non-zero exit code while work remains; their tasks are taken back
        now (:func:`take_back_orphans`), before the new worker has even imported Qlib."""
        died = [i for i, p in enumerate(self.procs) if p.exitcode not in (None, 0) and not self.stopping
                and self._restarts[i] < self.max_restarts]
        if died:
            take_back_orphans(self.settings)
        for i in died:
            p = self.procs[i]
            if _pool_unfinished(self.settings):
                logger.warning("worker %s died (exit %s); restarting it", p.pid, p.exitcode)
                self._restarts[i] += 1
                self.procs[i] = self._spawn(i)

    def stop(self, signum: int | None = None, _frame: object = None) -> None:
        """First call: SIGTERM every worker (graceful). Second call: SIGKILL them."""
        if not self.stopping:
            self.stop_signal = signum
        sig = signal.SIGKILL if self.stopping else signal.SIGTERM
        self.killed = self.stopping
        self.stopping = True
        for p in self.procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, sig)

    def finish(self) -> None:
        """The pool is finished (nothing waiting or running): end the workers still polling it now, rather than
        after their idle back-off (up to ``POLL_MAX_SECONDS``). SIGTERM, as :meth:`stop`; with no task running,
        each exits at once."""
        self.finishing = True
        for p in self.procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``; return early when a worker exits, once it can be reaped (its pipe closes a
        moment before its exit code exists: without the join, :meth:`poll` could miss a death and
        :meth:`alive` then see none alive, ending the run instead of restarting the worker)."""
        from multiprocessing.connection import wait

        ready = wait([p.sentinel for p in self.procs if p.exitcode is None], timeout=seconds)
        for p in self.procs:
            if p.sentinel in ready:
                p.join(defaults.CHILD_REAP_SECONDS)

    def exit_code(self) -> int:
        # after finish(), a worker still importing when told to end dies of the SIGTERM: it had nothing to do
        clean = (0, -signal.SIGTERM) if self.finishing else (0,)
        return 0 if all(p.exitcode in clean for p in self.procs) else 1


def run_workers(settings: WorkerSettings, n: int, on_tick: Callable[[], None] | None = None,
                tick_seconds: float = defaults.PROGRESS_TICK_SECONDS) -> int:
    """Run ``n`` workers until they exit; Ctrl-C/SIGTERM stops them gracefully. Returns 0 on a clean exit
    and after a graceful SIGTERM stop (every task was handed back or finished: what a supervisor such
    as systemd expects), 130 after Ctrl-C (SIGINT, as shells report it), 1 if a worker failed.

    ``on_tick()`` is called about every ``tick_seconds`` (the progress display of ``qlib-ext run``).
    """
    take_back_orphans(settings)
    group = WorkerGroup(settings, n).start()
    # signal.signal works in the main thread only; a run driven from another thread (a program's worker
    # thread, a notebook's executor) stops its workers by their own end instead
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, group.stop) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        while group.alive():
            group.wait(tick_seconds)
            group.poll()
            if on_tick is not None:
                on_tick()
            _finish_when_done(group)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if group.stopping:
        logger.warning("workers stopped%s", " (killed)" if group.killed else "; running tasks handed back")
    if group.stop_signal == signal.SIGINT:
        return EXIT_INTERRUPTED
    return group.exit_code()


def _finish_when_done(group: WorkerGroup) -> None:
    """Once a worker ended cleanly and the pool has nothing waiting or running, end the others (idle, polling):
    the run's summary need not wait out their back-off (issue 24)."""
    if group.stopping or group.finishing or not group.alive():
        return
    if any(p.exitcode == 0 for p in group.procs) and not _pool_unfinished(group.settings):
        group.finish()


def take_back_orphans(settings: WorkerSettings) -> None:
    """Before the workers start (their imports, the cache warm-up take a while): put back the tasks that dead
    workers of this host still hold (a run killed and started again) and end their runs, not after the lease."""
    from qlib_ext.pool.manager import GridTaskManager
    from qlib_ext.tracking.reaper import reap_runs
    from qlib_ext.worker.loop import task_db

    db = task_db(settings)
    try:
        tm = GridTaskManager(settings.pool, db, migrate=False)
        back = tm.reclaim_orphaned(settings.max_attempts)
        if back:
            logger.warning("pool %s: took back %d task(s) held by dead workers of this host (%s)", settings.pool,
                           len(back), ", ".join(sorted({str(c.worker) for c in back})))
            reap_runs(tm, settings.mlflow_uri, [c.id for c in back])
    except Exception as e:  # noqa: BLE001 - the workers recover them too, each step; never stop a run for it
        logger.warning("workers: could not take back the tasks of dead workers yet (%s: %s)", type(e).__name__, e)
    finally:
        db.client.close()


def _pool_unfinished(settings: WorkerSettings) -> bool:
    from qlib_ext.pool.manager import GridTaskManager
    from qlib_ext.pool.status import Trainer
    from qlib_ext.worker.loop import task_db

    db = task_db(settings)
    try:
        return GridTaskManager(settings.pool, db, migrate=False).unfinished(Trainer(settings.trainer).pending) > 0
    except Exception as e:  # noqa: BLE001 - an unreachable store is no reason to stop restarting
        logger.warning("workers: cannot count the unfinished tasks of pool %s (%s: %s); restarting the dead "
                       "worker anyway", settings.pool, type(e).__name__, e)
        return True
    finally:
        db.client.close()
