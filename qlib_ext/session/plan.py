"""A run's plan: the workflow loaded once, its tasks expanded, its pool metadata built in memory; and the
submit that writes them (``qlib-ext submit``, the first step of ``qlib-ext run``)."""

from __future__ import annotations

import datetime as dt
import logging
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlib_ext import defaults
from qlib_ext.errors import ConfigError
from qlib_ext.pool.record import PoolMeta, TaskMeta

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
    backtests: int = 0  # strategy backtests the training tasks will queue when they finish (train-once)
    objective: str = "IC"  # grid.objective.metric: what the printed MLflow view sorts by
    ended: dict[str, int] = field(default_factory=dict)  # failed/cancelled tasks already in the pool: not run again
    store_note: str = ""  # the embedded store is not on 27017: its port and the qlib.init lines for Qlib's tools

    def __str__(self) -> str:
        note = f"\n{self.store_note}" if self.store_note else ""
        if self.backtests:
            kind = "training task" if self.total == 1 else "training tasks"
            line = (f"pool {self.pool}: {self.new} new of {self.total} {kind}, {self.backtests} backtests to follow "
                    f"(experiment {self.experiment!r})")
        else:
            line = f"pool {self.pool}: {self.new} new of {self.total} tasks (experiment {self.experiment!r})"
        return line + self._retry_hint() + note

    def _retry_hint(self) -> str:
        """What to do about tasks a resubmit does not run again (they ended failed or cancelled earlier)."""
        if not self.ended:
            return ""
        counts = " and ".join(f"{n} {status}" for status, n in sorted(self.ended.items()))
        return (f"\n  {counts} earlier: a submit does not run them again; `qlib-ext status {self.pool}` shows why, "
                f"`qlib-ext retry {self.pool}` requeues them (attempts start over)")


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


