"""The backtest exchange (market quotes and trade limits) built once and shared by a grid's backtests.

Every ``PortAnaRecord`` backtest of a grid builds the same Qlib ``Exchange``: the quotes of every
instrument over the backtest period through ``D.features``, the limit flags, then a per-stock
``NumpyQuote``. On 300 stocks that is 5-8 s per task, the same for all of them. With the cache on,
:func:`share_exchange` hands the record an ``Exchange`` built by Qlib's own ``get_exchange`` from
the record's own settings, pickled in the cache directory (so other workers and hosts load it) and
kept in memory for the worker's next task. Qlib's backtest takes an exchange instance in
``exchange_kwargs["exchange"]`` and only reads it, so a shared one gives the same result.

A backtest whose exchange cannot be keyed safely is left alone: one that names its own
``exchange``, passes an ``extra_quote`` frame, or leaves ``start_time``/``end_time`` to be taken
from the predictions.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from qlib_ext.cache.datasets import data_fingerprint, key_digest, shared, versions
from qlib_ext.cache.entry import Entry, PickleEntry, stats, write_or_skip

logger = logging.getLogger("qlib_ext.cache")

MEMO_SIZE = 4
"""Exchanges a worker keeps in memory (one per distinct backtest setting; a grid usually has one)."""

_memo: OrderedDict[str, Any] = OrderedDict()


class QuoteEntry(PickleEntry):
    kind = "quotes_"


def share_exchange(record: Any, cache_dir: str | os.PathLike) -> bool:
    """Give a ``PortAnaRecord`` the shared exchange for its backtest settings; False if left alone.

    Args:
        record: a record instance; anything but a ``PortAnaRecord`` is left alone.
        cache_dir: the cache directory (shared with the dataset cache).
    """
    from qlib.workflow.record_temp import PortAnaRecord

    if not isinstance(record, PortAnaRecord):
        return False
    kwargs = exchange_kwargs(record.backtest_config)
    if kwargs is None:
        return False
    record.backtest_config["exchange_kwargs"] = {"exchange": shared_exchange(kwargs, Path(cache_dir))}
    return True


def exchange_kwargs(backtest: dict) -> dict | None:
    """The arguments Qlib's backtest would pass to ``get_exchange`` for ``backtest`` (a
    ``PortAnaRecord`` ``config["backtest"]``), or None when its exchange must not be shared."""
    kwargs = dict(backtest.get("exchange_kwargs") or {})
    if "exchange" in kwargs or "extra_quote" in kwargs:
        return None
    for bound in ("start_time", "end_time"):  # as qlib.backtest.get_strategy_executor fills them
        if kwargs.get(bound) is None:
            kwargs[bound] = backtest.get(bound)
        if kwargs[bound] is None:
            return None
    return kwargs


def shared_exchange(kwargs: dict, cache_dir: Path) -> Any:
    """The ``Exchange`` of ``get_exchange(**kwargs)``: from this process's memory, else the cache
    directory, else built (under the entry's lock) and stored."""
    key = exchange_key(kwargs)
    exchange = _memo.get(key)
    if exchange is not None:
        _memo.move_to_end(key)
        stats["quotes_reused"] += 1
        return exchange
    exchange = shared(QuoteEntry(cache_dir, key), lambda entry: _build(kwargs, entry))
    _memo[key] = exchange
    while len(_memo) > MEMO_SIZE:
        _memo.popitem(last=False)
    return exchange


def exchange_key(kwargs: dict) -> str:
    """sha256 of the exchange arguments, Qlib's defaults they fall back on, the data and the versions."""
    from qlib.config import C

    defaults = {name: C.get(name) for name in ("limit_threshold", "deal_price", "trade_unit")}
    payload = {"exchange": kwargs, "defaults": defaults, "data": data_fingerprint(), "versions": versions()}
    return key_digest(payload)


def _build(kwargs: dict, entry: Entry) -> Any:
    from qlib.backtest import get_exchange

    start = time.perf_counter()
    exchange = get_exchange(**kwargs)
    seconds = time.perf_counter() - start
    codes = kwargs.get("codes", "all")
    describe = {"handler": "qlib.backtest.Exchange", "instruments": codes if isinstance(codes, str) else len(codes),
                "start_time": kwargs["start_time"], "end_time": kwargs["end_time"], "build_seconds": round(seconds, 3)}
    write_or_skip(entry, exchange, describe, read_back=False)
    stats["quotes_built"] += 1
    logger.info("cache: built exchange %s in %.1fs", entry.key[:12], seconds)
    return exchange
