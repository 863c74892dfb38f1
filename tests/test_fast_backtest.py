"""The fast backtest path gives Qlib's own result, frame for frame, metric for metric.

One child process (``qlib.init`` is process-global) writes a small synthetic market with late
listings, a delisting, suspensions and missing open prices, then runs every case below through
Qlib's ``backtest`` and through :func:`qlib_ext.backtest.fast.fast_backtest` and compares
``report_normal``, positions, indicators and PortAnaRecord's risk/indicator analysis exactly; it
also compares the array quote with ``NumpyQuote`` on every stock, window, field and method, and
runs ``PortAnaRecord`` (real MLflow) with and without :func:`fast_records`. Each test reads its
case's verdict from that one run.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

START, END = "2015-04-20", "2015-08-06"  # the calendar's last day is 2015-08-07: end one day before
EX = {"limit_threshold": 0.095, "deal_price": "close", "open_cost": 0.0005, "close_cost": 0.0015, "min_cost": 5}
CASES = {
    "base": ({"topk": 8, "n_drop": 2}, {}, {}),
    "full_turnover_random_sell": ({"topk": 5, "n_drop": 5, "method_sell": "random"}, {}, {}),
    # Qlib 0.9.7 itself raises here on numpy 2 (np.str_ codes from np.random.choice): the fast path must too
    "random_buy_raises_as_in_qlib": ({"topk": 8, "n_drop": 3, "method_buy": "random"}, {}, {}),
    "hold_thresh_only_tradable": ({"topk": 8, "n_drop": 4, "hold_thresh": 3, "only_tradable": True,
                                   "method_sell": "random"}, {}, {}),
    "trade_at_limit": ({"topk": 8, "n_drop": 2, "forbid_all_trade_at_limit": False}, {"limit_threshold": 0.03}, {}),
    "no_limit_open_no_unit": ({"topk": 8, "n_drop": 2}, {"limit_threshold": None, "deal_price": "open",
                                                          "trade_unit": None}, {}),
    "limit_expr_prices_unit_1000": ({"topk": 8, "n_drop": 2}, {
        "limit_threshold": ("$change >= 0.04", "$change <= -0.04"), "deal_price": ("$vwap", "$close"),
        "trade_unit": 1000}, {}),
    "costs_min_cost_impact": ({"topk": 8, "n_drop": 2}, {"open_cost": 0.001, "close_cost": 0.002,
                                                          "min_cost": 60, "impact_cost": 0.1}, {"account": 300_000}),
    "no_benchmark_topk_over_universe": ({"topk": 40, "n_drop": 3}, {}, {"benchmark": None}),
    "benchmark_list_short_window": ({"topk": 8, "n_drop": 2}, {}, {"benchmark": ["SH600000", "SZ000001"],
                                                                  "end_time": "2015-07-10"}),
    "frame_signal_own_exchange": ({"topk": 8, "n_drop": 2, "risk_degree": 0.8, "signal": "frame"}, {"own": True},
                                  {}),
}
"""name -> (TopkDropoutStrategy kwargs, exchange kwargs over EX, backtest kwargs)."""


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fast_backtest")
    out = tmp / "verdicts.json"
    proc = subprocess.run([sys.executable, __file__, str(tmp), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_fast_backtest_equals_qlibs_own(verdicts, case):
    verdict = verdicts["cases"][case]
    assert verdict["fast_path"], "the case should have taken the fast path"
    random_buy = CASES[case][0].get("method_buy") == "random"  # Qlib's class (see qlib_ext/backtest/strategy.py)
    assert (verdict["day_strategy_steps"] == 0) == random_buy
    assert verdict["diff"] == [], verdict["diff"]
    if "error" in verdict:  # Qlib's own backtest raised: the fast one raised the same error
        assert case.endswith("raises_as_in_qlib"), verdict["error"]
    else:
        assert verdict["trades"] > 0  # the strategy really traded


def test_data_has_what_the_cases_need(verdicts):
    seen = verdicts["data"]
    assert seen["suspended_rows"] > 0 and seen["late_listed"] > 0 and seen["delisted"] > 0
    assert seen["nan_open_rows"] > 0 and seen["limit_rows"] > 0


def test_array_quote_answers_as_numpy_quote(verdicts):
    quote = verdicts["quote"]
    assert quote["mismatches"] == [], quote["mismatches"][:5]
    assert quote["single"] > 1000 and quote["multi"] > 1000 and quote["none"] > 0


def test_port_ana_record_logs_the_same_metrics_and_artifacts(verdicts):
    """Stock generate, generate inside fast_records, and the worker's backtest stage: the same metrics and frames."""
    record = verdicts["record"]
    assert record["fast_path"] and record["metrics"] > 10
    assert record["diff"] == [], record["diff"]


