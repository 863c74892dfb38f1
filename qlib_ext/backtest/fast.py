"""Decide up front whether a backtest takes the fast path, and run it.

:func:`fast_backtest` has the signature and the result of Qlib's ``qlib.backtest.backtest`` (what
``PortAnaRecord`` calls as ``normal_backtest``). A covered backtest runs Qlib's own backtest loop,
strategy, executor, account and order logic unchanged, with three of its parts swapped for exact,
faster ones:

* the exchange becomes a :class:`~qlib_ext.backtest.exchange.FastExchange` (per-day arrays);
* the strategy's signal becomes a :class:`~qlib_ext.backtest.signal.DaySignal`, and
  ``TopkDropoutStrategy`` a :class:`~qlib_ext.backtest.strategy.DayTopkDropoutStrategy`
  (not for ``method_buy="random"``);
* ``Position.__deepcopy__`` and the benchmark sampling are replaced for the duration of the run
  (:mod:`qlib_ext.backtest.patches`).

Covered: Qlib 0.9.7; ``TopkDropoutStrategy`` given as a config whose ``signal`` is a Series or
DataFrame of floats; a daily ``SimulatorExecutor`` config without an inner executor; the default
``Position``; an exchange given as ``get_exchange`` arguments (daily, no ``extra_quote``, the default
``NumpyQuote``) or as a plain Qlib ``Exchange`` instance of that kind. Everything else runs the stock
backtest, with one log line saying why. :func:`fast_records` makes every ``PortAnaRecord`` of a
block use :func:`fast_backtest`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from qlib_ext.backtest.patches import fast_methods, qlib_version, supported

logger = logging.getLogger(__name__)

MEMO_SIZE = 4
"""Fast exchanges a process keeps (one per distinct shared exchange; a grid usually has one)."""

STRATEGIES = {("TopkDropoutStrategy", "qlib.contrib.strategy.signal_strategy"),
              ("TopkDropoutStrategy", "qlib.contrib.strategy")}
"""(class, module_path) of the strategies the fast path covers."""

_memo: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
_memo_lock = threading.Lock()


def fast_backtest(start_time: Any, end_time: Any, strategy: Any, executor: Any, benchmark: Any = "SH000300",
                  account: Any = 1e9, exchange_kwargs: dict | None = None, pos_type: str = "Position") -> tuple:
    """Qlib's ``backtest`` with the same arguments and result, faster when :func:`uncovered` is None."""
    from qlib.backtest import backtest

    exchange_kwargs = dict(exchange_kwargs or {})
    reason = uncovered(strategy, executor, exchange_kwargs, pos_type)
    if reason is not None:
        logger.info("fast backtest: stock path (%s)", reason)
        return backtest(start_time, end_time, strategy, executor, benchmark, account, exchange_kwargs, pos_type)
    from qlib_ext.backtest.signal import DaySignal

    strategy = copy.copy(strategy)
    strategy["kwargs"] = dict(strategy["kwargs"])
    strategy["kwargs"]["signal"] = DaySignal(strategy["kwargs"]["signal"])
    if strategy["kwargs"].get("method_buy", "top") == "top":  # else Qlib's own class (see strategy.py)
        strategy.update({"class": "DayTopkDropoutStrategy", "module_path": "qlib_ext.backtest.strategy"})
    fast = _fast_exchange(exchange_kwargs, start_time, end_time)
    with fast_methods():
        return backtest(start_time, end_time, strategy, executor, benchmark, account, {"exchange": fast}, pos_type)


def uncovered(strategy: Any, executor: Any, exchange_kwargs: dict, pos_type: str = "Position") -> str | None:
    """Why a backtest must take the stock path, or None when the fast path covers it."""
    if not supported():
        return f"Qlib {qlib_version()} is not one the fast path was checked against"
    if pos_type != "Position":
        return f"pos_type {pos_type!r}"
    return _strategy_reason(strategy) or _executor_reason(executor) or _exchange_reason(exchange_kwargs)


