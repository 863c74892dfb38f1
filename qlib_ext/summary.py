"""What ``qlib-ext run`` and ``worker`` print when their workers are done, and their exit code.

The leaderboard, the failures (a grid where every task failed exits 1 with the count, the first
error and the command that shows them all; a Ctrl-C stop exits 130) and the MLflow UI: a command
that works as pasted and two links into the grid (ranked configurations, the grid as one row).
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlib_ext.tables import text_table

logger = logging.getLogger(__name__)

EXIT_ALL_FAILED = 1
"""Exit code of ``run``/``worker`` when every task of the pool failed."""


@dataclass
class Summary:
    """The text to print after the workers exited and the exit code to end with; the counts, the grid's
    numbers and the MLflow links behind it (what ``qlib_ext.run`` returns)."""

    text: str
    code: int
    counts: dict[str, int] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


def after_workers(pool: str, *, mongo_url: str, mlflow_uri: str, metric: str | None, code: int,
                  stopped: bool | None = None, leaderboard: bool = True, top: int = 20,
                  plots_log: Path | None = None) -> Summary:
    """Update the grid's parent run, then build the summary.

    Args:
        code: the workers' exit code (130 after Ctrl-C: :func:`qlib_ext.worker.group.run_workers`).
        stopped: whether they were stopped before the pool finished; None: whether the pool still has
            unfinished tasks. A stopped pool is not reported as 'all failed'.
        plots_log: draw the grid plots in a background process writing this log (the summary says so),
            so the summary is not kept waiting for them; None: draw them here, before returning.
    """
    from qlib_ext.analysis.grid_run import finish_grid

    data = finish_grid(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, plots=plots_log is None)
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
    links: dict[str, str] = {}
    if data is not None and data.experiment_id:
        links = ui_links(mlflow_uri, data.experiment_id, pool, data.metric)
        lines.append("\n" + _links_text(pool, links))
    if plots_log is not None and data is not None and data.runs is not None:
        lines.append(_plots_later(pool, mongo_url, mlflow_uri, data.metric, plots_log))
    return Summary("\n".join(lines), code, dict(counts), dict(data.grid) if data is not None else {}, links)


def _plots_later(pool: str, mongo_url: str, mlflow_uri: str, metric: str, log: Path) -> str:
    """Start the background process drawing the grid plots; the line that says where they will appear."""
    from qlib_ext.session import grid_plots

    try:
        grid_plots.start(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, log=log)
    except OSError as e:  # the summary stands without them; `qlib-ext report` draws them
        logger.warning("grid %s: no background process for the grid plots: %s", pool, e)
        return f"  plots:      not drawn ({e}); qlib-ext report {pool} draws them"
    return (f"  plots:      being drawn in the background into the grid run's plots/ (log: {log}); "
            f"qlib-ext report {pool} draws them too")


def _table(pool: str, mongo_url: str, mlflow_uri: str, metric: str | None, data: Any, top: int) -> str:
    from qlib_ext.analysis.leaderboard import format_table

    if data is not None:
        rows, grid = data.rows, data.grid
    else:
        from qlib_ext.analysis.grid_run import ranked_rows

        rows, grid = ranked_rows(pool, mongo_url, mlflow_uri, metric)
    return format_table(rows, grid, top=top)


def _counts(pool: str, mongo_url: str) -> dict[str, int]:
    from qlib_ext.pool.manager import GridTaskManager, open_db

    try:
        return dict(GridTaskManager(pool, open_db(mongo_url)).counts())
    except Exception:  # noqa: BLE001 - the summary still prints what it has
        return {}


def ui_links(mlflow_uri: str, experiment_id: str, pool: str, metric: str) -> dict[str, str]:
    """How to open the runs: ``ui`` (the command that starts the MLflow UI, as pasted), ``ranked`` and
    ``grid`` (URLs of the ranked configurations and of the grid as one row)."""
    from qlib_ext.tracking import mlflow_ui

    base = mlflow_ui.ui_base(mlflow_uri)
    return {"ui": mlflow_ui.ui_command(mlflow_uri),
            "ranked": mlflow_ui.runs_url(base, experiment_id, pool, metric, mlflow_ui.RANKED),
            "grid": mlflow_ui.runs_url(base, experiment_id, pool, metric, mlflow_ui.GRID)}


def _links_text(pool: str, links: dict[str, str]) -> str:
    """The links of :func:`ui_links` as printed, and the report command."""
    return "\n".join([
        "compare runs in the MLflow UI:",
        f"  start it:   {links['ui']}",
        f"  ranked:     {links['ranked']}",
        f"  grid:       {links['grid']}",
        f"  report:     qlib-ext report {pool}",
    ])


def pools_table(mongo_url: str | None) -> str:
    """Every pool of the task database with its counts per status (``qlib-ext status`` without POOL); a pool
    Qlib made (``TrainerRM``, ``TaskManager.create_task``: no metadata of ours) is marked ``(qlib)``."""
    from qlib_ext.names import pool_name_problem
    from qlib_ext.pool.database import pool_names, qlib_pool_names
    from qlib_ext.pool.manager import GridTaskManager, open_db

    db = open_db(mongo_url)
    ours, qlibs = pool_names(db), qlib_pool_names(db)
    if not ours and not qlibs:
        return (f"no pools in database {db.name!r}; submit a workflow first (qlib-ext run FILE), or name the "
                f"database with --task-db")
    rows = [["pool", "tasks", "counts"]]
    for name in sorted([*ours, *qlibs]):
        problem = pool_name_problem(name)  # a name written past qlib-ext: listed, not opened
        if problem:
            rows.append([name, "-", f"invalid pool name ({problem}); not opened"])
            continue
        counts = GridTaskManager(name, db).counts()
        label = f"{name} (qlib)" if name in qlibs else name
        rows.append([label, str(sum(counts.values())), ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))])
    return text_table(rows)