def test_the_worker_stage_writes_the_records_metrics_in_one_batch(verdicts):
    """Qlib logs each analysis metric with its own log_metric (one sqlite transaction each, in a background
    thread the stage then waits for); the worker's stage writes them in one log_batch."""
    assert verdicts["record"]["stage_calls"] == {"log_metric": 0, "log_batch": 1}


def test_benchmark_answers_are_kept_by_content():
    """The next backtest of a sweep reads an equal benchmark series (a new object): its per-day answers are
    reused; a series with other values is computed anew, each answer Qlib's ``(x + 1).prod() - 1``."""
    import numpy as np
    import pandas as pd

    from qlib_ext.backtest.patches import _bench_days

    days = pd.date_range("2020-01-01", periods=30, freq="B")
    bench = pd.Series(np.random.default_rng(3).normal(0, 0.01, 30), index=days)
    first = _bench_days(bench)
    assert _bench_days(bench.copy()) is first
    other = _bench_days(bench * 2)
    assert other is not first
    assert other[1] == [(bench.iloc[i:i + 1] * 2 + 1).prod() - 1 for i in range(30)]
    assert _bench_days(bench.astype("float32")) is not first  # another dtype: other answers


def test_uncovered_backtests_take_the_stock_path(monkeypatch, caplog):
    import pandas as pd
    import qlib

    from qlib_ext.backtest.fast import uncovered

    signal = pd.Series([0.1], index=pd.MultiIndex.from_tuples([("SH600000", pd.Timestamp("2015-01-05"))],
                                                              names=["instrument", "datetime"]))
    strategy = {"class": "TopkDropoutStrategy", "module_path": "qlib.contrib.strategy", "kwargs": {"signal": signal}}
    executor = {"class": "SimulatorExecutor", "module_path": "qlib.backtest.executor",
                "kwargs": {"time_per_step": "day"}}
    assert uncovered(strategy, executor, {}) is None
    weekly = {**executor, "kwargs": {"time_per_step": "week"}}
    nested = {**executor, "kwargs": {"time_per_step": "day", "inner_executor": {}}}
    other = {**strategy, "class": "WeightStrategyBase"}
    assert "daily" in uncovered(strategy, weekly, {})
    assert "daily" in uncovered(strategy, nested, {})
    assert "not covered" in uncovered(other, executor, {})
    assert "signal" in uncovered({**strategy, "kwargs": {"signal": "<PRED>"}}, executor, {})
    assert "extra_quote" in uncovered(strategy, executor, {"extra_quote": pd.DataFrame()})
    assert "pos_type" in uncovered(strategy, executor, {}, pos_type="InfPosition")
    monkeypatch.setattr(qlib, "__version__", "0.9.99")
    assert "Qlib 0.9.99" in uncovered(strategy, executor, {})


def test_an_uncovered_backtest_runs_qlibs_own_with_a_log_line(monkeypatch, caplog):
    import qlib.backtest

    from qlib_ext.backtest.fast import fast_backtest

    calls = []
    monkeypatch.setattr(qlib.backtest, "backtest", lambda *args: calls.append(args) or "stock result")
    strategy = {"class": "WeightStrategyBase", "module_path": "qlib.contrib.strategy", "kwargs": {}}
    executor = {"class": "SimulatorExecutor", "kwargs": {"time_per_step": "day"}}
    with caplog.at_level(logging.INFO, logger="qlib_ext.backtest.fast"):
        assert fast_backtest("2020-01-02", "2020-02-03", strategy, executor, exchange_kwargs={"min_cost": 1}) \
            == "stock result"
    assert calls == [("2020-01-02", "2020-02-03", strategy, executor, "SH000300", 1e9, {"min_cost": 1}, "Position")]
    assert "fast backtest: stock path (strategy WeightStrategyBase" in caplog.text