def _strategy_reason(strategy: Any) -> str | None:
    import numpy as np
    import pandas as pd

    if not isinstance(strategy, dict):
        return f"strategy given as {type(strategy).__name__}, not as a config dict"
    name = (strategy.get("class"), strategy.get("module_path"))
    if name not in STRATEGIES:
        return f"strategy {name[0]} ({name[1]}) not covered"
    signal = (strategy.get("kwargs") or {}).get("signal")
    if not isinstance(signal, (pd.Series, pd.DataFrame)):
        return f"signal of type {type(signal).__name__}, not a Series/DataFrame"
    if not isinstance(signal.index, pd.MultiIndex) or sorted(signal.index.names) != ["datetime", "instrument"]:
        return "signal not indexed by (instrument, datetime)"
    first = signal if isinstance(signal, pd.Series) else signal.iloc[:, 0] if signal.shape[1] else None
    if first is None or not (isinstance(first.dtype, np.dtype) and first.dtype.kind == "f"):
        return f"signal dtype {getattr(first, 'dtype', None)} (a float NumPy dtype is covered)"
    return None


def _executor_reason(executor: Any) -> str | None:
    if not isinstance(executor, dict):
        return f"executor given as {type(executor).__name__}, not as a config dict"
    if executor.get("class") != "SimulatorExecutor" or executor.get("module_path") not in (
            None, "qlib.backtest.executor", "qlib.backtest"):
        return f"executor {executor.get('class')} not covered"
    kwargs = executor.get("kwargs") or {}
    if kwargs.get("time_per_step") != "day" or "inner_executor" in kwargs:
        return f"executor time_per_step {kwargs.get('time_per_step')!r} (only a daily executor is covered)"
    return None


def _exchange_reason(kwargs: dict) -> str | None:
    from qlib.backtest.exchange import Exchange
    from qlib.backtest.high_performance_ds import NumpyQuote

    exchange = kwargs.get("exchange")
    if exchange is not None:
        if type(exchange) is not Exchange:
            return f"exchange of type {type(exchange).__name__}"
        if type(exchange.quote) is not NumpyQuote or exchange.freq != "day" or exchange.extra_quote is not None:
            return "exchange not daily on a NumpyQuote without extra_quote"
        if not exchange.quote_df.index.is_unique:
            return "exchange quote has duplicate (instrument, datetime) rows"
        return None
    if kwargs.get("freq", "day") != "day":
        return f"exchange freq {kwargs.get('freq')!r}"
    if kwargs.get("extra_quote") is not None:
        return "exchange extra_quote"
    if kwargs.get("quote_cls", NumpyQuote) is not NumpyQuote:
        return "exchange quote_cls"
    return None


def _fast_exchange(kwargs: dict, start_time: Any, end_time: Any) -> Any:
    """The fast twin of the exchange Qlib's ``get_strategy_executor`` would use."""
    from qlib.backtest import get_exchange

    from qlib_ext.backtest.exchange import fast_exchange

    exchange = kwargs.get("exchange")
    if exchange is None:
        kwargs = dict(kwargs)
        kwargs.setdefault("start_time", start_time)
        kwargs.setdefault("end_time", end_time)
        return fast_exchange(get_exchange(**kwargs))  # built for this backtest only: not memoised
    with _memo_lock:
        hit = _memo.get(id(exchange))
        if hit is not None and hit[0] is exchange:
            _memo.move_to_end(id(exchange))
            return hit[1]
    fast = fast_exchange(exchange)
    with _memo_lock:
        _memo[id(exchange)] = (exchange, fast)
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)
    return fast


_records_depth = 0


@contextlib.contextmanager
def fast_records(enabled: bool = True) -> Iterator[None]:
    """Make ``PortAnaRecord`` backtests in this block use :func:`fast_backtest` (no-op if not enabled).

    Re-entrant and thread-safe: Qlib's ``normal_backtest`` is swapped when the first block opens and
    restored when the last one closes.
    """
    global _records_depth
    if not enabled:
        yield
        return
    from qlib.backtest import backtest
    from qlib.workflow import record_temp

    with _memo_lock:
        if _records_depth == 0:
            record_temp.normal_backtest = fast_backtest
        _records_depth += 1
    try:
        yield
    finally:
        with _memo_lock:
            _records_depth -= 1
            if _records_depth == 0:
                record_temp.normal_backtest = backtest
