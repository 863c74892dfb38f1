"""A prediction ``Signal`` that answers each day from one grouping done up front.

Qlib's ``SignalWCache.get_signal`` slices the ``(datetime, instrument)`` frame for the decision
window and groups it by instrument (``resam_ts_data(..., method="last")``) on every step, ~2 ms a
day. :class:`DaySignal` does that grouping once over ``(datetime, instrument)``; a window that
holds exactly one prediction date gets that date's rows of the grouped frame with the datetime
level dropped: the same instruments, in the same (sorted) order, with the same values, dtype and
names as Qlib's per-window ``groupby(level="instrument").last()``. Any other window goes to
Qlib's own method. Read-only after construction.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)


def _signal_cls() -> type:
    from qlib.backtest.signal import SignalWCache

    return SignalWCache


class DaySignal(_signal_cls()):  # type: ignore[misc]
    """``SignalWCache`` with per-day answers precomputed.

    Args:
        signal: predictions, a Series or DataFrame indexed ``(instrument, datetime)`` or
            ``(datetime, instrument)``, as ``SignalWCache`` takes them.
    """

    def __init__(self, signal: pd.Series | pd.DataFrame) -> None:
        from qlib.utils import lazy_sort_index

        super().__init__(signal)
        ordered = lazy_sort_index(self.signal_cache)
        self._grouped = ordered.groupby(level=["datetime", "instrument"], group_keys=False).last()
        when = self._grouped.index.get_level_values("datetime")
        self._dates = pd.DatetimeIndex(when.unique())
        self._starts = when.searchsorted(self._dates, side="left")
        self._ends = when.searchsorted(self._dates, side="right")
        self._days: dict[int, Any] = {}
        self._series = isinstance(self._grouped, pd.Series)
        if self._series:  # what droplevel("datetime") of a slice gives, built from slices of these
            self._instruments = self._grouped.index.get_level_values("instrument")
            self._values = self._grouped.to_numpy()

    def get_signal(self, start_time: pd.Timestamp, end_time: pd.Timestamp) -> pd.Series | pd.DataFrame | None:
        if not (isinstance(start_time, pd.Timestamp) and isinstance(end_time, pd.Timestamp)):
            return super().get_signal(start_time, end_time)
        first = self._dates.searchsorted(start_time, side="left")
        last = self._dates.searchsorted(end_time, side="right")
        if last - first != 1:
            return super().get_signal(start_time, end_time)
        day = self._days.get(first)
        if day is None:
            rows = slice(self._starts[first], self._ends[first])
            if self._series:
                day = pd.Series(self._values[rows], index=self._instruments[rows], name=self._grouped.name,
                                copy=False)
            else:
                day = self._grouped.iloc[rows].droplevel("datetime")
            self._days[first] = day
        return day
