"""The Python API: submit a workflow to its pool (what `qlib-ext submit` and `run` call)."""

from __future__ import annotations

import datetime as dt
import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from qlib_ext import defaults
from qlib_ext.errors import ConfigError

logger = logging.getLogger(__name__)

_QLIB_INIT_OWNED = ("provider_uri", "region", "exp_manager", "mongo")
"""qlib_init keys qlib-ext sets itself in each worker; the rest is passed through."""


@dataclass
class Submitted:
    """Outcome of a submit: how many tasks were new, and where the pool and runs live."""

    pool: str
    new: int
    total: int
    mongo_url: str
    mlflow_uri: str
    experiment: str

    def __str__(self) -> str:
        return f"pool {self.pool}: {self.new} new of {self.total} tasks (experiment {self.experiment!r})"


def resolve_provider(provider_uri: str | None, qlib_init: dict, source: str) -> str:
    """The data directory: the override, else ``qlib_init.provider_uri``; it must exist."""
    raw = provider_uri or qlib_init.get("provider_uri")
    if not raw:
        raise ConfigError(f"{source}: no data directory: set qlib_init.provider_uri or pass --provider-uri")
    path = Path(str(raw)).expanduser().resolve()
    if not (path / "calendars").is_dir():
        raise ConfigError(f"{source}: provider_uri {str(path)!r} is not a Qlib data directory (no calendars/); "
                          f"make one with `qlib-ext data synth --out {path}` or pass --provider-uri")
    return str(path)


def spread_sample(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spread over the list, first and last included."""
    if not limit or limit >= len(items):
        return items
    if limit == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def submit(path: str | Path, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
           provider_uri: str | None = None, db_name: str = defaults.TASK_DB_NAME,
           max_attempts: int | None = None, limit: int | None = None) -> Submitted:
    """Expand a workflow and insert its new tasks into its pool (``qlib-ext submit``).

    ``max_attempts`` (the ``--max-attempts`` flag) wins over ``workers.max_attempts``; it is stamped
    on each new task, and also on the pool's tasks not yet finished, so a resubmit can change it.
    ``limit`` (``--limit``) submits only an evenly spread sample of that many tasks (first and last
    included): a smoke test of a big grid before spending hours on it.
    """
    from qlib_ext.pool.manager import GridTaskManager, open_db, save_pool_meta
    from qlib_ext.store import resolve_mongo_url
    from qlib_ext.tracking.experiment import ensure_experiment
    from qlib_ext.worker.settings import data_identity
    from qlib_ext.workflow.expand import expand
    from qlib_ext.workflow.load import load_workflow

    wf = load_workflow(path)
    qlib_init = dict(wf.config.get("qlib_init") or {})
    provider = resolve_provider(provider_uri, qlib_init, str(path))
    from qlib_ext.search.proposer import is_search

    searching = is_search(wf.grid)  # a proposer queues the tasks as the search goes (qlib-ext search)
    tasks = [] if searching else spread_sample(expand(wf, provider_uri=provider), limit)
    mlflow_uri = mlflow_uri or defaults.default_mlflow_uri()
    ensure_experiment(mlflow_uri, wf.experiment_name)
    url = resolve_mongo_url(mongo_url)
    db = open_db(url, db_name)
    save_pool_meta(db, wf.pool, {
        "workflow": str(Path(path).resolve()), "provider_uri": provider, "region": qlib_init.get("region", "cn"),
        "qlib_init": {k: v for k, v in qlib_init.items() if k not in _QLIB_INIT_OWNED},
        "mlflow_uri": mlflow_uri, "experiment": wf.experiment_name, "workers": asdict(wf.workers),
        "data": data_identity(provider), "submitted_at": dt.datetime.now(dt.timezone.utc),
        "submitted_from": socket.gethostname(),
        **({"search": {"search": wf.grid.search, "n_trials": min(wf.grid.n_trials or limit or 0, limit or 10**9)
                       or None}} if searching else {}),
    })
    tm = GridTaskManager(wf.pool, db)
    new, total = tm.create_tasks(tasks, max_attempts=max_attempts or wf.workers.max_attempts)
    if max_attempts is not None:
        tm.task_pool.update_many({"status": {"$in": ["waiting", "running"]}}, {"$set": {"max_attempts": max_attempts}})
    return Submitted(wf.pool, new, total, url, mlflow_uri, wf.experiment_name)


