"""A finished grid's summary on its parent run: counts, best objective, PBO/DSR, the rolling
configurations' means, and the grid plots (``qlib_ext.analysis.plots``).

:func:`finish_grid` is safe to call any number of times (``qlib-ext run`` and ``worker`` call it
when their workers exit, ``qlib-ext report`` before writing the page): it overwrites the metrics
and plots, and ends the grid run FINISHED once no task is waiting or running.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlib_ext.analysis import importance, plots
from qlib_ext.pool.record import Doc, Metric, Tag
from qlib_ext.tracking import mlflow_ui

logger = logging.getLogger(__name__)

SERIES_ARTIFACT = "portfolio_analysis/report_normal_1day.pkl"

RUN_FIGURES_MAX = 200
"""Most ranked rows whose task runs get their figure drawn after a run (the best first; ``qlib-ext report`` and
the background grid plots), as many as the series read for the grid plots."""
"""PortAnaRecord's daily report, the source of the return series drawn per grid."""


@dataclass
class GridData:
    """What the report and the grid run show: ranked rows, the grid's numbers, series and counts."""

    pool: str
    metric: str
    rows: list[dict]
    grid: dict
    counts: dict[str, int]
    experiment_id: str
    runs: mlflow_ui.GridRuns | None
    mlflow_uri: str
    series: dict[str, Any] = field(default_factory=dict)  # run name -> daily excess return with cost
    windows: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # run name -> (window, metric)
    first_error: str | None = None
    importance: Any = None  # analysis.importance.Importance over the ranked objectives (None: not computed)


def ranked_rows(pool: str, mongo_url: str | None, mlflow_uri: str | None,
                metric: str | None) -> tuple[list[dict], dict]:
    """Leaderboard rows best first and the grid's numbers (metric, PBO, ...) from the leaderboard module."""
    from qlib_ext.analysis import leaderboard as lb

    if hasattr(lb, "ranked"):
        return lb.ranked(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric)
    name = metric or lb.DEFAULT_METRIC
    return lb.leaderboard(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=name), {"metric": name}


def collect(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
            metric: str | None = None, full: bool = True) -> GridData:
    """Read everything the grid's summary needs from the pool and MLflow.

    ``full=False`` leaves out what only the plots, the report and the grid run's ``importance.*`` metrics
    need: each row's daily returns (one artifact download per row) and the hyperparameter importances
    (fANOVA and PED-ANOVA, seconds on their own, plus importing optuna and scikit-learn).
    """
    import mlflow

    from qlib_ext.pool.database import load_pool_meta, open_db
    from qlib_ext.pool.manager import GridTaskManager

    db = open_db(mongo_url)
    meta = load_pool_meta(db, pool)
    uri = mlflow_uri or meta.mlflow_uri or ""
    client = mlflow.MlflowClient(tracking_uri=uri)
    rows, grid = ranked_rows(pool, mongo_url, uri, metric)
    tm = GridTaskManager(pool, db)
    exp = client.get_experiment_by_name(meta.experiment or "")
    data = GridData(pool, grid.get("metric") or metric or Metric.IC, rows, grid, dict(tm.counts()),
                    exp.experiment_id if exp else "", None, uri)
    data.runs = mlflow_ui.grid_runs(client, data.experiment_id, pool) if exp else None
    data.first_error = _first_error(tm)
    if full:
        data.importance = _importance(pool, mongo_url, grid)
        _read_series(client, data)
    return data


def _importance(pool: str, mongo_url: str | None, grid: dict) -> Any:
    """The pool's hyperparameter importances over its objectives; None (with a WARNING) if they fail."""
    from qlib_ext.analysis.importance import pool_importance

    objectives = [(o["metric"], o["direction"]) for o in grid.get("pareto_over") or []]
    try:
        return pool_importance(pool, objectives or [(grid.get("metric") or Metric.IC, grid.get("direction") or "max")],
                               mongo_url=mongo_url)
    except Exception as e:  # noqa: BLE001 - importances are an extra; the summary goes on without them
        logger.warning("grid %s: no hyperparameter importances: %s", pool, e)
        return None


def short_axes(data: GridData) -> dict[str, str]:
    """Axis (dotted path) -> the short name the runs' params use."""
    full = {v: k for k, v in ((data.runs.axes if data.runs else {}) or {}).items()}
    imp = data.importance
    axes = {a for m in imp.shares.values() for ev in m.values() for a in ev} if imp is not None else set()
    return {**mlflow_ui.short_names(axes), **{a: full[a] for a in axes if a in full}}


