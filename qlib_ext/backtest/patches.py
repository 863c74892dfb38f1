"""Replacements of Qlib methods, active only inside :func:`fast_methods` and only on known Qlib versions.

* ``Position.__deepcopy__``: Qlib deep-copies the whole position twice a step (the strategy's
  working copy, the day's history entry) through ``copy.deepcopy``'s generic recursion over a dict
  of per-stock dicts. The replacement copies each per-stock dict with ``dict(...)`` when all its
  values are immutable scalars (they are: amount, price, weight, count) and deep-copies anything
  else the generic way: the copy is equal, field for field, and shares nothing mutable.
* ``PortfolioMetrics._sample_benchmark``: Qlib resamples the benchmark series for every step
  (``resam_ts_data`` with ``(x + 1).prod()``). For a step holding one benchmark day the answer is
  that day's ``(x + 1).prod() - 1``; it is computed once per series content (the backtests of a
  sweep read equal series) with the same pandas reduction, day by day on one-element series, and
  looked up.

* ``Position._sell_stock``: Qlib's code with its scalar ``np.isclose`` (~0.4 ms a call) computed
  by ``qlib_ext.backtest.exchange._isclose`` (the same float64 formula).

All are checked by ``tests/test_fast_backtest.py`` (frames equal to the stock path). On any other
Qlib version :func:`supported` is False and the fast path is not taken.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

KNOWN_QLIB = ("0.9.7",)
"""Qlib versions whose backtest internals these replacements (and the fast path) were checked against."""

_SCALARS = (int, float, str, bool, type(None), np.generic)
_lock = threading.RLock()
_depth = 0


def qlib_version() -> str:
    import qlib

    return getattr(qlib, "__version__", "unknown")


def supported() -> bool:
    """True on a Qlib version the fast path was checked against."""
    return qlib_version() in KNOWN_QLIB


def _position_deepcopy(self: Any, memo: dict) -> Any:
    new = self.__class__.__new__(self.__class__)
    memo[id(self)] = new
    for key, value in self.__dict__.items():
        if key == "position" and type(value) is dict:
            value = {k: _copy_entry(v, memo) for k, v in value.items()}
        else:
            value = copy.deepcopy(value, memo)
        new.__dict__[key] = value
    return new


def _copy_entry(value: Any, memo: dict) -> Any:
    if type(value) is dict and all(isinstance(v, _SCALARS) for v in value.values()):
        return dict(value)
    return copy.deepcopy(value, memo)


def _sample_benchmark(self: Any, bench: Any, trade_start_time: Any, trade_end_time: Any) -> Any:
    if self.bench is None:
        return None
    days = _bench_days(bench)
    if days is not None:
        dates, values = days
        first = dates.searchsorted(trade_start_time, side="left")
        last = dates.searchsorted(trade_end_time, side="right")
        if last - first == 1:
            return values[first]
        if last == first:
            return 0.0
    return _stock["sample"](self, bench, trade_start_time, trade_end_time)


BENCH_MEMO_SIZE = 4
"""Benchmark series whose per-day answers a process keeps (by content: a sweep's backtests share one), count."""

_bench_memo: dict[int, tuple[Any, Any]] = {}
_bench_by_content: OrderedDict[tuple, Any] = OrderedDict()


def _bench_days(bench: Any) -> Any:
    """(sorted unique dates, per-day answer) of a benchmark series, or None if not a plain daily one.

    Kept for the series object (each step of a backtest asks) and by content (dates, dtype, values), so the
    next backtest of a sweep, whose account reads an equal series again, reuses the answers: the same pandas
    reduction on equal values gives equal answers."""
    import pandas as pd

    hit = _bench_memo.get(id(bench))
    if hit is not None and hit[0] is bench:
        return hit[1]
    days = None
    index = bench.index
    if isinstance(bench, pd.Series) and isinstance(index, pd.DatetimeIndex) and index.is_unique \
            and index.is_monotonic_increasing:
        key = _content_key(bench)
        with _lock:
            days = _bench_by_content.get(key) if key is not None else None
            if days is None:
                one = [bench.iloc[i:i + 1] for i in range(len(bench))]
                days = (index, [(x + 1).prod() - 1 for x in one])
                if key is not None:
                    _bench_by_content[key] = days
                    while len(_bench_by_content) > BENCH_MEMO_SIZE:
                        _bench_by_content.popitem(last=False)
            elif key is not None:
                _bench_by_content.move_to_end(key)
    _bench_memo.clear()  # one benchmark series per backtest; keep only the latest
    _bench_memo[id(bench)] = (bench, days)
    return days


def _content_key(bench: Any) -> tuple | None:
    """What a benchmark series' per-day answers depend on: its dates and its values with their dtype
    (None for a dtype whose values are not plain numbers)."""
    values = bench.to_numpy()
    if values.dtype.kind not in "fiu":
        return None
    return (str(bench.index.dtype), bench.index.asi8.tobytes(), str(values.dtype), values.tobytes())


def _sell_stock(self: Any, stock_id: str, trade_val: float, cost: float, trade_price: float) -> None:
    """Qlib 0.9.7's ``Position._sell_stock`` line for line, its scalar ``np.isclose`` as ``_isclose``."""
    from qlib_ext.backtest.exchange import _isclose

    trade_amount = trade_val / trade_price
    if stock_id not in self.position:
        raise KeyError(f"{stock_id} not in current position")
    if _isclose(self.position[stock_id]["amount"], trade_amount):
        self._del_stock(stock_id)
    else:
        self.position[stock_id]["amount"] -= trade_amount
        if self.position[stock_id]["amount"] < -1e-5:
            raise ValueError("only have {} {}, require {}".format(  # noqa: UP032 - Qlib's message
                self.position[stock_id]["amount"] + trade_amount, stock_id, trade_amount))
    new_cash = trade_val - cost
    if self._settle_type == self.ST_CASH:
        self.position["cash_delay"] += new_cash
    elif self._settle_type == self.ST_NO:
        self.position["cash"] += new_cash
    else:
        raise NotImplementedError("This type of input is not supported")


_stock: dict[str, Any] = {}


@contextlib.contextmanager
def fast_methods() -> Iterator[None]:
    """Install the replacements for the duration of a backtest (re-entrant, thread-safe)."""
    global _depth
    from qlib.backtest.position import Position
    from qlib.backtest.report import PortfolioMetrics

    with _lock:
        if _depth == 0:
            _stock.update(sample=PortfolioMetrics._sample_benchmark, sell=Position._sell_stock)
            Position.__deepcopy__ = _position_deepcopy
            Position._sell_stock = _sell_stock
            PortfolioMetrics._sample_benchmark = _sample_benchmark
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                del Position.__deepcopy__
                Position._sell_stock = _stock["sell"]
                PortfolioMetrics._sample_benchmark = _stock["sample"]