@dataclass
class Plan:
    """One workflow, loaded once: what is submitted and what the workers, the proposer and the summary use.

    ``meta`` is the pool metadata as submitted: a run hands it to its worker settings instead of reading
    it back from the store. Plain data, one owner.
    """

    path: Path
    wf: Any  # qlib_ext.workflow.load.Workflow
    provider_uri: str  # the resolved, checked data directory
    meta: PoolMeta
    tasks: list[dict]  # the expanded tasks (none for a search: its proposer queues them)
    searching: bool
    limit: int | None = None

    @property
    def pool(self) -> str:
        return str(self.wf.pool)

    @classmethod
    def load(cls, path: str | Path, *, mlflow_uri: str | None = None, provider_uri: str | None = None,
             limit: int | None = None) -> Plan:
        """Load and expand the workflow at ``path`` and build its pool metadata (nothing is written).

        Raises:
            ConfigError: a bad workflow or data directory.
        """
        from qlib_ext.workflow.load import load_workflow

        wf = load_workflow(path)  # first: a bad or oversized workflow fails before Qlib and MLflow are imported
        from qlib_ext.search.proposer import is_search
        from qlib_ext.tracking.params import check_param_names
        from qlib_ext.worker.settings import data_identity
        from qlib_ext.workflow.expand import expand

        qlib_init = dict(wf.config.get("qlib_init") or {})
        provider = resolve_provider(provider_uri, qlib_init, str(path))
        searching = is_search(wf.grid)  # a proposer queues the tasks as the search goes (qlib-ext search)
        tasks = [] if searching else spread_sample(expand(wf, provider_uri=provider), limit)
        check_param_names(tasks, Path(path), wf.grid)  # a name MLflow refuses would fail every attempt
        objective = wf.grid.objective
        meta = PoolMeta(
            workflow=str(Path(path).resolve()), provider_uri=provider, region=qlib_init.get("region", "cn"),
            qlib_init={k: v for k, v in qlib_init.items() if k not in _QLIB_INIT_OWNED},
            mlflow_uri=mlflow_uri or defaults.default_mlflow_uri(), experiment=wf.experiment_name,
            workers=asdict(wf.workers), data=data_identity(provider), submitted_at=dt.datetime.now(dt.timezone.utc),
            submitted_from=socket.gethostname(),
            # what the leaderboard ranks by; None when the YAML left grid.objective at its default (a sweep then
            # ranks by its backtest IR, not by the IC its rows share)
            objective=asdict(objective) if objective != type(objective)() else None,
            objectives=[asdict(o) for o in wf.grid.objectives] or None,  # several: a Pareto front
            search=PoolMeta.search_block(wf.grid.search, min(wf.grid.n_trials or limit or 0, limit or 10**9) or None)
            if searching else None,
        )
        return cls(Path(path), wf, provider, meta, tasks, searching, limit)

    def submit(self, *, mongo_url: str | None = None, db_name: str | None = None,
               max_attempts: int | None = None) -> Submitted:
        """Write the pool metadata and insert the new tasks; the grid's parent run in MLflow.

        ``max_attempts`` wins over ``workers.max_attempts``; it is stamped on each new task, and also on
        the pool's tasks not yet finished, so a resubmit can change it.
        """
        from qlib_ext.pool.manager import GridTaskManager, open_db, save_pool_meta
        from qlib_ext.pool.status import TaskStatus
        from qlib_ext.store import resolve_mongo_url
        from qlib_ext.tracking.experiment import ensure_experiment

        mlflow_uri = str(self.meta.mlflow_uri)
        ensure_experiment(mlflow_uri, self.wf.experiment_name)
        url = resolve_mongo_url(mongo_url)
        db = open_db(url, db_name)
        save_pool_meta(db, self.pool, self.meta)
        tm = GridTaskManager(self.pool, db)
        new, total = tm.create_tasks(self.tasks, max_attempts=max_attempts or self.wf.workers.max_attempts)
        if max_attempts is not None:
            tm.set_max_attempts(max_attempts)
        objective = self.wf.grid.objective.metric
        _grid_runs(mlflow_uri, self.wf.experiment_name, self.pool, self.tasks, self.path, objective)
        backtests = sum(len(TaskMeta.of(t).sweep or []) for t in self.tasks)
        ended = {k: v for k, v in tm.counts().items() if k in (TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)}
        note = embedded_note(mongo_url, url, db.name)
        return Submitted(self.pool, new, total, url, mlflow_uri, self.wf.experiment_name, backtests, objective,
                         ended=ended, store_note=note)


def embedded_note(option: str | None, url: str, db_name: str = defaults.TASK_DB_NAME) -> str:
    """What to say about the embedded store's port (:func:`qlib_ext.store.access.qlib_note`) when ``option`` asked
    for the embedded store and it is not on 27017; "" otherwise (a URL the user gave is theirs to know)."""
    from qlib_ext.store.access import qlib_note

    return qlib_note(url, db_name) if option in (None, "", "embedded") else ""


def submit(path: str | Path, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
           provider_uri: str | None = None, db_name: str | None = None,
           max_attempts: int | None = None, limit: int | None = None) -> Submitted:
    """Expand a workflow and insert its new tasks into its pool (``qlib-ext submit``).

    ``limit`` (``--limit``) submits only an evenly spread sample of that many tasks (first and last
    included): a smoke test of a big grid before spending hours on it. See :meth:`Plan.submit`.
    """
    plan = Plan.load(path, mlflow_uri=mlflow_uri, provider_uri=provider_uri, limit=limit)
    return plan.submit(mongo_url=mongo_url, db_name=db_name, max_attempts=max_attempts)


def _grid_runs(mlflow_uri: str, experiment: str, pool: str, tasks: list[dict], path: str | Path,
               objective: str) -> None:
    """The grid's parent run in MLflow (``tracking/mlflow_ui.py``); a failure only loses the nesting."""
    from qlib_ext.tracking.mlflow_ui import ensure_grid_runs

    try:
        ensure_grid_runs(mlflow_uri, experiment, pool, tasks, workflow=path, objective=objective)
    except Exception as e:  # noqa: BLE001 - a failure only loses the nesting in the UI
        logger.warning("submit: no grid run in MLflow for pool %s (runs will not nest): %s", pool, e)