def _first_error(tm: Any) -> str | None:
    failed = tm.failed(limit=1)
    errors = (failed[0] if failed else {}).get(Doc.ERRORS) or []
    return str(errors[-1].get("error", ""))[-2000:] if errors else None


def _read_series(client: Any, data: GridData, limit: int = RUN_FIGURES_MAX) -> None:
    """Each row's daily excess return with cost (windows stitched) and each window's metric."""
    import pandas as pd

    from qlib_ext.errors import ArtifactTampered
    from qlib_ext.tracking.artifacts import digest_map, download_checked, read_frame

    with tempfile.TemporaryDirectory(prefix="qlib-ext-grid-") as tmp:
        for i, row in enumerate(data.rows[:limit]):
            name = f"#{i + 1} {row.get('run_name') or row['run_id'][:8]}"
            parts = []
            for run_id in row.get("runs") or [row["run_id"]]:
                digests = digest_map((row.get("artifacts") or {}).get(run_id))
                try:  # checked against the pool's digests, then read as data (never read_pickle)
                    report = read_frame(download_checked(client, run_id, SERIES_ARTIFACT, tmp, digests))
                    parts.append(report["return"] - report["bench"] - report["cost"])
                except ArtifactTampered as e:
                    logger.warning("report: %s", e)
                except Exception:  # noqa: BLE001 - no backtest in this task
                    pass
            if parts:
                s = pd.concat(parts).sort_index()
                data.series[name] = s[~s.index.duplicated(keep="last")]
            if row.get("runs"):
                data.windows[name] = [(int(r.data.params.get("window.index", j)), r.data.metrics[data.metric])
                                      for j, r in enumerate(client.get_run(x) for x in row["runs"])
                                      if data.metric in r.data.metrics]


def log_run_figures(client: Any, data: GridData, limit: int = RUN_FIGURES_MAX) -> int:
    """Each ranked row's task runs (best first, ``limit`` rows) get their ``plots/run.png`` where it is missing;
    the number drawn."""
    from qlib_ext.tracking.artifacts import digest_map

    drawn = 0
    for row in data.rows[:limit]:
        for run_id in row.get("runs") or [row["run_id"]]:
            digests = digest_map((row.get("artifacts") or {}).get(run_id))
            drawn += plots.log_run_figure(client, run_id, digests, str(row.get("run_name") or "")) is not None
    return drawn


def draw(data: GridData, out: Path) -> dict[str, Path]:
    """The grid plots as PNGs in ``out``; a plot that cannot be drawn is left out with a WARNING."""
    axes = list((data.runs.axes if data.runs else {}) or {})
    if not axes and data.rows:
        axes = [k for k in data.rows[0]["params"] if not k.startswith(("window.", "model.class"))]
    todo = {
        "pareto": lambda p: _pareto_plot(data, p),
        "heatmap": lambda p: plots.heatmap(data.rows, axes, data.metric, p),
        "slices": lambda p: None if "heatmap" in drawn else plots.param_slices(data.rows, axes, data.metric, p),
        "search": lambda p: plots.search_history(data.rows, data.metric, data.grid.get("direction") or "max", p),
        "top_returns": lambda p: plots.top_returns(dict(list(data.series.items())[:plots.TOP_N]), p),
        "windows": lambda p: plots.window_metrics(dict(list(data.windows.items())[:10]), data.metric, p),
        "stage_times": lambda p: plots.stage_times({r.get("run_name") or r["run_id"]: r["metrics"]
                                                    for r in data.rows}, p),
        "pbo": lambda p: _pbo_plot(data, p),
        "importance": lambda p: None if data.importance is None else importance.plot_importance(
            data.importance, p, short_axes(data)),
    }
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, Path] = {}
    for name, fn in todo.items():
        try:
            path = fn(out / f"{name}.png")
        except Exception as e:  # noqa: BLE001 - a failed plot loses only that plot
            logger.warning("plots: grid %s: no %s plot: %s", data.pool, name, e)
            path = None
        if path is not None:
            drawn[name] = path
    return drawn


