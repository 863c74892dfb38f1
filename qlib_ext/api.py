"""The Python API: submit a workflow to its pool (what `qlib-ext submit` and `run` call)."""

from __future__ import annotations

import datetime as dt
import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

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

    def __str__(self) -> str:
        if self.backtests:
            kind = "training task" if self.total == 1 else "training tasks"
            return (f"pool {self.pool}: {self.new} new of {self.total} {kind}, {self.backtests} backtests to follow "
                    f"(experiment {self.experiment!r})")
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
    save_pool_meta(db, wf.pool, PoolMeta(
        workflow=str(Path(path).resolve()), provider_uri=provider, region=qlib_init.get("region", "cn"),
        qlib_init={k: v for k, v in qlib_init.items() if k not in _QLIB_INIT_OWNED},
        mlflow_uri=mlflow_uri, experiment=wf.experiment_name, workers=asdict(wf.workers),
        data=data_identity(provider), submitted_at=dt.datetime.now(dt.timezone.utc),
        submitted_from=socket.gethostname(),
        # what the leaderboard ranks by; None when the YAML left grid.objective at its default (a sweep then
        # ranks by its backtest IR, not by the IC its rows share)
        objective=asdict(wf.grid.objective) if wf.grid.objective != type(wf.grid.objective)() else None,
        search=PoolMeta.search_block(wf.grid.search, min(wf.grid.n_trials or limit or 0, limit or 10**9) or None)
        if searching else None,
    ))
    tm = GridTaskManager(wf.pool, db)
    new, total = tm.create_tasks(tasks, max_attempts=max_attempts or wf.workers.max_attempts)
    if max_attempts is not None:
        tm.set_max_attempts(max_attempts)
    objective = wf.grid.objective.metric
    _grid_runs(mlflow_uri, wf.experiment_name, wf.pool, tasks, path, objective)
    backtests = sum(len(TaskMeta.of(t).sweep or []) for t in tasks)
    return Submitted(wf.pool, new, total, url, mlflow_uri, wf.experiment_name, backtests, objective)


def _grid_runs(mlflow_uri: str, experiment: str, pool: str, tasks: list[dict], path: str | Path,
               objective: str) -> None:
    """The grid's parent run in MLflow (``tracking/mlflow_ui.py``); a failure only loses the nesting."""
    from qlib_ext.tracking.mlflow_ui import ensure_grid_runs

    try:
        ensure_grid_runs(mlflow_uri, experiment, pool, tasks, workflow=path, objective=objective)
    except Exception as e:
        logger.warning("submit: no grid run in MLflow for pool %s (runs will not nest): %s", pool, e)




# --------------------------------------------------------------------------- notebooks
@dataclass
class RunResult:
    """What :func:`run` did: the pool it ran and the exit code ``qlib-ext run`` would have ended with."""

    pool: str
    exit_code: int  # 0 ok, 1 every task failed, 130 interrupted (see qlib_ext.summary)

    @property
    def ok(self) -> bool:
        """Whether the run ended cleanly."""
        return self.exit_code == 0


_RUN_FLAGS = {"mongo_url", "mlflow_uri", "provider_uri", "threads", "lease_seconds", "heartbeat_seconds",
              "grace_seconds", "task_timeout", "max_attempts", "metric", "limit"}
"""Keyword arguments of :func:`run`, each the ``qlib-ext run`` flag of the same name."""


def run(path: str | Path, workers: int | None = None, *, cache: bool = True, **overrides: object) -> RunResult:
    """Submit a workflow and drain its pool with local worker processes, as ``qlib-ext run`` does.

    Prints the same progress line, leaderboard and MLflow links. Example (a notebook cell)::

        import qlib_ext
        result = qlib_ext.run("workflows/quickstart.yaml", workers=2)
        board = qlib_ext.leaderboard(result.pool)          # a pandas DataFrame, best first
        page = qlib_ext.report(result.pool)                # report.html, also on the grid's MLflow run

    Args:
        path: the workflow YAML.
        workers: worker processes (None: one per core).
        cache: share prepared datasets between tasks (``--no-cache`` when False).
        **overrides: ``qlib-ext run`` options by their Python names: ``mongo_url``, ``mlflow_uri``,
            ``provider_uri``, ``threads``, ``lease_seconds``, ``heartbeat_seconds``, ``grace_seconds``,
            ``task_timeout``, ``max_attempts``, ``metric``, ``limit``.

    Raises:
        ConfigError: an unknown keyword (the message lists the valid ones), or a bad workflow.
    """
    from qlib_ext.cli import main
    from qlib_ext.workflow.load import load_workflow

    unknown = sorted(set(overrides) - _RUN_FLAGS)
    if unknown:
        raise ConfigError(f"qlib_ext.run: unknown option(s) {', '.join(unknown)}; expected one of: "
                          f"{', '.join(sorted(_RUN_FLAGS))}")
    args = ["run", str(path)]
    if workers is not None:
        args += ["-n", str(workers)]
    if not cache:
        args.append("--no-cache")
    for key, value in overrides.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    code = main.main(args, prog_name="qlib-ext", standalone_mode=False)
    return RunResult(load_workflow(path).pool, int(code or 0))


def leaderboard(pool: str, *, metric: str | None = None, mongo_url: str | None = None,
                mlflow_uri: str | None = None) -> object:
    """The pool's leaderboard as a ``pandas.DataFrame``, best first (one row per configuration).

    Columns: ``rank, run_name, <metric>``, Sharpe/PSR/DSR statistics and ``flags``, every other metric,
    then ``config_id, run_id, windows``. ``frame.attrs["grid"]`` holds the grid's numbers (metric,
    trials, PBO).
    """
    from qlib_ext.analysis import leaderboard as lb

    _quiet_downloads()
    if hasattr(lb, "leaderboard_frame"):
        frame, grid = lb.leaderboard_frame(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric)
        frame.attrs["grid"] = grid
        return frame
    import pandas as pd

    rows = lb.leaderboard(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric or lb.DEFAULT_METRIC)
    return pd.DataFrame([{"rank": i, "run_name": r["run_name"], **r["metrics"], **r["params"],
                          "config_id": r["config_id"], "run_id": r["run_id"]} for i, r in enumerate(rows, 1)])


def report(pool: str, *, out: str | Path | None = None, metric: str | None = None, mongo_url: str | None = None,
           mlflow_uri: str | None = None) -> Path:
    """Write the pool's HTML report (``qlib-ext report``), log it to the grid's MLflow run, return its path."""
    from qlib_ext.analysis.report import build

    _quiet_downloads()
    return build(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, out=out)


def _quiet_downloads() -> None:
    """No "Downloading artifacts" progress bar per artifact read (a notebook cell would fill with them)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
