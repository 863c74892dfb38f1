"""``TopkDropoutStrategy`` with its per-day pandas bookkeeping done on plain arrays.

Qlib's ``TopkDropoutStrategy.generate_trade_decision`` spends most of a fast backtest's time in
small pandas operations on a string index (``reindex``, ``sort_values``, ``isin``, ``union``: ~2 ms a
day). :class:`DayTopkDropoutStrategy` runs the same steps in the same order on the same numbers:

* every ``sort_values(ascending=False)`` is pandas' own ``nargsort`` (what ``Series.sort_values``
  calls) on the very array pandas would sort (the reindexed values, the masked values), so ties and
  missing scores keep pandas' order;
* ``reindex`` is a dict lookup with NaN for a missing code, in the signal's dtype;
* ``Index.union`` follows pandas' rules (:func:`union_order`): one side empty -> the other side as
  it is, else the sorted union;
* the random draws (``method_sell="random"``) are the same ``np.random.choice`` calls on arrays of the
  same length.

Everything else (the exchange checks, the simulated sells on a copy of the position, the orders) is
Qlib's code, copied line for line. ``method_buy="random"`` is not covered (Qlib 0.9.7 itself fails
there on numpy 2: ``np.random.choice`` returns ``np.str_`` codes that Qlib's ``IndexData`` later
refuses); :mod:`qlib_ext.backtest.fast` keeps Qlib's class for it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def union_order(left: list, right: list) -> list:
    """The order of ``pd.Index(left).union(pd.Index(right))`` for unique string codes."""
    if not right or left == right:
        return list(left)
    if not left:
        return list(right)
    return sorted(set(left).union(right))


class _Day:
    """One day's scores as arrays: codes, values (the Series' own ndarray), code -> position."""

    __slots__ = ("series", "codes", "values", "pos")

    def __init__(self, series: pd.Series) -> None:
        self.series = series
        self.codes = series.index.to_numpy(dtype=object)
        self.values = series.to_numpy()
        self.pos = {c: i for i, c in enumerate(self.codes)}

    def reindex(self, codes: list) -> np.ndarray:
        """``series.reindex(codes).to_numpy()``."""
        values, pos = self.values, self.pos
        return np.array([values[pos[c]] if c in pos else np.nan for c in codes], dtype=values.dtype)

    @staticmethod
    def desc(codes: Any, values: np.ndarray) -> list:
        """The codes in the order of ``pd.Series(values, index=codes).sort_values(ascending=False)``."""
        from pandas.core.sorting import nargsort

        return [codes[i] for i in nargsort(values, kind="quicksort", ascending=False, na_position="last")]


def _strategy_cls() -> type:
    from qlib.contrib.strategy.signal_strategy import TopkDropoutStrategy

    return TopkDropoutStrategy


class DayTopkDropoutStrategy(_strategy_cls()):  # type: ignore[misc]
    """``TopkDropoutStrategy`` (same arguments, same decisions) without pandas in the daily loop."""

    _day: _Day | None = None

    def _scores(self, pred_score: pd.Series) -> _Day:
        day = self._day
        if day is None or day.series is not pred_score:
            day = self._day = _Day(pred_score)
        return day

    def generate_trade_decision(self, execute_result: Any = None) -> Any:  # noqa: C901 - Qlib's method, kept whole
        from qlib.backtest.decision import Order, OrderDir, TradeDecisionWO

        trade_step = self.trade_calendar.get_trade_step()
        trade_start_time, trade_end_time = self.trade_calendar.get_step_time(trade_step)
        pred_start_time, pred_end_time = self.trade_calendar.get_step_time(trade_step, shift=1)
        pred_score = self.signal.get_signal(start_time=pred_start_time, end_time=pred_end_time)
        if isinstance(pred_score, pd.DataFrame):
            pred_score = pred_score.iloc[:, 0]
        if pred_score is None:
            return TradeDecisionWO([], self)
        exchange = self.trade_exchange
        if self.only_tradable:
            # Qlib's get_first_n(li, n, reverse=False), named apart so that each helper has one signature
            def tradable_n(li: list, n: int, reverse: bool) -> list:
                cur_n = 0
                res = []
                for si in reversed(li) if reverse else li:
                    if exchange.is_stock_tradable(stock_id=si, start_time=trade_start_time, end_time=trade_end_time):
                        res.append(si)
                        cur_n += 1
                        if cur_n >= n:
                            break
                return res[::-1] if reverse else res

            def get_first_n(li: list, n: int) -> list:
                return tradable_n(li, n, reverse=False)

            def get_last_n(li: list, n: int) -> list:
                return tradable_n(li, n, reverse=True)

            def filter_stock(li: Any) -> Any:
                return [si for si in li if exchange.is_stock_tradable(stock_id=si, start_time=trade_start_time,
                                                                      end_time=trade_end_time)]
        else:
            def get_first_n(li: list, n: int) -> list:
                return list(li)[:n]

            def get_last_n(li: list, n: int) -> list:
                return list(li)[-n:]

            def filter_stock(li: Any) -> Any:
                return li

        day = self._scores(pred_score)
        current_temp = copy.deepcopy(self.trade_position)
        sell_order_list = []
        buy_order_list = []
        cash = current_temp.get_cash()
        current_stock_list = current_temp.get_stock_list()
        last = day.desc(current_stock_list, day.reindex(current_stock_list))
        last_set = set(last)
        if self.method_buy != "top":
            raise NotImplementedError(f"method_buy {self.method_buy!r}: use Qlib's TopkDropoutStrategy")
        keep = np.array([c not in last_set for c in day.codes], dtype=bool)
        today = get_first_n(day.desc(day.codes[keep], day.values[keep]), self.n_drop + self.topk - len(last))
        union = union_order(last, today)
        comb = day.desc(union, day.reindex(union))
        if self.method_sell == "bottom":
            bottom = set(get_last_n(comb, self.n_drop))
            sell: Any = [c for c in last if c in bottom]
        elif self.method_sell == "random":
            candi = filter_stock(np.array(last, dtype=object) if not self.only_tradable else last)
            try:
                sell = pd.Index(np.random.choice(candi, self.n_drop, replace=False) if len(last) else [])
            except ValueError:  # No enough candidates
                sell = candi
        else:
            raise NotImplementedError("This type of input is not supported")
        sell = set(sell)
        buy = today[: len(sell) + self.topk - len(last)]
        for code in current_stock_list:
            if not exchange.is_stock_tradable(stock_id=code, start_time=trade_start_time, end_time=trade_end_time,
                                              direction=None if self.forbid_all_trade_at_limit else OrderDir.SELL):
                continue
            if code in sell:
                time_per_step = self.trade_calendar.get_freq()
                if current_temp.get_stock_count(code, bar=time_per_step) < self.hold_thresh:
                    continue
                sell_amount = current_temp.get_stock_amount(code=code)
                sell_order = Order(stock_id=code, amount=sell_amount, start_time=trade_start_time,
                                   end_time=trade_end_time, direction=Order.SELL)
                if exchange.check_order(sell_order):
                    sell_order_list.append(sell_order)
                    trade_val, trade_cost, trade_price = exchange.deal_order(sell_order, position=current_temp)
                    cash += trade_val - trade_cost
        value = cash * self.risk_degree / len(buy) if len(buy) > 0 else 0
        for code in buy:
            if not exchange.is_stock_tradable(stock_id=code, start_time=trade_start_time, end_time=trade_end_time,
                                              direction=None if self.forbid_all_trade_at_limit else OrderDir.BUY):
                continue
            buy_price = exchange.get_deal_price(stock_id=code, start_time=trade_start_time, end_time=trade_end_time,
                                                direction=OrderDir.BUY)
            buy_amount = value / buy_price
            factor = exchange.get_factor(stock_id=code, start_time=trade_start_time, end_time=trade_end_time)
            buy_amount = exchange.round_amount_by_trade_unit(buy_amount, factor)
            buy_order = Order(stock_id=code, amount=buy_amount, start_time=trade_start_time,
                              end_time=trade_end_time, direction=Order.BUY)
            buy_order_list.append(buy_order)
        return TradeDecisionWO(sell_order_list + buy_order_list, self)
