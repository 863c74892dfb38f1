"""The leaderboard: committed results of a pool joined with their FINISHED MLflow runs, ranked by the
grid's objective, with the numbers that say whether the ranking means anything (see docs/validity.md).

Series (daily excess return with cost, daily IC) come from the committed results in the pool
(``result["validity"]``, written by the worker); MLflow gives run status, names, params and every
logged metric. :func:`leaderboard_frame` is the entry point for notebooks and reports.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from qlib_ext import defaults
from qlib_ext.analysis import flags as fl
from qlib_ext.analysis.grid_stats import STAT_KEYS, annotate
from qlib_ext.analysis.pareto import choose_objectives, front_cell, front_line, mark_fronts
from qlib_ext.analysis.series import VALIDITY, to_pandas
from qlib_ext.errors import ConfigError
from qlib_ext.pool.record import SIGNAL_METRICS, Doc, Metric, Outcome, Tag, TaskMeta
from qlib_ext.tables import text_table

logger = logging.getLogger(__name__)

DEFAULT_METRIC = Metric.IC
"""Metric a model grid ranks by when ``grid.objective`` does not say (higher is better)."""

SWEEP_METRIC = Metric.IR
"""Metric a strategy sweep ranks by by default: its rows share one model, so IC cannot tell them apart."""

COMPARED_METRICS = (*SIGNAL_METRICS, Metric.ANN_RETURN, Metric.IR, Metric.MAX_DRAWDOWN)
"""Metrics that must all be equal for an axis to count as having changed nothing."""

DSR_TAG = Tag.DSR
"""MLflow tag ``leaderboard --tag-runs`` sets: the row's Deflated Sharpe Ratio."""

TABLE_METRICS = (Metric.IC, Metric.ICIR, Metric.ANN_RETURN)
"""Metric columns of the text table besides the ranking metric and the validity columns."""


