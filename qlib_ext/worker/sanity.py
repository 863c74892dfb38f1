"""Results that must not count as done: no predictions, all-NaN predictions, a backtest that never traded.

Qlib records such a run without complaint: a test segment outside the data's calendar gives 0
predictions ("Empty label."), a model that predicts NaN gives NaN scores, and the backtest then
reports figures made from the benchmark alone (an annualised excess return of 0.24 and an information
ratio of 2.28 on zero predictions were seen). The task body calls these checks right after each
record is generated; each raises :class:`~qlib_ext.errors.BadResultError`, which fails the task at
once (it would fail the same way on every attempt) and ends its MLflow run FAILED, so it never
reaches a leaderboard.
"""

from __future__ import annotations

import logging
from typing import Any

from qlib_ext.errors import BadResultError

logger = logging.getLogger(__name__)


def check_record(record: Any, segment: str = "test") -> None:
    """Check what ``record`` just produced (a ``SignalRecord``'s predictions, a ``PortAnaRecord``'s backtest).

    Raises:
        BadResultError: the message says which check failed and what to look at.
    """
    from qlib.workflow.record_temp import PortAnaRecord, SignalRecord

    if isinstance(record, SignalRecord):
        check_predictions(record.load("pred.pkl"), segment)
    elif isinstance(record, PortAnaRecord):
        for freq in getattr(record, "all_freq", []):
            check_trades(record.load(f"report_normal_{freq}.pkl"), freq)


def check_predictions(pred: Any, segment: str = "test") -> None:
    """Refuse empty or all-NaN predictions (a DataFrame or Series of scores)."""
    import pandas as pd

    if pred is None or len(pred) == 0:
        raise BadResultError(f"no predictions: the model predicted 0 rows for the {segment} segment — does the "
                             f"segment lie inside the data's calendar, with instruments that have data there?")
    values = pred if isinstance(pred, pd.Series) else pd.DataFrame(pred).iloc[:, 0]
    if values.isna().all():
        raise BadResultError(f"predictions are all NaN ({len(values)} rows of the {segment} segment): the model "
                             f"produced no usable signal")


def check_trades(report: Any, freq: str = "day") -> None:
    """Refuse a backtest report (Qlib's ``report_normal``) whose turnover is zero on every step."""
    if report is None or len(report) == 0:
        raise BadResultError(f"the backtest ({freq}) produced no report rows: nothing was traded")
    if "turnover" in report and float(report["turnover"].fillna(0).abs().sum()) == 0.0:
        raise BadResultError(f"the backtest ({freq}) never traded over {len(report)} steps (turnover 0): its "
                             f"strategy had no signal to act on, so its figures are the benchmark's alone")
