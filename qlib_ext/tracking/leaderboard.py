"""The leaderboard: committed results of a pool joined with their FINISHED MLflow runs."""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from collections import defaultdict
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_METRIC = "IC"
"""Metric the leaderboard sorts by unless ``--metric`` says otherwise (higher is better)."""


def _search_pool_runs(client: Any, experiment_id: str, pool: str) -> dict[str, Any]:
    # sqlite-backed MLflow rejects max_results above 50,000 (Qlib asks for 100,000): page instead.
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`qlib_ext.pool` = '{pool}'",
                                  max_results=5000, page_token=token)
        runs.update({r.info.run_id: r for r in page})
        token = page.token
        if not token:
            return runs


def leaderboard(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
                metric: str = DEFAULT_METRIC, top: int | None = None, db_name: str | None = None) -> list[dict]:
    """Rows best first: one per committed task whose MLflow run FINISHED; rolling windows of one
    configuration become one row with the metric's mean/std over windows and on the stitched
    out-of-sample predictions. A strategy sweep shows one row per backtest (model x strategy); its
    training run is not a row, and windows group per configuration *and* strategy point (each
    point has its own ``config_id``)."""
    import mlflow

    from qlib_ext import defaults
    from qlib_ext.pool.manager import GridTaskManager, load_pool_meta, open_db

    db = open_db(mongo_url, db_name or defaults.TASK_DB_NAME)
    meta = load_pool_meta(db, pool)
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri or meta["mlflow_uri"])
    exp = client.get_experiment_by_name(meta["experiment"])
    runs = _search_pool_runs(client, exp.experiment_id, pool) if exp else {}
    rows = []
    results = GridTaskManager(pool, db).results()
    committed = {str(res["_id"]): res.get("run_id") for res in results}
    for res in results:
        run = runs.get(res.get("run_id"))
        if run is None or run.info.status != "FINISHED" or not _ranked(res["meta"], committed):
            continue
        rows.append({
            "run_id": run.info.run_id, "run_name": run.info.run_name, "task_id": str(res["_id"]),
            "config_id": res["meta"].get("config_id"), "window": (res["meta"].get("window") or {}).get("index"),
            "params": dict(sorted(run.data.params.items())), "metrics": dict(run.data.metrics),
            "worker": res.get("worker"),
        })
    rows = _aggregate_windows(client, rows, metric)
    rows.sort(key=lambda r: _sort_key(r["metrics"].get(metric)))
    return rows[:top] if top else rows


def _ranked(meta: dict, committed: dict[str, str | None]) -> bool:
    """Whether a committed task is a leaderboard row: a training task with a strategy sweep is
    represented by its backtests (each has model and strategy params), and a backtest only counts
    when its training run is the one its training task committed (a retried training task queues
    backtests of its own)."""
    if meta.get("sweep"):
        return False
    parent_task = meta.get("parent_task_id")
    return parent_task is None or committed.get(parent_task, meta.get("parent_run_id")) == meta.get("parent_run_id")


def _sort_key(value: float | None) -> tuple[int, float]:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return (1, 0.0) if missing else (0, -value)


def _aggregate_windows(client: Any, rows: list[dict], metric: str) -> list[dict]:
    """Collapse the rolling windows of each configuration into one row."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["config_id"] if row["window"] is not None else row["run_id"]].append(row)
    out = []
    for members in groups.values():
        if len(members) == 1 and members[0]["window"] is None:
            out.append(members[0])
            continue
        values = [m["metrics"][metric] for m in members if metric in m["metrics"]]
        first = min(members, key=lambda m: m["window"])
        params = {k: v for k, v in first["params"].items() if not k.startswith("window.")}
        metrics = {metric: statistics.fmean(values) if values else None,
                   f"{metric}.std": statistics.stdev(values) if len(values) > 1 else 0.0,
                   "windows": len(members)}
        stitched = stitched_ic([m["run_id"] for m in members], client)
        if stitched is not None:
            metrics["stitched.IC"] = stitched
        out.append({"run_id": first["run_id"], "run_name": first["run_name"].rsplit(" w", 1)[0],
                    "task_id": first["task_id"], "config_id": first["config_id"], "window": None,
                    "params": params, "metrics": metrics, "runs": [m["run_id"] for m in members],
                    "worker": first["worker"]})
    return out


def stitched_ic(run_ids: list[str], client: Any) -> float | None:
    """Mean daily IC of the windows' out-of-sample predictions concatenated in time."""
    import pandas as pd

    preds, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            try:
                preds.append(pd.read_pickle(client.download_artifacts(run_id, "pred.pkl", tmp)))
                labels.append(pd.read_pickle(client.download_artifacts(run_id, "label.pkl", tmp)))
            except Exception as e:  # a run without SignalRecord artifacts has nothing to stitch
                logger.info("report: no predictions for run %s (%s)", run_id, e)
                return None
    pred = pd.concat(preds).iloc[:, 0]
    label = pd.concat(labels).iloc[:, 0]
    pred = pred[~pred.index.duplicated(keep="last")]
    label = label[~label.index.duplicated(keep="last")]
    frame = pd.concat({"pred": pred, "label": label}, axis=1).dropna()
    daily = frame.groupby(level="datetime").apply(lambda d: d["pred"].corr(d["label"]))
    return float(daily.mean()) if len(daily) else None


def format_table(rows: list[dict], metric: str) -> str:
    """A plain-text leaderboard: rank, run name, the metric, a few key metrics, the run id."""
    if not rows:
        return "no finished runs yet"
    extra = ["ICIR", "1day.excess_return_with_cost.annualized_return"]
    header = ["#", "run", metric, *[e for e in extra if e != metric], "run_id"]
    lines = [header]
    for i, r in enumerate(rows, 1):
        vals = [_fmt(r["metrics"].get(m)) for m in [metric, *[e for e in extra if e != metric]]]
        lines.append([str(i), r["run_name"] or "", *vals, r["run_id"]])
    widths = [max(len(str(row[c])) for row in lines) for c in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def mlflow_ui_command(mlflow_uri: str) -> str:
    """The exact command that opens these runs in the MLflow UI."""
    if mlflow_uri.startswith("http"):
        return f"open {mlflow_uri} in a browser"
    return f"mlflow ui --backend-store-uri {mlflow_uri}"

