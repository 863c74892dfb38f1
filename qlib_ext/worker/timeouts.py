"""How a worker runs one task so that it can be stopped: in-process, or in a child with a time limit.

``ChildProcessTask`` is the death penalty (rq's ``timeouts.py``), except that the task dies, not the
worker: the task runs in a forked child; at the deadline, or when asked to, the parent sends SIGTERM
(the child stops, leaving its MLflow run RUNNING for the worker to end KILLED), then SIGKILL after
``kill_after`` seconds if the child ignores it (a hang in C code). ``InProcessTask`` runs the task in
the worker itself (no fork, cheaper) and can only be interrupted between Python bytecodes. Neither
ends the task's MLflow run: its attempt does (:mod:`qlib_ext.worker.attempt`).

Both raise :class:`TaskTimeout` or :class:`TaskInterrupted`; a task's own exception comes out as
itself (in-process) or as :class:`ChildTaskFailed` carrying the child's traceback text.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import ChildTaskFailed, TaskInterrupted, TaskTimeout
from qlib_ext.pool.status import EndReason

logger = logging.getLogger(__name__)

INTERRUPT_SIGNAL = signal.SIGUSR1
"""Signal that interrupts an in-process task (raised as an exception inside it)."""


class _Interrupt(KeyboardInterrupt):
    """Raised inside the task; a KeyboardInterrupt so that Qlib code does not swallow it (the task's
    body detaches its run on the way out; the worker ends it KILLED)."""


class InProcessTask:
    """Runs ``fn`` in the calling thread, which must be the main thread; ``interrupt`` may be called
    from any thread.

    The interrupt is SIGUSR1 sent to the main thread, whose handler raises inside the task: that
    wakes a sleeping or I/O-blocked task at once, while a long C call (a LightGBM fit) first
    finishes its current step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self.reason: str | None = None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)``; raise TaskInterrupted if ``interrupt`` stopped it."""
        old = signal.signal(INTERRUPT_SIGNAL, self._on_signal)
        with self._lock:
            self._active, self.reason = True, None
        try:
            result = fn(*args, **kwargs)
            with self._lock:
                self._active = False
            return result
        except _Interrupt:
            raise TaskInterrupted(self.reason or EndReason.INTERRUPTED) from None
        finally:
            with self._lock:
                self._active = False
            signal.signal(INTERRUPT_SIGNAL, old)

    def interrupt(self, reason: str) -> None:
        """Stop the running task (no-op when none is running or it is already being stopped)."""
        with self._lock:
            if not self._active or self.reason is not None:
                return
            self.reason = reason
            signal.pthread_kill(threading.main_thread().ident or 0, INTERRUPT_SIGNAL)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        # No lock here: the handler runs in the main thread, which may be holding it.
        if self._active and self.reason is not None:
            raise _Interrupt(self.reason)


class ChildProcessTask:
    """Runs ``fn`` in a forked child process, killed after ``timeout`` seconds (None: no limit).

    Fork, not spawn: the child inherits the worker's initialised Qlib in milliseconds instead of
    re-importing Qlib and MLflow (seconds). That is safe because the parent never trains a model
    (no OpenMP pool to inherit) and the child drops inherited MLflow database connections and
    never touches the parent's MongoDB client. ``interrupt`` may be called from any thread.
    """

    def __init__(self, timeout: float | None, kill_after: float = defaults.KILL_AFTER_SECONDS):
        self.timeout, self.kill_after = timeout, kill_after
        self.reason: str | None = None
        self._stop = threading.Event()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a child and return its (picklable) result.

        Raises:
            TaskTimeout: the deadline passed; the child was killed.
            TaskInterrupted: ``interrupt`` was called; the child was killed.
            ChildTaskFailed: the task raised, or the child died without answering.
        """
        ctx = mp.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child_main, args=(send, fn, args, kwargs), daemon=True)
        child.start()
        send.close()
        try:
            return self._wait(child, recv)
        finally:
            recv.close()
            self._kill(child)

    def _wait(self, child: Any, recv: Any) -> Any:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            if recv.poll(defaults.CHILD_POLL_SECONDS):
                try:
                    kind, payload, *fault = recv.recv()
                except EOFError:  # the child died right after sending nothing
                    kind, payload, fault = "died", None, []
                if kind == "ok":
                    return payload
                if kind == "error":
                    raise ChildTaskFailed(payload, *fault)
                break
            if self._stop.is_set():
                self._kill(child)
                raise TaskInterrupted(self.reason or EndReason.INTERRUPTED)
            if deadline is not None and time.monotonic() > deadline:
                self._kill(child)
                raise TaskTimeout(f"task timed out after {self.timeout:g}s; its child process "
                                  f"{child.pid} was killed")
            if not child.is_alive() and not recv.poll(0):
                break
        child.join(defaults.CHILD_REAP_SECONDS)
        raise ChildTaskFailed(f"task child process {child.pid} died without a result (exit code {child.exitcode})")

    def interrupt(self, reason: str) -> None:
        """Kill the running child and make ``run`` raise TaskInterrupted(reason)."""
        if self.reason is None:
            self.reason = reason
        self._stop.set()

    def _kill(self, child: Any) -> None:
        """SIGTERM (the task stops), then SIGKILL if the child is still there after ``kill_after``."""
        if child.is_alive():
            child.terminate()
            child.join(self.kill_after)
        if child.is_alive():
            logger.warning("timeouts: child %s ignored SIGTERM for %.0fs; killing it", child.pid, self.kill_after)
            child.kill()
            child.join(defaults.CHILD_REAP_SECONDS)


def _child_main(send: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Body of the child: signals as a task needs them, fresh DB connections, run, report, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C goes to the worker, which decides
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _drop_inherited_connections()
    from qlib_ext.worker.faults import classify, describe

    message: tuple[Any, ...]
    try:
        message = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
        message = ("error", describe(e), classify(e))
    try:
        send.send(message)
    except Exception:  # noqa: BLE001 - e.g. an unpicklable result: report that instead
        send.send(("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip inherited atexit hooks (MongoDB client; MLflow's would end the run FINISHED)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise _Interrupt(EndReason.TERMINATED)


def _drop_inherited_connections() -> None:
    """SQLAlchemy's rule for forked children: dispose inherited engines without closing the
    parent's connections, so MLflow opens its own."""
    store = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    for engine in list(getattr(getattr(store, "SqlAlchemyStore", None), "_engine_map", {}).values()):
        engine.dispose(close=False)
