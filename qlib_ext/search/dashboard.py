"""``qlib-ext dashboard POOL``: optuna-dashboard on the pool's study, kept in step with the pool.

The pool is exported (:mod:`qlib_ext.search.export`) into an Optuna RDB storage, optuna-dashboard serves that
storage from a thread, and the export is repeated every ``DASHBOARD_REFRESH_SECONDS`` until Ctrl-C, so trials
proposed and finished while the search runs appear on the next refresh of the page (an unchanged pool costs
one read of its trial documents).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pymongo.database import Database
from pymongo.errors import PyMongoError

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.search.export import export

logger = logging.getLogger(__name__)


def default_storage(pool: str) -> str:
    """The pool's Optuna storage when none is given: a sqlite file under ``$QLIB_EXT_HOME/optuna``."""
    folder = Path(defaults.home()) / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / pool}.db"


def serve(pool: str, storage: str, *, db: Database, host: str = "127.0.0.1", port: int = 8080,
          every: float = defaults.DASHBOARD_REFRESH_SECONDS, stop: threading.Event | None = None,
          ready: threading.Event | None = None) -> None:
    """Export ``pool`` to ``storage``, serve optuna-dashboard on it at ``host:port`` and re-export every
    ``every`` seconds until ``stop`` is set (or Ctrl-C); ``ready`` is set once the server thread started."""
    import optuna_dashboard

    export(pool, storage, db=db)
    server = threading.Thread(target=optuna_dashboard.run_server, args=(storage, host, port), name=f"dashboard-{pool}",
                              daemon=True)
    server.start()
    logger.info("dashboard %s: http://%s:%d/dashboard (storage %s)", pool, host, port, storage)
    if ready is not None:
        ready.set()
    stop = stop or threading.Event()
    while not stop.wait(every):
        try:
            export(pool, storage, db=db)
        except (PyMongoError, StoreError) as e:
            logger.warning("dashboard %s: task store unreachable (%s); the page shows the last export", pool, e)
