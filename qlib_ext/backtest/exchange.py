"""An ``Exchange`` whose quote answers one-day queries from per-day arrays.

Qlib's ``NumpyQuote.get_data`` answers every per-stock question of a daily backtest (is it
suspended, at its limit, what is its close, factor, volume, deal price) through an ``IndexData``
lookup of ~40 µs; a 300-stock backtest asks it ~60,000 times. :class:`DayArrayQuote` keeps the
same numbers as ``(day, stock)`` float64 arrays and answers a one-bar query with two dict lookups
and an array read. Any other query (a window of several bars, a field it does not hold) goes to the
original ``NumpyQuote``, so every answer is the stock one, value and type:

* ``NumpyQuote`` keeps each stock's rows as ``MultiData`` (float64, whatever the column dtype);
  the arrays are ``quote_df`` converted to float64 the same way;
* a one-bar query (Qlib's ``is_single_value``) for a day a stock has no row returns ``None``;
  the arrays keep a ``present`` mask for that.

:class:`FastExchange` is the original ``Exchange`` (same attributes, shared ``quote_df``) with
that quote and shortcuts for the hottest checks, each computed from the same values in the same
order as Qlib's method. It only reads after construction: safe to share between backtests of one
process, not between threads building it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

_MULTI = -2
"""Row code of a query that is not a single bar (answered by the original quote)."""

_ABSENT = -1
"""Row code of a single-bar query for a day no stock has a row on."""


class DayArrayQuote:
    """A ``BaseQuote`` look-alike over ``(day, stock)`` arrays, falling back on ``base``.

    Args:
        base: the exchange's ``NumpyQuote`` (kept for the queries the arrays cannot answer).
        quote_df: the exchange's ``quote_df`` (index ``(instrument, datetime)``, unique).
    """

    def __init__(self, base: Any, quote_df: pd.DataFrame) -> None:
        from qlib.utils.time import is_single_value

        self.base = base
        self.freq = base.freq
        self.region = base.region
        self._is_single = is_single_value
        stocks = list(base.get_all_stock())
        self._cols = {s: i for i, s in enumerate(stocks)}
        inst = quote_df.index.get_level_values("instrument")
        when = quote_df.index.get_level_values("datetime")
        self.days = pd.DatetimeIndex(when.unique()).sort_values()
        self._day_pos = {d: i for i, d in enumerate(self.days.to_numpy())}
        rows = self.days.get_indexer(when)
        cols = pd.Index(stocks).get_indexer(inst)
        shape = (len(self.days), len(stocks))
        self.present = np.zeros(shape, dtype=bool)
        self.present[rows, cols] = True
        self.fields: dict[str, np.ndarray] = {}
        for name in quote_df.columns:
            arr = np.full(shape, np.nan)
            arr[rows, cols] = quote_df[name].to_numpy(dtype=np.float64, na_value=np.nan)
            self.fields[name] = arr
        self._rows: dict[tuple[pd.Timestamp, pd.Timestamp], tuple[int, int, int]] = {}

    def get_all_stock(self) -> Any:
        return self.base.get_all_stock()

    def row(self, start_time: pd.Timestamp, end_time: pd.Timestamp) -> int:
        """The day row of a one-bar query, ``_ABSENT`` for a day without rows, ``_MULTI`` otherwise."""
        return self.window(start_time, end_time)[0]

    def window(self, start_time: pd.Timestamp, end_time: pd.Timestamp) -> tuple[int, int, int]:
        """``(row, lo, hi)``: the row of a one-bar query (else ``_MULTI``) and the day rows
        ``lo:hi`` a ``start_time:end_time`` slice covers (as Qlib's sorted ``IndexData`` bisects)."""
        key = (start_time, end_time)
        hit = self._rows.get(key)
        if hit is None:
            if self._is_single(start_time, end_time, self.freq, self.region):
                # as Qlib's Index._convert_type does before its dict lookup
                hit = (self._day_pos.get(start_time.to_numpy().astype(self.days.dtype), _ABSENT), 0, 0)
            else:
                lo = int(self.days.searchsorted(start_time, side="left"))
                hit = (_MULTI, lo, int(self.days.searchsorted(end_time, side="right")))
            self._rows[key] = hit
        return hit

    def get_data(self, stock_id: str, start_time: pd.Timestamp, end_time: pd.Timestamp, field: str,
                 method: str | None = None) -> Any:
        """``NumpyQuote.get_data``: the same value and type, from the arrays where it can."""
        col = self._cols.get(stock_id)
        if col is None:
            return None
        arr = self.fields.get(field)
        agg = None if method is None else _AGG.get(method)
        if arr is None or not (isinstance(start_time, pd.Timestamp) and isinstance(end_time, pd.Timestamp)):
            return self.base.get_data(stock_id, start_time, end_time, field, method)
        row, lo, hi = self.window(start_time, end_time)
        if row != _MULTI:
            if row == _ABSENT or not self.present[row, col]:
                return None
            return arr[row, col]
        if agg is None:
            return self.base.get_data(stock_id, start_time, end_time, field, method)
        values = arr[lo:hi, col][self.present[lo:hi, col]]
        if len(values) == 0:
            return None
        return agg(values)


def _ts_data_last(values: np.ndarray) -> Any:
    valid = values[~np.isnan(values)]
    return None if len(valid) == 0 else valid[-1]


_AGG: dict[str, Callable[[np.ndarray], Any]] = {"ts_data_last": _ts_data_last, "sum": np.nansum, "all": np.ndarray.all}
"""``NumpyQuote._agg_data`` methods on a several-bar slice, on the slice's float64 values
(``IndexData.all`` is ``data.all()`` for a float array: ``None in data`` is False)."""


def fast_exchange(exchange: Any) -> FastExchange:
    """A :class:`FastExchange` with the state of ``exchange`` (a Qlib ``Exchange`` on a ``NumpyQuote``)."""
    fast = FastExchange.__new__(FastExchange)
    fast.__dict__.update(exchange.__dict__)
    fast.__dict__.pop("_order_helper", None)  # bound to the original exchange
    fast.quote = DayArrayQuote(exchange.quote, exchange.quote_df)
    return fast


def _exchange_cls() -> type:
    from qlib.backtest.exchange import Exchange

    return Exchange


class FastExchange(_exchange_cls()):  # type: ignore[misc]
    """Qlib's ``Exchange`` over a :class:`DayArrayQuote`; build it with :func:`fast_exchange`."""

    quote: DayArrayQuote

    def check_stock_suspended(self, stock_id: str, start_time: pd.Timestamp, end_time: pd.Timestamp) -> bool:
        quote = self.quote
        col = quote._cols.get(stock_id)
        if col is None or not (isinstance(start_time, pd.Timestamp) and isinstance(end_time, pd.Timestamp)):
            return super().check_stock_suspended(stock_id, start_time, end_time)
        row, lo, hi = quote.window(start_time, end_time)
        if row == _MULTI:  # Qlib: the $close slice, None if empty, else isna().all()
            present = quote.present[lo:hi, col]
            return True if not present.any() else np.isnan(quote.fields["$close"][lo:hi, col][present]).all()
        if row == _ABSENT or not quote.present[row, col]:
            return True
        return np.isnan(quote.fields["$close"][row, col])

    def _one_bar(self, stock_id: str, start_time: Any, end_time: Any, direction: int | None) -> tuple[int, int]:
        """``(row, col)`` of the arrays when the query is one bar the quote has and ``direction`` is None, BUY (1)
        or SELL (0); else ``(-1, -1)``: Qlib's own method answers (over the fast quote)."""
        col = self.quote._cols.get(stock_id)
        if col is None or not isinstance(start_time, pd.Timestamp) or not isinstance(end_time, pd.Timestamp) \
                or direction not in (None, 0, 1):
            return -1, -1
        row = self.quote.window(start_time, end_time)[0]
        return (row, col) if row >= 0 and self.quote.present[row, col] else (-1, -1)

    def check_stock_limit(self, stock_id: str, start_time: pd.Timestamp, end_time: pd.Timestamp,
                          direction: int | None = None) -> bool:
        row, col = self._one_bar(stock_id, start_time, end_time, direction)
        if row < 0:
            return super().check_stock_limit(stock_id, start_time, end_time, direction)
        fields = self.quote.fields
        if direction is None:
            return bool(fields["limit_buy"][row, col] or fields["limit_sell"][row, col])
        return fields["limit_buy" if direction == 1 else "limit_sell"][row, col]  # 1: OrderDir.BUY, 0: SELL

    def is_stock_tradable(self, stock_id: str, start_time: pd.Timestamp, end_time: pd.Timestamp,
                          direction: int | None = None) -> bool:
        """Qlib's ``not (suspended or limited)`` from one array row where the query is one bar."""
        row, col = self._one_bar(stock_id, start_time, end_time, direction)
        if row < 0:
            return super().is_stock_tradable(stock_id, start_time, end_time, direction)
        fields = self.quote.fields
        if np.isnan(fields["$close"][row, col]):
            return False
        if direction is None:
            return not (fields["limit_buy"][row, col] or fields["limit_sell"][row, col])
        return not fields["limit_buy" if direction == 1 else "limit_sell"][row, col]

    def _calc_trade_info_by_order(self, order: Any, position: Any, dealt_order_amount: dict) -> tuple:
        """Qlib 0.9.7's method line for line, with its scalar ``np.isclose`` as :func:`_isclose` and its
        debug messages formatted only when debug logging is on."""
        from qlib.backtest.decision import Order

        trade_price = self.get_deal_price(order.stock_id, order.start_time, order.end_time, direction=order.direction)
        total_trade_val = self.get_volume(order.stock_id, order.start_time, order.end_time) * trade_price
        order.factor = self.get_factor(order.stock_id, order.start_time, order.end_time)
        order.deal_amount = order.amount
        self._clip_amount_by_volume(order, dealt_order_amount)
        trade_val = order.deal_amount * trade_price
        if not total_trade_val or np.isnan(total_trade_val):
            adj_cost_ratio = self.impact_cost
        else:
            adj_cost_ratio = self.impact_cost * (trade_val / total_trade_val) ** 2
        if order.direction == Order.SELL:
            cost_ratio = self.close_cost + adj_cost_ratio
            if position is not None:
                held = position.check_stock(order.stock_id)
                current_amount = position.get_stock_amount(order.stock_id) if held else 0
                if not _isclose(order.deal_amount, current_amount):
                    order.deal_amount = self.round_amount_by_trade_unit(min(current_amount, order.deal_amount),
                                                                        order.factor)
                if position.get_cash() + order.deal_amount * trade_price < max(
                        order.deal_amount * trade_price * cost_ratio, self.min_cost):
                    order.deal_amount = 0
                    self.logger.debug("Order clipped due to cash limitation: %s", order)
        elif order.direction == Order.BUY:
            cost_ratio = self.open_cost + adj_cost_ratio
            if position is not None:
                cash = position.get_cash()
                trade_val = order.deal_amount * trade_price
                if cash < max(trade_val * cost_ratio, self.min_cost):
                    order.deal_amount = 0
                    self.logger.debug("Order clipped due to cost higher than cash: %s", order)
                elif cash < trade_val + max(trade_val * cost_ratio, self.min_cost):
                    max_buy_amount = self._get_buy_amount_by_cash_limit(trade_price, cash, cost_ratio)
                    order.deal_amount = self.round_amount_by_trade_unit(min(max_buy_amount, order.deal_amount),
                                                                        order.factor)
                    self.logger.debug("Order clipped due to cash limitation: %s", order)
                else:
                    order.deal_amount = self.round_amount_by_trade_unit(order.deal_amount, order.factor)
            else:
                order.deal_amount = self.round_amount_by_trade_unit(order.deal_amount, order.factor)
        else:
            raise NotImplementedError(f"order direction {order.direction} error")
        trade_val = order.deal_amount * trade_price
        trade_cost = max(trade_val * cost_ratio, self.min_cost)
        if trade_val <= 1e-5:
            trade_cost = 0
        return trade_price, trade_val, trade_cost


_EXACT = (float, int, np.float64)
"""Scalar types :func:`_isclose` computes itself (float64 arithmetic, as ``np.isclose`` does for them)."""


def _isclose(x: Any, y: Any) -> bool:
    """``bool(np.isclose(x, y))`` (rtol 1e-05, atol 1e-08) without numpy's array machinery."""
    if type(x) in _EXACT and type(y) in _EXACT:
        x, y = float(x), float(y)
        return (abs(x - y) <= 1e-08 + 1e-05 * abs(y) and math.isfinite(y)) or x == y
    return bool(np.isclose(x, y))