def test_patches_are_removed_after_the_backtest():
    from qlib.backtest.position import Position
    from qlib.backtest.report import PortfolioMetrics

    from qlib_ext.backtest.patches import fast_methods

    stock, sell = PortfolioMetrics._sample_benchmark, Position._sell_stock
    with fast_methods(), fast_methods():
        assert "__deepcopy__" in Position.__dict__ and Position._sell_stock is not sell
    assert "__deepcopy__" not in Position.__dict__ and PortfolioMetrics._sample_benchmark is stock
    assert Position._sell_stock is sell


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_strategy_bookkeeping_orders_as_pandas(dtype):
    """reindex + sort_values(ascending=False) and Index.union, with ties, NaN and empty sides."""
    import numpy as np
    import pandas as pd

    from qlib_ext.backtest.strategy import _Day, union_order

    rng = np.random.default_rng(5)
    codes = [f"SH{600000 + i}" for i in range(60)]
    for trial in range(150):
        values = rng.integers(0, 6, 60).astype(dtype) if trial % 2 else rng.normal(size=60).astype(dtype)
        values[rng.random(60) < 0.1] = np.nan
        series = pd.Series(values, index=pd.Index(codes, name="instrument"))
        day = _Day(series)
        held = list(rng.choice(codes + ["SZ999999", "SZ999998"], int(rng.integers(0, 25)), replace=False))
        want = list(series.reindex(held).sort_values(ascending=False).index)
        assert day.desc(held, day.reindex(held)) == want
        keep = ~series.index.isin(want)
        assert day.desc(day.codes[keep], day.values[keep]) == list(series[keep].sort_values(ascending=False).index)
        other = [c for c in codes if c not in held][: int(rng.integers(0, 8))]
        assert union_order(want, other) == list(series.reindex(want).index.union(pd.Index(other)))


def test_scalar_isclose_is_numpys():
    import numpy as np

    from qlib_ext.backtest.exchange import _isclose

    rng = np.random.default_rng(2)
    base = rng.lognormal(5, 3, 400)
    pairs = [(a, a * (1 + d)) for a in base for d in (0.0, 9e-6, 1e-5, 1.1e-5, -1e-5, 1e-3)]
    pairs += [(0, 0.0), (0.0, 1e-8), (1e-8, 0.0), (2e-8, 0), (np.nan, 1.0), (np.inf, np.inf), (np.inf, 1e308),
              (-np.inf, np.inf), (np.float64(100.0), 100), (np.float32(0.1), 0.1), (300, 300.00001)]
    for x, y in pairs:
        for a, b in ((x, y), (y, x), (np.float64(x), y)):
            assert _isclose(a, b) == bool(np.isclose(a, b)), (a, b)


def test_fast_records_swaps_qlibs_backtest_only_inside_the_block():
    from qlib.backtest import backtest
    from qlib.workflow import record_temp

    from qlib_ext.backtest.fast import fast_backtest, fast_records

    with fast_records():
        with fast_records():
            assert record_temp.normal_backtest is fast_backtest
        assert record_temp.normal_backtest is fast_backtest
        with fast_records(enabled=False):
            assert record_temp.normal_backtest is fast_backtest  # an outer block still wants it
    assert record_temp.normal_backtest is backtest
    with fast_records(enabled=False):
        assert record_temp.normal_backtest is backtest


def test_workers_fast_backtest_switch(tmp_path):
    from qlib_ext.errors import ConfigError
    from qlib_ext.worker.settings import WorkerSettings
    from qlib_ext.workflow.spec import parse_workers

    wf = tmp_path / "wf.yaml"
    assert parse_workers(None, wf).fast_backtest is True
    assert parse_workers({"fast_backtest": False}, wf).fast_backtest is False
    with pytest.raises(ConfigError, match="workers.fast_backtest.*true or false"):
        parse_workers({"fast_backtest": "off"}, wf)
    assert WorkerSettings(pool="p", mongo_url="m", mlflow_uri="u", provider_uri="d").fast_backtest is True


# ----------------------------------------------------------------------------- the child process