def _pareto_plot(data: GridData, path: Path) -> Path | None:
    """The Pareto front of a pool ranked by several objectives (the first two drawn); None for one objective."""
    objectives = data.grid.get("pareto_over") or []
    if len(objectives) < 2 or not data.rows:
        return None
    from qlib_ext.analysis.pareto import plot_front

    names = [o["metric"] for o in objectives]
    points = [[r["metrics"].get(m, (r.get("stats") or {}).get(m)) for m in names] for r in data.rows]
    labels = [f"#{i} {r.get('run_name') or ''}"[:40] for i, r in enumerate(data.rows, 1)]
    return plot_front(points, [r.get("front", 1) for r in data.rows], names, [o["direction"] for o in objectives],
                      labels, path, title=f"{data.pool}: Pareto front")


def _pbo_plot(data: GridData, path: Path) -> Path | None:
    try:
        from qlib_ext.analysis import stats
    except ImportError:
        return None
    if len(data.series) < 2:
        return None
    import pandas as pd

    matrix = pd.concat(data.series, axis=1).dropna()
    blocks = int((data.grid.get("pbo") or {}).get("blocks") or 8)
    if len(matrix) < 2 * blocks:
        return None
    result = stats.pbo_cscv(matrix.to_numpy(), blocks=blocks)
    return plots.pbo_figure(result.logits, result.is_sharpe, result.oos_sharpe, result.pbo, path)


def grid_metrics(data: GridData) -> dict[str, float]:
    """The grid run's metrics: tasks, done, failed, trials, best objective (under its column name), PBO, DSR."""
    best = data.rows[0] if data.rows else None
    out = {"tasks": sum(data.counts.values()), "done": data.counts.get("done", 0),
           "failed": data.counts.get("failed", 0), "trials": data.grid.get("trials", len(data.rows))}
    if best is not None:
        value = best["metrics"].get(data.metric)
        out[f"best.{data.metric}"] = value
        out[mlflow_ui.metric_column(data.metric)] = value
        dsr = (best.get("stats") or {}).get("dsr", best["metrics"].get("dsr"))
        out["best.dsr"] = dsr
    out["pbo"] = (data.grid.get("pbo") or {}).get("pbo")
    if data.grid.get("pareto_over"):
        out["pareto_front"] = sum(1 for r in data.rows if r.get("front") == 1)
    if data.importance is not None:
        out.update(importance.metrics_of(data.importance, short_axes(data)))
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not math.isnan(v)}


def finish_grid(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
                metric: str | None = None, plots: bool = True) -> GridData | None:
    """Update the grid run: metrics, config runs' means, plots; end it once the pool is finished.

    ``plots=False`` leaves out the grid plots, the return series they are drawn from and the hyperparameter
    importances (the slow part: one artifact download per row, fANOVA, a dozen figures): ``qlib-ext run``
    prints its summary first and has them done by a later call in a background process
    (``qlib_ext.session.grid_plots``).
    Never raises: a summary must not fail a run that succeeded (logs a WARNING, returns None).
    """
    try:
        data = collect(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, full=plots)
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=data.mlflow_uri)
        if data.runs is None:  # a pool Qlib submitted: no grid run, its task runs' figures all the same
            if plots:
                log_run_figures(client, data)
            return data
        _log_metrics(client, data.runs.grid_run_id, grid_metrics(data))
        mlflow_ui.save_view(client, data.experiment_id, pool, data.metric, data.runs.axes)  # the printed links
        for row in data.rows:
            run_id = data.runs.config_runs.get(row.get("config_id") or "") if row.get("runs") else None
            if run_id:
                metrics = {k: v for k, v in row["metrics"].items() if _number(v)}
                metrics.update(mlflow_ui.headline_metrics(metrics))
                _log_metrics(client, run_id, metrics)
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, "FINISHED")
        if plots:
            with tempfile.TemporaryDirectory(prefix="qlib-ext-plots-") as tmp:
                if draw(data, Path(tmp) / "plots"):
                    client.log_artifacts(data.runs.grid_run_id, str(Path(tmp) / "plots"), "plots")
            log_run_figures(client, data)
        finished = not data.counts.get("waiting") and not data.counts.get("running")
        if finished and client.get_run(data.runs.grid_run_id).info.status == "RUNNING":  # keep the first end time
            status = "FAILED" if data.counts.get("failed") and not data.counts.get("done") else "FINISHED"
            client.set_terminated(data.runs.grid_run_id, status)
            client.set_tag(data.runs.grid_run_id, Tag.KIND, mlflow_ui.KIND_GRID)
        return data
    except Exception as e:  # noqa: BLE001 - the grid summary is cosmetic; task results stand
        logger.warning("grid %s: summary not updated: %s", pool, e)
        return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])
