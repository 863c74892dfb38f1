"""Fill the shared cache for a pool's waiting tasks before its workers start, with every core.

Left to the workers, the first one that needs a dataset builds it with one core (its share) while
the others wait on the entry's lock. Built here first, Qlib computes the handler's features with
all cores (``kernels``). The same goes for the backtest exchanges. It runs in a child process
(:class:`Warmer`) so the parent of the workers never holds a dataset, while the workers start up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from qlib_ext.pool.record import Doc
from qlib_ext.tables import log_to_terminal
from qlib_ext.worker.settings import WorkerSettings
from qlib_ext.workflow.spec import is_port_ana

logger = logging.getLogger(__name__)


@dataclass
class Warmed:
    """What :func:`warm` found and did."""

    tasks: int = 0
    datasets: int = 0
    exchanges: int = 0
    built: int = 0  # entries that were missing and got built
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"cache: {self.datasets} datasets and {self.exchanges} backtest exchanges for {self.tasks} waiting "
                f"tasks ready in {self.seconds:.0f}s ({self.built} built)")


class Warmer:
    """:func:`warm` in a spawned child with ``cores`` Qlib kernels (default: all cores of this host).

    ``ready`` is a file the child creates once it holds the locks of every entry it is going to build
    (or found nothing to build); the parent creates it too when the child ends without doing so.
    Workers started meanwhile wait for it before claiming (``WorkerSettings.start_after``), so their
    start-up overlaps the child's, and a worker never builds an entry the child is about to build.
    """

    def __init__(self, settings: WorkerSettings, cores: int | None = None):
        self.settings, self.cores = settings, cores or os.cpu_count() or 1
        self._dir = Path(tempfile.mkdtemp(prefix="qlib-ext-warm-"))
        self.ready = self._dir / "ready"
        self._ctx = mp.get_context("spawn")
        self._queue = self._ctx.Queue()
        self._proc: Any = None

    def start(self) -> Warmer:
        self._proc = self._ctx.Process(target=_child, args=(asdict(self.settings), self.cores, self._queue,
                                                            str(self.ready)))
        self._proc.start()
        return self

    def poll(self) -> Warmed | None:
        """None while the child runs; then what it did.

        Raises:
            RuntimeError: the child failed (its traceback went to stderr); workers build what they need.
        """
        if self._proc.exitcode is None:
            return None
        self.ready.touch()  # kept until close(): a worker still starting up must find it
        if self._proc.exitcode != 0:
            raise RuntimeError(f"preparing the cache failed (exit code {self._proc.exitcode})")
        return Warmed(**self._queue.get(timeout=5))

    def close(self) -> None:
        """Remove the ready file; call once no worker waits for it any more."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def wait(self) -> Warmed:
        """Wait for the child to end; what it did (see :meth:`poll`)."""
        self._proc.join()
        result = self.poll()
        assert result is not None
        return result


def _child(settings: dict, cores: int, queue: mp.Queue, ready: str) -> None:
    from qlib_ext.worker.loop import init_qlib

    log_to_terminal(settings["log_level"])  # control characters in pool data escaped
    s = replace(WorkerSettings(**settings), threads=cores)
    init_qlib(s)
    queue.put(asdict(warm(s, on_locked=Path(ready).touch)))


def warm(settings: WorkerSettings, on_locked: Callable[[], object] = lambda: None) -> Warmed:
    """Build the dataset and exchange cache entries of the pool's waiting tasks that are missing.

    Must run after ``qlib.init``; ``settings.cache_dir`` must be set. ``on_locked()`` is called once
    the build locks of all missing entries are held (before building them).
    """
    from qlib_ext.cache.datasets import cache_key, entry_lock, handler_config, load_or_build
    from qlib_ext.cache.entry import Entry
    from qlib_ext.cache.exchange import QuoteEntry, exchange_key, exchange_kwargs, shared_exchange

    start = time.perf_counter()
    tasks = waiting_tasks(settings)
    cache_dir = Path(str(settings.cache_dir))
    # distinct configurations first (cheap), cache keys after: a key costs a scan of the data directory
    handlers = _distinct(handler_config(t.get("dataset")) for t in tasks)
    exchanges = _distinct(exchange_kwargs(b) for t in tasks for b in backtests(t))
    jobs = [(Entry(cache_dir, cache_key(h)), functools.partial(load_or_build, h, cache_dir)) for h in handlers]
    jobs += [(QuoteEntry(cache_dir, exchange_key(k)), functools.partial(shared_exchange, k, cache_dir))
             for k in exchanges]
    # an entry with a sidecar counts as there; if it is damaged, the worker that loads it rebuilds it
    missing = [(entry, job) for entry, job in jobs if entry.read_meta() is None]
    with contextlib.ExitStack() as held:
        for entry, _ in missing:
            held.enter_context(entry_lock(entry))
        on_locked()
        for i, (entry, job) in enumerate(missing, 1):
            logger.info("cache: building %d of %d (%s)", i, len(missing), entry.key[:12])
            job()
    return Warmed(len(tasks), len(handlers), len(exchanges), len(missing), time.perf_counter() - start)


def waiting_tasks(settings: WorkerSettings) -> list[dict]:
    """The task dicts of the pool's waiting tasks that a worker would run.

    Decoded as plain data and checked like a worker checks them (shape, module allow-list); a task that
    fails a check is skipped with a warning and left to the worker that claims it, which fails it.
    """
    from qlib_ext.errors import TaskRejected
    from qlib_ext.pool.allowlist import check_modules
    from qlib_ext.pool.codec import check_shape, decode_document
    from qlib_ext.pool.manager import GridTaskManager
    from qlib_ext.worker.loop import task_db

    db = task_db(settings)
    tasks = []
    try:
        tm = GridTaskManager(settings.pool, db)
        for doc in tm.waiting_documents():
            try:
                task = check_shape(decode_document(doc).get(Doc.DEF), doc[Doc.ID])
                check_modules(task, tuple(settings.allowed_modules))
            except TaskRejected as e:
                logger.warning("cache: skipping task %s: %s", doc[Doc.ID], e)
                continue
            tasks.append(task)
    finally:
        db.client.close()
    return tasks


def backtests(task: dict) -> list[dict]:
    """The ``config["backtest"]`` of each ``PortAnaRecord`` in the task's records."""
    records = task.get("record") or []
    out = []
    for record in [records] if isinstance(records, dict) else records:
        if is_port_ana(record):
            backtest = ((record.get("kwargs") or {}).get("config") or {}).get("backtest")
            if isinstance(backtest, dict):
                out.append(backtest)
    return out


def _distinct(items) -> list:
    from qlib_ext.identity import canonical_json

    seen: dict[str, object] = {}
    for item in items:
        if item is not None:
            seen.setdefault(canonical_json(item), item)
    return list(seen.values())