def _write_market(root: Path) -> dict:
    """30 stocks x 115 weekdays (2015-01-05 .. 2015-08-07) with suspensions, a delisting, NaN opens."""
    import numpy as np
    import pandas as pd

    from qlib_ext.data.qlib_format import Panel, write_panel
    from qlib_ext.data.synth import generate

    calendar = pd.bdate_range("2015-01-05", "2015-08-07")
    panel = generate(calendar, 30, seed=3)
    rng = np.random.default_rng(1)
    fields, n = panel.fields, 30
    for j in rng.choice(n, 6, replace=False):  # suspensions: every field NaN for a stretch
        first = int(rng.integers(len(calendar) - 70, len(calendar) - 10))
        for arr in fields.values():
            arr[first:first + int(rng.integers(1, 8)), j] = np.nan
    for arr in fields.values():  # a delisting two months before the end
        arr[len(calendar) - 40:, 5] = np.nan
    opens = fields["open"][:, :n]
    holes = rng.random(opens.shape) < 0.02
    opens[holes & np.isfinite(opens)] = np.nan
    write_panel(root, Panel(panel.calendar, panel.symbols, fields, listed=panel.symbols[:n]), ["csi300"])
    close = fields["close"][:, :n]
    listed_from = np.isfinite(close).argmax(axis=0)
    change = np.abs(fields["change"][:, :n])
    return {"suspended_rows": int(sum(np.isnan(close[listed_from[j]:len(calendar) - 40, j]).sum() for j in range(n))),
            "late_listed": int((listed_from > 0).sum()), "delisted": 1, "nan_open_rows": int(holes.sum()),
            "limit_rows": int((change >= 0.095).sum())}


def _prediction(frame: bool = False):
    import numpy as np
    from qlib.data import D

    close = D.features(D.instruments("csi300"), ["$close"], "2015-01-05", END)["$close"]
    rng = np.random.default_rng(0)
    score = -close.groupby(level="instrument").pct_change(5) + rng.normal(0, 0.01, len(close))
    pred = score.rename("score").swaplevel().sort_index().loc[START:]
    pred = pred[rng.random(len(pred)) > 0.03]  # some stocks missing on some days
    pred.iloc[::41] = np.nan
    pred = pred.drop(pred.loc["2015-06-15":"2015-06-15"].index)  # a day without predictions
    if frame:
        return pred.to_frame("score").assign(other=-pred)
    return pred


def _diff(a, b, what: str) -> list[str]:
    import pandas as pd

    try:
        if isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        elif isinstance(a, pd.Series):
            pd.testing.assert_series_equal(a, b, check_exact=True)
        elif a != b:
            return [f"{what}: {a!r} != {b!r}"]
    except AssertionError as e:
        return [f"{what}: {str(e)[:500]}"]
    return []


def _compare(stock, fast) -> list[str]:
    from qlib.contrib.evaluate import indicator_analysis, risk_analysis

    (report, positions), (report_f, positions_f) = stock[0]["1day"], fast[0]["1day"]
    diff = _diff(report, report_f, "report_normal")
    diff += _diff(list(positions), list(positions_f), "position days")
    for day in positions:
        a, b = positions[day], positions_f.get(day)
        if b is None or a.position != b.position or type(a) is not type(b) or a.__dict__.keys() != b.__dict__.keys():
            diff.append(f"position {day}: {getattr(b, 'position', None)} != {a.position}")
            break
    diff += _diff(stock[1]["1day"][0], fast[1]["1day"][0], "indicators")
    for name, cost in (("without_cost", 0), ("with_cost", 1)):
        excess, excess_f = (r["return"] - r["bench"] - cost * r["cost"] for r in (report, report_f))
        diff += _diff(risk_analysis(excess, freq="1day"), risk_analysis(excess_f, freq="1day"), name)
    diff += _diff(indicator_analysis(stock[1]["1day"][0]), indicator_analysis(fast[1]["1day"][0]), "ind. analysis")
    return diff


