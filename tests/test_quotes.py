"""The shared backtest exchange on real Qlib: same backtest as Qlib's own, built once, damage rebuilt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from data_fixtures import SYNTH_SEGMENTS, init_qlib

from qlib_ext.cache import exchange as quotes
from qlib_ext.cache.entry import stats

START, END = SYNTH_SEGMENTS["test"]
EXCHANGE = {"limit_threshold": 0.095, "deal_price": "close", "open_cost": 0.0005, "close_cost": 0.0015, "min_cost": 5}


@pytest.fixture
def qlib_synth(synth_provider):
    init_qlib(synth_provider)
    stats.clear()
    quotes._memo.clear()
    return synth_provider


def _backtest_config(**exchange) -> dict:
    return {"start_time": START, "end_time": END, "account": 100000000, "benchmark": "SH000300",
            "exchange_kwargs": {**EXCHANGE, **exchange}}


def _pred() -> pd.Series:
    from qlib.data import D

    index = D.features(D.instruments("csi300"), ["$close"], START, END).swaplevel().sort_index().index
    return pd.Series(np.random.default_rng(0).normal(size=len(index)), index=index)


def _run_backtest(backtest: dict) -> pd.DataFrame:
    from qlib.backtest import backtest as qlib_backtest

    strategy = {"class": "TopkDropoutStrategy", "module_path": "qlib.contrib.strategy",
                "kwargs": {"signal": _pred(), "topk": 10, "n_drop": 2}}
    executor = {"class": "SimulatorExecutor", "module_path": "qlib.backtest.executor",
                "kwargs": {"time_per_step": "day", "generate_portfolio_metrics": True}}
    portfolio, _ = qlib_backtest(strategy=strategy, executor=executor, **backtest)
    report, _ = portfolio["1day"]
    return report


def _shared(cache_dir) -> dict:
    backtest = _backtest_config()
    backtest["exchange_kwargs"] = {"exchange": quotes.shared_exchange(quotes.exchange_kwargs(backtest), cache_dir)}
    return backtest


def test_backtest_on_the_shared_exchange_equals_qlibs_own(qlib_synth, tmp_path):
    stock = _run_backtest(_backtest_config())
    first = _run_backtest(_shared(tmp_path))
    again = _run_backtest(_shared(tmp_path))  # the same instance, already used by a backtest
    assert stats["quotes_built"] == 1 and stats["quotes_reused"] == 1
    assert stock["turnover"].sum() > 0  # the strategy really traded
    pd.testing.assert_frame_equal(first, stock)
    pd.testing.assert_frame_equal(again, stock)


def test_another_process_loads_the_stored_exchange(qlib_synth, tmp_path):
    built = quotes.shared_exchange(quotes.exchange_kwargs(_backtest_config()), tmp_path)
    quotes._memo.clear()  # as in a fresh worker
    loaded = quotes.shared_exchange(quotes.exchange_kwargs(_backtest_config()), tmp_path)
    assert stats["quotes_built"] == 1 and stats["quotes_loaded"] == 1
    assert loaded is not built
    pd.testing.assert_frame_equal(loaded.quote_df, built.quote_df)


def test_other_settings_get_their_own_exchange(qlib_synth, tmp_path):
    quotes.shared_exchange(quotes.exchange_kwargs(_backtest_config()), tmp_path)
    quotes.shared_exchange(quotes.exchange_kwargs(_backtest_config(open_cost=0.001)), tmp_path)
    quotes.shared_exchange(quotes.exchange_kwargs(_backtest_config(limit_threshold=0.05)), tmp_path)
    assert stats["quotes_built"] == 3


def test_truncated_entry_is_rebuilt(qlib_synth, tmp_path):
    kwargs = quotes.exchange_kwargs(_backtest_config())
    quotes.shared_exchange(kwargs, tmp_path)
    (data,) = tmp_path.glob("*.bin")
    data.write_bytes(data.read_bytes()[:1000])
    quotes._memo.clear()
    exchange = quotes.shared_exchange(kwargs, tmp_path)
    assert stats["quotes_built"] == 2 and stats["quotes_rebuilt_corrupt"] == 1
    assert not exchange.quote_df.empty


def test_port_ana_record_gets_the_shared_exchange(qlib_synth, tmp_path):
    from qlib.workflow.record_temp import PortAnaRecord, SignalRecord

    record = PortAnaRecord(recorder=None, config={"strategy": {}, "backtest": _backtest_config()})
    assert quotes.share_exchange(record, tmp_path)
    assert set(record.backtest_config["exchange_kwargs"]) == {"exchange"}
    assert not quotes.share_exchange(SignalRecord(recorder=None), tmp_path)


@pytest.mark.parametrize("backtest", [
    {"start_time": None, "end_time": END, "exchange_kwargs": EXCHANGE},  # dates taken from the predictions
    {"start_time": START, "end_time": END, "exchange_kwargs": {"exchange": "my.Exchange"}},
    {"start_time": START, "end_time": END, "exchange_kwargs": {**EXCHANGE, "extra_quote": pd.DataFrame()}},
])
def test_unkeyable_backtests_are_left_alone(backtest):
    assert quotes.exchange_kwargs(backtest) is None


def test_exchange_kwargs_fill_the_dates_like_qlib():
    kwargs = quotes.exchange_kwargs({"start_time": START, "end_time": END, "exchange_kwargs": dict(EXCHANGE)})
    assert kwargs == {**EXCHANGE, "start_time": START, "end_time": END}
