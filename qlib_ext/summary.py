"""What ``qlib-ext run`` and ``worker`` print when their workers are done, and their exit code.

The leaderboard, the failures (a grid where every task failed exits 1 with the count, the first
error and the command that shows them all; a Ctrl-C stop exits 130) and the MLflow UI: a command
that works as pasted and two links into the grid (ranked configurations, the grid as one row).
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass

logger = logging.getLogger(__name__)

EXIT_ALL_FAILED = 1
"""Exit code of ``run``/``worker`` when every task of the pool failed."""



@dataclass
class Summary:
    """The text to print after the workers exited and the exit code to end with."""

    text: str
    code: int


def after_workers(pool: str, *, mongo_url: str, mlflow_uri: str, metric: str | None, code: int,
                  stopped: bool | None = None, leaderboard: bool = True, top: int = 20) -> Summary:
    """Update the grid's parent run, then build the summary.

    Args:
        code: the workers' exit code (130 after Ctrl-C: :func:`qlib_ext.worker.group.run_workers`).
        stopped: whether they were stopped before the pool finished; None: whether the pool still has
            unfinished tasks. A stopped pool is not reported as 'all failed'.
    """
    from qlib_ext.analysis.grid_run import finish_grid

    data = finish_grid(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric)
    lines = []
    if leaderboard:
        lines.append(_table(pool, mongo_url, mlflow_uri, metric, data, top))
    counts = data.counts if data is not None else _counts(pool, mongo_url)
    if stopped is None:
        stopped = any(counts.get(s) for s in ("waiting", "running", "part_done"))
    failed, done = counts.get("failed", 0), counts.get("done", 0)
    if failed and not done and not stopped:
        lines.append(f"\nerror: all {failed} tasks of pool {pool} failed. First error:")
        error = (data.first_error if data is not None else None) or "(no error recorded)"
        lines.append(textwrap.indent("\n".join(error.strip().splitlines()[-12:]), "    "))
        lines.append(f"every failure: qlib-ext status {pool}")
        code = code or EXIT_ALL_FAILED
    elif failed:
        lines.append(f"\nwarning: {failed} of {sum(counts.values())} tasks failed: qlib-ext status {pool}")
    if data is not None and data.experiment_id:
        lines.append("\n" + ui_lines(mlflow_uri, data.experiment_id, pool, data.metric))
    return Summary("\n".join(lines), code)


def _table(pool: str, mongo_url: str, mlflow_uri: str, metric: str | None, data: object, top: int) -> str:
    from qlib_ext.analysis.leaderboard import format_table

    if data is not None:
        rows, grid = data.rows, data.grid
    else:
        from qlib_ext.analysis.grid_run import ranked_rows

        rows, grid = ranked_rows(pool, mongo_url, mlflow_uri, metric)
    try:
        return format_table(rows, grid, top=top)
    except TypeError:  # the older format_table(rows, metric)
        return format_table(rows[:top], grid.get("metric", metric or "IC"))


def _counts(pool: str, mongo_url: str) -> dict[str, int]:
    from qlib_ext.pool.manager import GridTaskManager, open_db

    try:
        return dict(GridTaskManager(pool, open_db(mongo_url)).counts())
    except Exception:  # the summary still prints what it has
        return {}


def ui_lines(mlflow_uri: str, experiment_id: str, pool: str, metric: str) -> str:
    """How to open the runs: the UI command (as pasted) and the two views of the grid."""
    from qlib_ext.tracking import mlflow_ui

    base = mlflow_ui.ui_base(mlflow_uri)
    return "\n".join([
        "compare runs in the MLflow UI:",
        f"  start it:   {mlflow_ui.ui_command(mlflow_uri)}",
        f"  ranked:     {mlflow_ui.runs_url(base, experiment_id, pool, metric, mlflow_ui.RANKED)}",
        f"  grid:       {mlflow_ui.runs_url(base, experiment_id, pool, metric, mlflow_ui.GRID)}",
        f"  report:     qlib-ext report {pool}",
    ])


def pools_table(mongo_url: str | None) -> str:
    """Every pool of the task database with its counts per status (``qlib-ext status`` without POOL)."""
    from qlib_ext.pool.manager import GridTaskManager, open_db, pool_names

    db = open_db(mongo_url)
    names = pool_names(db)
    if not names:
        return f"no pools in database {db.name!r}; submit a workflow first (qlib-ext run FILE)"
    rows = [["pool", "tasks", "counts"]]
    for name in names:
        counts = GridTaskManager(name, db).counts()
        rows.append([name, str(sum(counts.values())), ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))])
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)