def _run_case(name: str, exchange) -> dict:
    import numpy as np
    from qlib.backtest import backtest, get_exchange

    from qlib_ext.backtest import fast

    strategy_kw, exchange_kw, backtest_kw = (dict(x) for x in CASES[name])
    frame = strategy_kw.pop("signal", None) == "frame"
    own = exchange_kw.pop("own", False)
    bt = {"start_time": START, "end_time": END, "benchmark": "SH000300", "account": 10_000_000, **backtest_kw}
    ex_kwargs = {**EX, **exchange_kw}
    if not own:
        ex_kwargs = {"exchange": exchange if not exchange_kw else get_exchange(
            codes="csi300", start_time=START, end_time=END, **ex_kwargs)}
    results, took_fast = [], []
    for fn in (backtest, fast.fast_backtest):
        strategy = {"class": "TopkDropoutStrategy", "module_path": "qlib.contrib.strategy.signal_strategy",
                    "kwargs": {"signal": _prediction(frame), **strategy_kw}}
        executor = {"class": "SimulatorExecutor", "module_path": "qlib.backtest.executor",
                    "kwargs": {"time_per_step": "day", "generate_portfolio_metrics": True, "verbose": False}}
        took_fast.append(fast.uncovered(strategy, executor, ex_kwargs) is None)
        np.random.seed(7)
        try:
            results.append(fn(strategy=strategy, executor=executor, exchange_kwargs=ex_kwargs, **bt))
        except Exception as e:  # noqa: BLE001 - Qlib's own failures must be the fast path's too
            results.append(f"{type(e).__name__}: {e}")
    if isinstance(results[0], str) or isinstance(results[1], str):
        return {"fast_path": took_fast[1], "trades": 0, "diff": [] if results[0] == results[1] else results,
                "error": results[0]}
    report = results[0][0]["1day"][0]
    return {"fast_path": took_fast[1], "diff": _compare(*results), "trades": int((report["turnover"] > 0).sum())}


def _check_quote(exchange) -> dict:
    """Every stock x window (one bar, a weekend bar, 2-5 bars) x field x method: same value and type."""
    import numpy as np
    import pandas as pd
    from qlib.utils.time import epsilon_change

    from qlib_ext.backtest.exchange import fast_exchange

    fast_ex = fast_exchange(exchange)
    base, quote = exchange.quote, fast_ex.quote
    days = list(quote.days) + [pd.Timestamp("2015-08-10")]
    windows = [(d, epsilon_change(e)) for k in (1, 3) for d, e in zip(days, days[k:], strict=False)]
    counts = {"single": 0, "multi": 0, "none": 0, "mismatches": []}
    stocks = [*list(base.get_all_stock())[:8], "SH699999"]
    for stock in stocks:
        for start, end in windows:
            for field in ("$close", "$factor", "$volume", "$change", "limit_buy", "limit_sell"):
                for method in (None, "ts_data_last", "sum", "all"):
                    if method is None and end - start > pd.Timedelta(days=1):
                        continue  # Qlib returns its own IndexData slice; the quote hands that query to it
                    a = base.get_data(stock, start, end, field, method)
                    b = quote.get_data(stock, start, end, field, method)
                    counts["single" if end - start < pd.Timedelta(days=1) else "multi"] += 1
                    counts["none"] += a is None
                    same = type(a) is type(b) and (a is None or a == b or (np.isnan(a) and np.isnan(b)))
                    if not same:
                        counts["mismatches"].append(f"{stock} {start} {end} {field} {method}: {a!r} != {b!r}")
            for direction in (None, 0, 1):
                a = exchange.check_stock_limit(stock, start, end, direction)
                b = fast_ex.check_stock_limit(stock, start, end, direction)
                if type(a) is not type(b) or a != b:
                    counts["mismatches"].append(f"limit {stock} {start} {direction}: {a!r} != {b!r}")
            a, b = exchange.check_stock_suspended(stock, start, end), fast_ex.check_stock_suspended(stock, start, end)
            if type(a) is not type(b) or a != b:
                counts["mismatches"].append(f"suspended {stock} {start} {end}: {a!r} != {b!r}")
    return counts


