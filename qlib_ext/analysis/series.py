"""The daily series and model diagnostics a worker stores in its committed result, as plain BSON.

The leaderboard computes Sharpe, PSR, DSR, PBO and the sanity flags from these alone, without
downloading or unpickling MLflow artifacts. Layout of ``result[VALIDITY]``::

    {"returns": {"dates": ["2016-03-28", ...], "values": [0.0012, ...]},  # return - bench - cost
     "ic": {"dates": [...], "values": [...]},   # daily IC (SigAnaRecord's, else from pred.pkl and label.pkl)
     "trade_days": 61,          # days with turnover > 0 in the backtest
     "pred_flat_share": 0.0,    # share of days whose predictions are (nearly) constant across stocks
     "best_iteration": 27,      # LightGBM's best iteration (None for other models; informative, no flag)
     "label_horizon": 2,        # days the label looks ahead (from the handler's label expression)
     "label_gap_days": 1,       # trading days from the last train/valid day to the test start (leak if < horizon)
     "flags": ["nan_ic", ...]}  # the per-run sanity flags (qlib_ext.analysis.flags)

One float and one ISO date per day: ten years of two series is about 150 kB, far below MongoDB's
16 MB document limit. ``returns`` is the series behind Qlib's ``1day.excess_return_with_cost.*``
metrics (``report_normal_1day.pkl`` of ``PortAnaRecord``: ``return - bench - cost``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

VALIDITY = "validity"
"""Key of the validity block in a committed result."""

REPORT_ARTIFACT = "portfolio_analysis/report_normal_1day.pkl"
"""PortAnaRecord's daily account report (columns return, bench, cost, turnover, ...)."""

IC_ARTIFACT = "sig_analysis/ic.pkl"
"""SigAnaRecord's daily IC series."""

FLAT_PRED_STD = 1e-12
"""A day whose predictions have a cross-sectional std at or below this counts as flat (no ranking)."""


def plain_series(series: Any) -> dict[str, list]:
    """A pandas Series indexed by date as ``{"dates": [ISO dates], "values": [floats, NaN -> None]}``."""
    dates = [ts.strftime("%Y-%m-%d") for ts in series.index]
    values = [None if not math.isfinite(v) else float(v) for v in series.astype(float).tolist()]
    return {"dates": dates, "values": values}


def to_pandas(block: dict | None) -> Any:
    """The inverse of :func:`plain_series`: a float Series on a DatetimeIndex (None -> NaN); None for None."""
    import pandas as pd

    if not block or not block.get("dates"):
        return None
    values = [math.nan if v is None else v for v in block["values"]]
    return pd.Series(values, index=pd.to_datetime(block["dates"]), dtype=float)


def _load(recorder: Any, name: str) -> Any:
    try:
        return recorder.load_object(name)
    except Exception as e:  # noqa: BLE001 - the run has no such record (no PortAnaRecord, no SigAnaRecord)
        logger.debug("validity: run %s has no %s (%s)", recorder.id, name, e)
        return None


def collect(recorder: Any, task: dict, model: Any = None) -> dict:
    """The validity block of one finished task (see the module docstring); missing parts are absent."""
    out: dict[str, Any] = {}
    report = _load(recorder, REPORT_ARTIFACT)
    if report is not None:
        out["returns"] = plain_series(report["return"] - report["bench"] - report["cost"])
        if "turnover" in report:
            out["trade_days"] = int((report["turnover"].fillna(0) > 0).sum())
    ic = _load(recorder, IC_ARTIFACT)
    pred = _load(recorder, "pred.pkl")
    if pred is not None and len(pred):
        std = pred.iloc[:, 0].groupby(level="datetime").std(ddof=0).fillna(0.0)
        out["pred_flat_share"] = float((std <= FLAT_PRED_STD).mean())
        if ic is None:  # no SigAnaRecord: the signal check still needs the daily IC
            label = _load(recorder, "label.pkl")
            ic = daily_ic(pred, label) if label is not None else None
    if ic is not None:
        out["ic"] = plain_series(ic)
    if model is not None:
        out["best_iteration"] = best_iteration(model)
    out.update(label_gap(task))
    return out


def daily_ic(pred: Any, label: Any) -> Any:
    """Pearson correlation of prediction and label across stocks, per day (what SigAnaRecord's ``ic.pkl`` holds)."""
    import pandas as pd

    frame = pd.concat({"pred": pred.iloc[:, 0], "label": label.iloc[:, 0]}, axis=1).dropna()
    return frame.groupby(level="datetime").apply(lambda d: d["pred"].corr(d["label"])).astype(float)


def best_iteration(model: Any) -> int | None:
    """LightGBM's best iteration (trees when early stopping never ran); None for other models."""
    booster = getattr(model, "model", None)
    if booster is None or not hasattr(booster, "num_trees"):
        return None
    best = int(getattr(booster, "best_iteration", 0) or 0)
    return best if best > 0 else int(booster.current_iteration())


def label_gap(task: dict) -> dict[str, int]:
    """``label_horizon`` of the task's handler and ``label_gap_days`` between its last pre-test
    segment end and its test start, in trading days of Qlib's calendar (needs ``qlib.init``)."""
    from qlib_ext.analysis.flags import label_horizon

    dataset = (task.get("dataset") or {}).get("kwargs") or {}
    handler = dataset.get("handler")
    horizon = label_horizon(handler) if isinstance(handler, dict) else None
    segments = dataset.get("segments") or {}
    ends = [seg[1] for key, seg in segments.items() if key != "test" and isinstance(seg, (list, tuple))]
    test = segments.get("test")
    if horizon is None or not ends or not isinstance(test, (list, tuple)):
        return {}
    try:
        from qlib.data import D

        cal = D.calendar(freq="day")
    except Exception as e:  # noqa: BLE001 - no calendar, no check
        logger.debug("validity: no calendar for the label gap (%s)", e)
        return {"label_horizon": horizon}
    import numpy as np
    import pandas as pd

    last_end = max(pd.Timestamp(e) for e in ends)
    gap = int(np.searchsorted(cal, pd.Timestamp(test[0])) - np.searchsorted(cal, last_end, side="right")) + 1
    return {"label_horizon": horizon, "label_gap_days": gap}