def _search_pool_runs(client: Any, experiment_id: str, pool: str) -> dict[str, Any]:
    # sqlite-backed MLflow rejects max_results above 50,000 (Qlib asks for 100,000): page instead.
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{Tag.POOL}` = '{pool}'",
                                  max_results=5000, page_token=token)
        runs.update({r.info.run_id: r for r in page})
        token = page.token
        if not token:
            return runs


def leaderboard(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
                metric: str | None = None, top: int | None = None, db_name: str | None = None,
                trials: int | None = None, blocks: int = defaults.PBO_BLOCKS,
                objectives: Sequence[str] = ()) -> list[dict]:
    """Rows best first (plain data, no series); see :func:`ranked` for what a row holds."""
    rows, _ = ranked(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, db_name=db_name,
                     trials=trials, blocks=blocks, objectives=objectives)
    return rows[:top] if top else rows


def leaderboard_frame(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None,
                      metric: str | None = None, trials: int | None = None,
                      blocks: int = defaults.PBO_BLOCKS) -> tuple[Any, dict]:
    """The leaderboard as a pandas DataFrame (one row per configuration, best first) and the grid's numbers.

    Args:
        pool: pool name.
        mongo_url: task store URL (None: the embedded store).
        mlflow_uri: tracking URI (None: the one recorded at submit).
        metric: metric to rank by, matched case-insensitively (None: ``grid.objective``, else
            the sweep/IC default).
        trials: configurations tried outside this pool, added to N for the DSR.
        blocks: S, the number of CSCV blocks for PBO.

    Returns:
        ``(frame, grid)``: columns ``rank, run_name, <metric>, sharpe, psr, dsr, min_trl, T, skew,
        kurtosis, flags`` (a comma-joined string), every other metric, then ``config_id, run_id,
        windows``; ``grid`` is ``{"pool", "metric", "direction", "rows", "trials", "trials_in_pool",
        "trials_declared", "failed_tasks", "pbo": {...}}``.

    Raises:
        ConfigError: ``metric`` is not one the runs logged (the message lists them).
    """
    import pandas as pd

    rows, grid = ranked(pool, mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric=metric, trials=trials,
                        blocks=blocks)
    records = []
    for i, r in enumerate(rows, 1):
        rec = {"rank": i, "run_name": r["run_name"], grid["metric"]: r["metrics"].get(grid["metric"])}
        if "front" in r:  # several objectives: 1 = on the Pareto front
            rec["front"] = r["front"]
        rec.update({k: r["stats"].get(k) for k in STAT_KEYS})
        rec["flags"] = ",".join(r["flags"])
        rec.update({k: v for k, v in r["metrics"].items() if k not in rec})
        rec.update({"config_id": r["config_id"], "run_id": r["run_id"], "windows": r["metrics"].get("windows")})
        records.append(rec)
    return pd.DataFrame.from_records(records), grid


def ranked(pool: str, *, mongo_url: str | None = None, mlflow_uri: str | None = None, metric: str | None = None,
           db_name: str | None = None, trials: int | None = None,
           blocks: int = defaults.PBO_BLOCKS, objectives: Sequence[str] = ()) -> tuple[list[dict], dict]:
    """Rows best first and the grid's numbers.

    A row is one committed task whose MLflow run FINISHED; rolling windows of one configuration
    become one row (every metric's mean over windows, ``<metric>.std``, and the stitched
    out-of-sample series). A strategy sweep shows one row per backtest (model x strategy); its
    training run is not a row. Each row: ``run_id, run_name, task_id, config_id, window, params,
    metrics, stats`` (Sharpe, PSR, DSR, MinTRL, T, skew, kurtosis of the daily excess return with
    cost), ``flags`` and ``worker`` (``runs`` for a rolling row).

    Several objectives (``objectives``: ``METRIC[:max|min]`` each, or the pool's ``grid.objective`` list
    when neither they nor ``metric`` are given): rows are sorted by Pareto front (``front``: 1 = not
    dominated), then by the first objective; the grid's numbers then hold ``objectives``.
    """
    import mlflow

    from qlib_ext.pool.database import load_pool_meta, open_db
    from qlib_ext.pool.manager import GridTaskManager

    db = open_db(mongo_url, db_name)
    meta = load_pool_meta(db, pool)
    tm = GridTaskManager(pool, db)
    results = tm.results()
    uri, experiment = mlflow_uri or meta.mlflow_uri, meta.experiment
    if meta.qlib_made and results:  # no metadata: each result says where its run is
        uri, experiment = uri or results[0].get(Outcome.TRACKING_URI), results[0].get(Outcome.EXPERIMENT)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment or "")
    runs = _search_pool_runs(client, exp.experiment_id, pool) if exp else {}
    rows = _rows(results, runs)
    rows = _aggregate_windows(client, rows)
    objective = meta.objective or {}
    multi = choose_objectives(rows, objectives, [] if metric else meta.objectives or [], pool)
    name, direction = multi[0] if len(multi) == 1 else _choose_metric(rows, metric, objective, pool)
    grid = annotate(rows, trials=trials, blocks=blocks, failed=tm.counts().get("failed", 0))
    _mark_pruned(rows, tm)
    if len(multi) > 1:
        name, direction = multi[0]
        mark_fronts(rows, multi, _value)
        grid["pareto_over"] = [{"metric": m, "direction": d} for m, d in multi]
    rows.sort(key=lambda r: (r["pruned"], r.get("front", 0), _sort_key(_value(r, name), direction)))
    for r in rows:
        for internal in ("returns", "compare", "validity"):
            r.pop(internal, None)
        r["metrics"].update({k: v for k, v in r["stats"].items() if k in ("sharpe", "psr", "dsr")})
    return rows, {"pool": pool, "metric": name, "direction": direction, "rows": len(rows),
                  "mlflow_uri": uri, **grid}


def _mark_pruned(rows: list[dict], tm: Any) -> None:
    """A configuration a search pruned (some of its windows are ``pruned`` in the pool) ranks after
    every complete one, flagged ``pruned``: its mean covers only its first windows."""
    pruned = {TaskMeta.from_dict(block).config_id for block in tm.metas("pruned")}
    for r in rows:
        r["pruned"] = r.get("config_id") in pruned
        if r["pruned"]:
            r["flags"] = sorted({*(r.get("flags") or []), "pruned"})


def _rows(results: list[dict], runs: dict[str, Any]) -> list[dict]:
    committed = {str(res[Doc.ID]): res.get(Outcome.RUN_ID) for res in results}
    rows = []
    for res in results:
        run = runs.get(res.get(Outcome.RUN_ID) or "")
        meta = TaskMeta.from_dict(res["meta"])
        if run is None or run.info.status != "FINISHED" or not _ranked(meta, committed):
            continue
        validity = res.get(VALIDITY) or {}
        coords = dict(meta.coords)
        if meta.model:
            coords["model"] = meta.model
        metrics = dict(run.data.metrics)
        rows.append({
            "run_id": run.info.run_id, "run_name": run.info.run_name, "task_id": str(res[Doc.ID]),
            "config_id": meta.config_id, "window": (meta.window or {}).get("index"),
            "params": dict(sorted(run.data.params.items())), "metrics": metrics, Doc.WORKER: res.get(Doc.WORKER),
            "coords": coords, "validity": validity, "returns": to_pandas(validity.get("returns")),
            "flags": fl.run_flags(validity, metrics, rolling=meta.window is not None),
            "kind": meta.kind, "parent_run_id": meta.parent_run_id,
            "trial": _trial(run), "artifacts": {run.info.run_id: res.get(Outcome.ARTIFACTS)},
        })
    _inherit_model_checks(rows, results)
    return rows


def _trial(run: Any) -> int | None:
    """The search trial number a run was proposed as (``qlib_ext.trial`` tag), None outside a search."""
    value = run.data.tags.get(Tag.TRIAL)
    return int(value) if value not in (None, "") else None


def _inherit_model_checks(rows: list[dict], results: list[dict]) -> None:
    """A sweep backtest's model is its training run's: it inherits that run's model flags."""
    by_run = {res.get(Outcome.RUN_ID): res for res in results}
    for row in rows:
        parent = by_run.get(row.get("parent_run_id"))
        if parent is None:
            continue
        validity = parent.get(VALIDITY) or {}
        if fl.learned_nothing(validity) and fl.LEARNED_NOTHING not in row["flags"]:
            row["flags"].append(fl.LEARNED_NOTHING)


def _ranked(meta: TaskMeta, committed: dict[str, str | None]) -> bool:
    """Whether a committed task is a leaderboard row: a training task with a strategy sweep is
    represented by its backtests (each has model and strategy params), and a backtest only counts
    when its training run is the one its training task committed (a retried training task queues
    backtests of its own)."""
    if meta.sweep:
        return False
    parent_task = meta.parent_task_id
    return parent_task is None or committed.get(parent_task, meta.parent_run_id) == meta.parent_run_id


def _choose_metric(rows: list[dict], metric: str | None, objective: dict, pool: str) -> tuple[str, str]:
    """The ranking metric's exact name (case-insensitive match) and direction.

    Raises:
        ConfigError: an explicit ``metric`` (or ``grid.objective.metric``) no run logged.
    """
    available = sorted({k for r in rows for k in r["metrics"]} | ({"sharpe", "psr", "dsr"} if rows else set()))
    by_lower = {k.lower(): k for k in available}
    wanted: str | None
    if metric:
        wanted, where = metric, "--metric"
    else:
        wanted, where = objective.get("metric"), f"grid.objective.metric of pool {pool}"
    same = wanted is not None and wanted.lower() == str(objective.get("metric", "")).lower()
    direction = _DIRECTIONS.get(str(objective.get("direction", "max")), "max") if same else "max"
    if wanted:
        if rows and wanted.lower() not in by_lower:
            raise ConfigError(f"unknown metric '{wanted}' in {where}; the runs logged: {', '.join(available)}")
        return by_lower.get(wanted.lower(), wanted), direction
    sweep = any(r.get("kind") == "backtest" for r in rows)
    for candidate in ([SWEEP_METRIC] if sweep else []) + [DEFAULT_METRIC, SWEEP_METRIC, "sharpe"]:
        if candidate.lower() in by_lower:
            return by_lower[candidate.lower()], "max"
    return DEFAULT_METRIC, "max"


_DIRECTIONS = {"max": "max", "maximize": "max", "min": "min", "minimize": "min"}


def _value(row: dict, name: str) -> Any:
    value = row["metrics"].get(name)
    return row["stats"].get(name) if value is None and name in STAT_KEYS else value


def _sort_key(value: float | None, direction: str = "max") -> tuple[int, float]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (1, 0.0)
    return (0, -value if direction == "max" else value)


def _aggregate_windows(client: Any, rows: list[dict]) -> list[dict]:
    """Collapse the rolling windows of each configuration into one row."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["config_id"] if row["window"] is not None else row["run_id"]].append(row)
    out = []
    for members in groups.values():
        if len(members) == 1 and members[0]["window"] is None:
            members[0]["compare"] = _compared(members[0]["metrics"])
            out.append(members[0])
            continue
        out.append(_window_row(client, sorted(members, key=lambda m: m["window"])))
    return out


def _window_row(client: Any, members: list[dict]) -> dict:
    """One row for a configuration's windows: mean and std of every metric, the stitched series."""
    first = members[0]
    metrics: dict[str, Any] = {}
    for key in sorted({k for m in members for k in m["metrics"]}):
        values = [m["metrics"][key] for m in members if _number(m["metrics"].get(key))]
        metrics[key] = statistics.fmean(values) if values else None
        metrics[f"{key}.std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    metrics["windows"] = len(members)
    returns = _stitch([m["returns"] for m in members])
    ic = _stitch([to_pandas(m["validity"].get("ic")) for m in members])
    if ic is not None and len(ic.dropna()):
        metrics["stitched.IC"] = float(ic.mean())
        metrics["stitched.ICIR"] = float(ic.mean() / ic.std()) if ic.std() > 0 else None
    else:
        stitched = stitched_ic([m["run_id"] for m in members], client, _artifacts(members))
        if stitched is not None:
            metrics["stitched.IC"] = stitched
    params = {k: v for k, v in first["params"].items() if not k.startswith("window.")}
    return {"run_id": first["run_id"], "run_name": first["run_name"].rsplit(" w", 1)[0],
            "task_id": first["task_id"], "config_id": first["config_id"], "window": None,
            "params": params, "metrics": metrics, "runs": [m["run_id"] for m in members],
            Doc.WORKER: first[Doc.WORKER], "coords": first["coords"], "returns": returns, "kind": first.get("kind"),
            "trial": first.get("trial"), "artifacts": _artifacts(members),
            "validity": {}, "flags": _window_flags(members, ic),
            "compare": _compared(metrics)}


def _window_flags(members: list[dict], ic: Any) -> list[str]:
    """The windows' flags, with ``learned_nothing`` decided on the stitched daily IC (one short window's
    IC cannot be told from zero even for a model that learned) when every window stored its IC."""
    flags = {f for m in members for f in m["flags"]}
    if ic is None:
        return sorted(flags)
    days = [max(len((m["validity"].get("ic") or {}).get("values") or []), 1) for m in members]
    flat = sum(d * float(m["validity"].get("pred_flat_share") or 0.0) for d, m in zip(days, members, strict=True))
    block = {"pred_flat_share": flat / sum(days), "label_horizon": members[0]["validity"].get("label_horizon"),
             "ic": {"values": [None if math.isnan(v) else float(v) for v in ic.tolist()]}}
    flags.discard(fl.LEARNED_NOTHING)
    return sorted(flags | ({fl.LEARNED_NOTHING} if fl.learned_nothing(block) else set()))


def _compared(metrics: dict) -> dict:
    """The metrics two configurations must share for an axis between them to have changed nothing."""
    return {k: metrics[k] for k in COMPARED_METRICS if k in metrics}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def _stitch(parts: list[Any]) -> Any:
    """Windows' daily series concatenated in time (a later window wins a shared day); None if one is missing."""
    import pandas as pd

    if not parts or any(p is None for p in parts):
        return None
    series = pd.concat(parts)
    return series[~series.index.duplicated(keep="last")].sort_index()


def _artifacts(members: list[dict]) -> dict:
    """``{run id: stored artifact digests}`` of a configuration's window rows."""
    return {k: v for m in members for k, v in (m.get("artifacts") or {}).items()}


def stitched_ic(run_ids: list[str], client: Any, artifacts: dict | None = None) -> float | None:
    """Mean daily IC of the windows' out-of-sample predictions concatenated in time, from the runs'
    artifacts: the fallback for results committed before workers stored their daily IC. ``artifacts``:
    each run's committed digests (``Outcome.ARTIFACTS``), checked before a file is read."""
    import pandas as pd

    from qlib_ext.errors import ArtifactTampered, TaskDecodeError
    from qlib_ext.tracking.artifacts import digest_map, download_checked, read_frame

    preds, labels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            digests = digest_map((artifacts or {}).get(run_id))
            try:  # never pd.read_pickle: an artifact is not trusted code
                preds.append(read_frame(download_checked(client, run_id, "pred.pkl", tmp, digests)))
                labels.append(read_frame(download_checked(client, run_id, "label.pkl", tmp, digests)))
            except (TaskDecodeError, ArtifactTampered) as e:
                logger.warning("leaderboard: refused an artifact of run %s: %s", run_id, e)
                return None
            except Exception as e:  # noqa: BLE001 - a run without SignalRecord artifacts has nothing to stitch
                logger.warning("leaderboard: no stitched IC over runs %s: run %s has no predictions (%s: %s)",
                               ", ".join(run_ids), run_id, type(e).__name__, e)
                return None
    pred = pd.concat(preds).iloc[:, 0]
    label = pd.concat(labels).iloc[:, 0]
    pred = pred[~pred.index.duplicated(keep="last")]
    label = label[~label.index.duplicated(keep="last")]
    frame = pd.concat({"pred": pred, "label": label}, axis=1).dropna()
    daily = frame.groupby(level="datetime").apply(lambda d: d["pred"].corr(d["label"]))
    return float(daily.mean()) if len(daily) else None


def format_table(rows: list[dict], grid: dict | str | None = None, top: int | None = None) -> str:
    """A plain-text leaderboard: N tried, the ranking metric, key metrics, Sharpe/PSR/DSR, flags, PBO.

    ``grid`` is what :func:`ranked` returns (a bare metric name is accepted too)."""
    grid = {"metric": grid, "direction": "max"} if isinstance(grid, str) else grid or {
        "metric": DEFAULT_METRIC, "direction": "max"}
    if not rows:
        return "no finished runs yet"
    metric = grid["metric"]
    shown = rows[:top] if top else rows
    chosen = [o["metric"] for o in grid.get("pareto_over") or []] or [metric]
    extra = [m for m in TABLE_METRICS if m not in chosen]
    std = f"{metric}.std" if any(f"{metric}.std" in r["metrics"] for r in shown) else None
    front = ["front"] if len(chosen) > 1 else []
    header = ["#", "run", *front, chosen[0], *([std] if std else []), *chosen[1:], *[_SHORT.get(m, m) for m in extra],
              "Sharpe", "PSR", "DSR", "T", "flags", "run_id"]
    lines = [header]
    for i, r in enumerate(shown, 1):
        st = r.get("stats") or {}
        vals = [_fmt(_value(r, m)) for m in [chosen[0], *([std] if std else []), *chosen[1:], *extra]]
        lines.append([str(i), r["run_name"] or "", *([front_cell(r)] if front else []), *vals,
                      _fmt(st.get("sharpe")), _fmt(st.get("psr")), _fmt(st.get("dsr")), _fmt(st.get("T")),
                      ",".join(r.get("flags") or []) or "-", r["run_id"]])
    head = [_trials_line(grid, len(rows), len(shown)), *([front_line(grid, rows)] if front else [])]
    return "\n".join([*head, text_table(lines), _pbo_line(grid)])


_SHORT = {Metric.ANN_RETURN: "ann.return", Metric.IR: "IR", Metric.MAX_DRAWDOWN: "MDD"}


def _trials_line(grid: dict, total: int, shown: int) -> str:
    if "trials" not in grid:
        return f"ranked by {grid['metric']} ({grid['direction']})"
    declared = f" + {grid['trials_declared']} declared with --trials" if grid.get("trials_declared") else ""
    failed = f"; {grid['failed_tasks']} failed tasks not counted" if grid.get("failed_tasks") else ""
    cut = f"; showing {shown} of {total}" if shown < total else ""
    return (f"{grid['trials']} configurations tried (N for the DSR: {grid['trials_in_pool']} with returns in this "
            f"pool{declared}{failed}); ranked by {grid['metric']} ({grid['direction']}){cut}")


def _pbo_line(grid: dict) -> str:
    """The PBO line under the table, saying in words what the number means for this grid."""
    p = grid.get("pbo") or {}
    if p.get("indistinguishable"):
        return indistinguishable_words(p)
    if p.get("pbo") is None:
        return f"PBO: not computed ({p.get('error', 'no returns')})"
    return (f"PBO (CSCV, S={p['blocks']}, {p['splits']} splits, {p['strategies']} configurations x {p['days']} days): "
            f"{p['pbo']:.3f}; OOS-vs-IS Sharpe slope {_fmt(p['slope'])}; P[OOS loss] {p['prob_oos_loss']:.3f}\n"
            f"  {pbo_words(p['pbo'])}")


def pbo_words(value: float) -> str:
    """What a PBO means for the grid, in words (thresholds in docs/validity.md)."""
    share = f"in {value:.0%} of the in-sample/out-of-sample splits the configuration that looked best in-sample"
    if value < 0.1:
        return f"{share} fell below the out-of-sample median: picking the best of this grid holds up."
    if value < 0.4:
        return f"{share} fell below the out-of-sample median: picking the best mostly holds up, not always."
    if value <= 0.6:
        return f"{share} fell below the out-of-sample median: picking the best of this grid is a coin toss."
    return (f"{share} fell below the out-of-sample median: the selection is overfit, what looks best in-sample "
            f"was lucky there and tends to do worse than the rest out of sample.")


def indistinguishable_words(p: dict) -> str:
    """The PBO line of a grid whose configurations cannot be told apart."""
    eq = p.get("equality") or {}
    return (f"PBO not shown: the {p.get('strategies')} configurations' returns are indistinguishable over "
            f"{p.get('days')} days (no pair's Sharpe ratios differ: largest |z| {_fmt(eq.get('max_z'))} <= "
            f"{_fmt(eq.get('critical_z'))}, Jobson-Korkie/Memmel test over {eq.get('pairs')} pairs, Bonferroni, "
            f"{eq.get('alpha', 0.05):.0%}; CSCV, S={p.get('blocks')}, would give {_fmt(p.get('cscv_pbo'))}).\n"
            f"  The grid is flat, not overfit: on this test no configuration can be shown better than another, so "
            f"which one is picked does not matter (a longer test may still separate them).")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def tag_flags(rows: list[dict], grid: dict) -> int:
    """Set ``qlib_ext.flags`` (every flag of the row) and ``qlib_ext.dsr`` on each row's runs; returns runs tagged."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=grid["mlflow_uri"])
    n = 0
    for row in rows:
        dsr = (row.get("stats") or {}).get("dsr")
        for run_id in row.get("runs") or [row["run_id"]]:
            client.set_tag(run_id, fl.FLAGS_TAG, ",".join(row.get("flags") or []))
            client.set_tag(run_id, DSR_TAG, "" if dsr is None else f"{dsr:.4f}")
            n += 1
    return n