def _check_record(tmp: Path, exchange) -> dict:
    """PortAnaRecord in real MLflow runs, stock and inside fast_records: logged metrics and artifacts equal."""
    import numpy as np
    from qlib.workflow import R
    from qlib.workflow.record_temp import PortAnaRecord

    from qlib_ext.backtest.fast import fast_records, uncovered
    from qlib_ext.tracking.artifacts import ArtifactLedger
    from qlib_ext.worker.body import backtest_stage

    config = {"strategy": {"class": "TopkDropoutStrategy", "module_path": "qlib.contrib.strategy",
                           "kwargs": {"signal": "<PRED>", "topk": 8, "n_drop": 2}},
              "backtest": {"start_time": START, "end_time": END, "account": 10_000_000, "benchmark": "SH000300",
                           "exchange_kwargs": {"exchange": exchange}}}
    seen = []
    out = []
    calls = {"log_metric": 0, "log_batch": 0}
    for how in ("stock", "fast", "stage"):
        with R.start(experiment_name="fast_backtest", recorder_name=how):
            recorder = R.get_recorder()
            if how == "stage":  # as a worker's stage runs it: a guarded run, the metrics counted
                ArtifactLedger(recorder.id).guard(recorder)
                for name in calls:
                    setattr(recorder.client, name, _counted(getattr(recorder.client, name), calls, name))
            recorder.save_objects(**{"pred.pkl": _prediction().to_frame("score"), "label.pkl": _prediction()})
            np.random.seed(7)
            with fast_records(how != "stock"):
                from qlib.workflow import record_temp

                seen.append(record_temp.normal_backtest.__name__)
                if how == "stage":
                    backtest_stage(PortAnaRecord(recorder, config), None)
                else:
                    PortAnaRecord(recorder, config).generate()
        # Qlib's recorder logs metrics asynchronously: read them once the run has ended
        metrics = recorder.client.get_run(recorder.id).data.metrics
        out.append((metrics, {name: recorder.load_object(f"portfolio_analysis/{name}")
                              for name in ("report_normal_1day.pkl", "positions_normal_1day.pkl",
                                           "indicators_normal_1day.pkl", "port_analysis_1day.pkl",
                                           "indicator_analysis_1day.pkl")}))
    (metrics, arts), *others = out
    diff = []
    for metrics_f, arts_f in others:
        diff += _diff(sorted(metrics), sorted(metrics_f), "metric names")
        diff += [f"metric {k}: {metrics[k]} != {metrics_f.get(k)}" for k in metrics if metrics[k] != metrics_f.get(k)]
        for name in arts:
            if name.startswith("positions"):
                a, b = arts[name], arts_f[name]
                diff += _diff([(d, p.position) for d, p in a.items()], [(d, p.position) for d, p in b.items()], name)
            else:
                diff += _diff(arts[name], arts_f[name], name)
    covered = uncovered({**config["strategy"], "kwargs": {"signal": _prediction()}},
                        {"class": "SimulatorExecutor", "module_path": "qlib.backtest.executor",
                         "kwargs": {"time_per_step": "day"}}, config["backtest"]["exchange_kwargs"]) is None
    return {"fast_path": covered and seen == ["backtest", "fast_backtest", "fast_backtest"], "metrics": len(metrics),
            "diff": diff, "stage_calls": calls}


def _counted(method, calls: dict, name: str):
    def counted(*args, **kwargs):
        calls[name] += 1
        return method(*args, **kwargs)
    return counted


def _child(tmp: Path, out: Path) -> None:
    import qlib
    from qlib.backtest import get_exchange

    data = _write_market(tmp / "data")
    qlib.init(provider_uri=str(tmp / "data"), region="cn", kernels=1, logging_level=logging.ERROR,
              exp_manager={"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                           "kwargs": {"uri": f"sqlite:///{tmp}/mlflow.db", "default_exp_name": "Experiment"}})
    exchange = get_exchange(codes="csi300", start_time=START, end_time=END, **EX)
    from qlib_ext.backtest.strategy import DayTopkDropoutStrategy

    steps = {"n": 0}
    decide = DayTopkDropoutStrategy.generate_trade_decision

    def counted(self, *args, **kwargs):  # instrumentation: which cases ran the array strategy
        steps["n"] += 1
        return decide(self, *args, **kwargs)

    DayTopkDropoutStrategy.generate_trade_decision = counted
    verdicts = {"data": data, "quote": _check_quote(exchange), "record": _check_record(tmp, exchange), "cases": {}}
    for name in CASES:
        t0, before = time.perf_counter(), steps["n"]
        verdicts["cases"][name] = _run_case(name, exchange)
        verdicts["cases"][name]["day_strategy_steps"] = steps["n"] - before
        verdicts["cases"][name]["seconds"] = round(time.perf_counter() - t0, 2)
    out.write_text(json.dumps(verdicts, default=str))


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
