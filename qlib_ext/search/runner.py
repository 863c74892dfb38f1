"""Running a proposer: beside ``qlib-ext run``'s workers (a thread), or alone (``qlib-ext search POOL``)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from pymongo.database import Database

from qlib_ext.search.proposer import Proposer, batch_size
from qlib_ext.workflow.load import Workflow

logger = logging.getLogger(__name__)


class SearchThread:
    """A proposer in a thread of the ``run`` process. ``start`` holds the pool open before it returns, so
    workers started afterwards wait for proposals; ``stop`` ends the proposer (the search can resume)."""

    def __init__(self, wf: Workflow, db: Database, *, workers: int, provider_uri: str | None,
                 mlflow_uri: str | None, max_attempts: int | None = None, n_trials: int | None = None):
        self.proposer = Proposer(wf, db, batch=batch_size(wf.grid, workers), provider_uri=provider_uri,
                                 max_attempts=max_attempts, mlflow_uri=mlflow_uri, n_trials=n_trials)
        self.event = threading.Event()
        self.done = False
        self._thread = threading.Thread(target=self._run, name=f"search-{wf.pool}", daemon=True)

    def start(self) -> SearchThread:
        self.proposer.hold()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.done = self.proposer.run(self.event)
        except Exception:  # the workers must learn that no more proposals come: the hold was released
            logger.exception("search %s: proposer failed", self.proposer.wf.pool)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop proposing (after the current round); True when the search had finished."""
        self.event.set()
        self._thread.join(timeout)
        return self.done


def run_search(pool: str, *, mongo_url: str | None, mlflow_uri: str | None = None, provider_uri: str | None = None,
               workflow: Path | None = None, batch: int | None = None) -> str:
    """``qlib-ext search POOL``: propose until every trial has finished (or Ctrl-C); return a summary.

    The workflow is the YAML recorded at submit (``--workflow`` for another path to the same file on
    this host); ``batch`` defaults to ``grid.batch``, where ``auto`` means this host's core count.
    """
    import dataclasses

    from qlib_ext.pool.database import load_pool_meta, open_db
    from qlib_ext.search.summary import summary_lines
    from qlib_ext.workflow.load import load_workflow

    db = open_db(mongo_url)
    meta = load_pool_meta(db, pool)
    wf = load_workflow(workflow or str(meta.workflow))
    wf = dataclasses.replace(wf, pool=pool)
    proposer = Proposer(wf, db, batch=batch or batch_size(wf.grid, os.cpu_count() or 1),
                        provider_uri=provider_uri or meta.provider_uri,
                        mlflow_uri=mlflow_uri or meta.mlflow_uri)
    stop = threading.Event()
    try:
        proposer.run(stop)
    except KeyboardInterrupt:
        stop.set()
    return "\n".join(summary_lines(db, pool))
