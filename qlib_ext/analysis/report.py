"""``qlib-ext report POOL``: one self-contained HTML page per grid, logged to the grid's parent run.

The page holds the grid's numbers (tasks, failures, trials, PBO), the leaderboard with its headline
metrics and axes, the grid plots and the best run's figure, all PNGs embedded as ``data:`` URIs:
one file that opens offline, attaches to a mail and previews in MLflow's artifact viewer.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from qlib_ext.analysis.pareto import front_cell
from qlib_ext.names import check_pool_name
from qlib_ext.pool.record import Metric
from qlib_ext.tracking import mlflow_ui

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
"""File name of the report, on disk and as the grid run's artifact."""

TOP_ROWS = 50
"""Leaderboard rows shown in the report."""

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:0.3em 0 1.2em}h2{margin-top:1.5em}.muted{color:#777}"""

_PLOT_TITLES = {
    "pareto": "Pareto front: configurations no other beats on every objective (grey: dominated)",
    "heatmap": "Objective over the grid's axes",
    "top_returns": "Top configurations: cumulative excess return (with cost)",
    "windows": "Rolling windows: the objective per window",
    "pbo": "Probability of backtest overfitting (CSCV)",
    "slices": "Objective against each axis",
    "search": "Search: the objective of each trial, and the best so far",
    "stage_times": "Time per stage",
    "importance": "What drove the result: hyperparameter importances (fANOVA, PED-ANOVA)",
    "best_run": "Best configuration: returns, IC, turnover",
}


def build(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None, metric: str | None = None,
          out: str | Path | None = None, log: bool = True) -> Path:
    """Write the pool's report and (``log``) attach it to the grid run; return the HTML file's path.

    Args:
        pool: pool name.
        mongo_url: task store URL (None: the embedded store).
        mlflow_uri: tracking URI (None: the one recorded at submit).
        metric: ranking metric (None: the grid's objective / the leaderboard's default).
        out: directory for ``report.html`` (default ``$QLIB_EXT_HOME/reports/<pool>``).
        log: also log it as the grid run's ``report.html`` artifact.
    """
    from qlib_ext import defaults
    from qlib_ext.analysis.grid_run import draw, finish_grid

    check_pool_name(pool)  # before anything is written: the name is a directory below
    data = finish_grid(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric)
    if data is None:  # finish_grid logged why; collect again to raise the real error
        from qlib_ext.analysis.grid_run import collect

        data = collect(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric)
    folder = Path(out) if out else defaults.home() / "reports" / pool
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qlib-ext-report-") as tmp:
        images = draw(data, Path(tmp))
        best = _best_run_png(data, Path(tmp))
        if best is not None:
            images["best_run"] = best
        page = render(data, {k: _data_uri(p) for k, p in images.items()})
    path = folder / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    if log and data.runs is not None:
        import mlflow

        mlflow.MlflowClient(tracking_uri=data.mlflow_uri).log_artifact(data.runs.grid_run_id, str(path))
    return path


def _best_run_png(data: Any, tmp: Path) -> Path | None:
    if not data.rows:
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=data.mlflow_uri)
    try:
        return Path(client.download_artifacts(data.rows[0]["run_id"], "plots/run.png", str(tmp)))
    except Exception as e:  # noqa: BLE001 - runs made before plots existed
        logger.info("report: no plots/run.png for run %s: %s", data.rows[0]["run_id"], e)
        return None


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render(data: Any, images: dict[str, str]) -> str:
    """The report page (``images``: plot name -> data URI)."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>qlib-ext report: {esc(data.pool)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Grid <code>{esc(data.pool)}</code></h1>",
             f"<p class='muted'>written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; ranked by "
             f"<b>{esc(_ranked_by(data))}</b>; MLflow: <code>{esc(data.mlflow_uri)}</code></p>",
             "<h2>Summary</h2>", _summary_table(data)]
    if data.first_error and not data.counts.get("done"):
        parts.append(f"<h2>First error</h2><pre>{esc(data.first_error[-3000:])}</pre>")
    parts += ["<h2>Leaderboard</h2>", _leaderboard(data)]
    if getattr(data, "importance", None) is not None:
        from qlib_ext.analysis.grid_run import short_axes
        from qlib_ext.analysis.importance import format_importance

        parts += ["<h2>What drove the result</h2>",
                  f"<pre>{esc(format_importance(data.importance, short_axes(data)))}</pre>"]
    for name, uri in images.items():
        parts.append(f"<h2>{esc(_PLOT_TITLES.get(name, name))}</h2><img alt='{esc(name)}' src='{uri}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _ranked_by(data: Any) -> str:
    """The ranking metric, or for several objectives each one and that the Pareto front comes first."""
    objectives = data.grid.get("pareto_over") if isinstance(data.grid, dict) else None
    if not objectives:
        return str(data.metric)
    return ("Pareto front over " + ", ".join(f"{o['metric']} ({o['direction']})" for o in objectives)
            + ", then " + str(data.metric))


def _summary_table(data: Any) -> str:
    pbo = (data.grid.get("pbo") or {}) if isinstance(data.grid, dict) else {}
    best = data.rows[0] if data.rows else None
    items = [("tasks", sum(data.counts.values())), *sorted(data.counts.items()),
             ("configurations ranked", len(data.rows)), ("trials (N for the DSR)", data.grid.get("trials", "-")),
             (f"best {data.metric}", best["metrics"].get(data.metric) if best else "-"),
             ("best configuration", best.get("run_name") if best else "-"),
             ("DSR of the best", (best.get("stats") or {}).get("dsr", "-") if best else "-"),
             ("PBO", "indistinguishable (see the leaderboard line)" if pbo.get("indistinguishable")
              else pbo.get("pbo", pbo.get("error", "-")))]
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td class='n'>{_fmt(v)}</td></tr>"
                               for k, v in items) + "</table>"


def _leaderboard(data: Any) -> str:
    if not data.rows:
        return "<p>no finished runs yet</p>"
    axes = list((data.runs.axes if data.runs else {}) or {})
    listed = (data.grid.get("pareto_over") if isinstance(data.grid, dict) else None) or []
    chosen = [o["metric"] for o in listed] or [data.metric]
    metrics = [*chosen, *[m for m in (Metric.IC, Metric.ICIR, Metric.RANK_IC) if m not in chosen]]
    metrics += [m for m in (Metric.ANN_RETURN, Metric.IR, Metric.MAX_DRAWDOWN) if m not in chosen]
    if listed:  # an objective under its short name (IR) already shows Qlib's full one: one column each
        shown = {mlflow_ui.metric_column(m) for m in chosen}
        metrics = chosen + [m for m in metrics[len(chosen):] if mlflow_ui.metric_column(m) not in shown]
    front = ["front"] if len(chosen) > 1 else []
    header = ["#", "run", *front, *[mlflow_ui.metric_column(m) for m in metrics], "DSR", *axes, "flags", "run id"]
    rows = []
    for i, r in enumerate(data.rows[:TOP_ROWS], 1):
        stats = r.get("stats") or {}
        cells = [i, r.get("run_name") or "", *([front_cell(r)] if front else []),
                 *[r["metrics"].get(m, stats.get(m)) for m in metrics], stats.get("dsr"),
                 *[r["params"].get(a, "") for a in axes], ",".join(r.get("flags") or []) or "-", r["run_id"]]
        rows.append("<tr>" + "".join(f"<td class='n'>{_fmt(c)}</td>" if isinstance(c, (int, float))
                                     else f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    more = f"<p class='muted'>{len(data.rows) - TOP_ROWS} more rows</p>" if len(data.rows) > TOP_ROWS else ""
    return f"<table>{head}{''.join(rows)}</table>{more}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))
