"""Sanity flags and the leaderboard's per-grid numbers on hand-made rows (pure logic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from qlib_ext.analysis import flags as fl
from qlib_ext.analysis.grid_stats import annotate


@pytest.mark.parametrize(("handler", "horizon"), [
    ({"class": "Alpha158"}, 2),
    ({"class": "qlib.contrib.data.handler.Alpha360"}, 2),
    ({"class": "Alpha158", "kwargs": {"label": [["Ref($close, -5)/Ref($close, -1) - 1"], ["LABEL0"]]}}, 5),
    ({"class": "Alpha158", "kwargs": {"label": ["Ref(Mean($close, 3), -3) / $close - 1"]}}, 3),
    ({"class": "MyHandler"}, None),
])
def test_label_horizon(handler, horizon):
    assert fl.label_horizon(handler) == horizon


def test_run_flags_fire_on_what_they_name():
    good = {"best_iteration": 30, "pred_flat_share": 0.0, "trade_days": 50, "label_horizon": 2, "label_gap_days": 3,
            "ic": {"dates": ["2020-01-02"], "values": [0.1]}}
    assert fl.run_flags(good, {"IC": 0.05}, rolling=True) == []
    assert fl.run_flags({**good, "best_iteration": 1}, {}, rolling=False) == [fl.LEARNED_NOTHING]
    assert fl.run_flags({**good, "pred_flat_share": 0.9}, {}, rolling=False) == [fl.LEARNED_NOTHING]
    assert fl.run_flags(good, {"IC": None}, rolling=False) == [fl.NAN_IC]
    assert fl.run_flags({**good, "ic": {"dates": ["d"], "values": [None]}}, {}, rolling=False) == [fl.NAN_IC]
    assert fl.run_flags({**good, "trade_days": 0}, {}, rolling=False) == [fl.NO_TRADES]
    leaky = {**good, "label_gap_days": 1}
    assert fl.run_flags(leaky, {}, rolling=True) == [fl.LABEL_LEAK]
    assert fl.run_flags(leaky, {}, rolling=False) == [], "only rolling windows are checked"
    assert fl.run_flags({**good, "label_gap_days": 2}, {}, rolling=True) == [fl.LABEL_LEAK]


def test_inert_axis_flags_the_configurations_it_did_not_change():
    rows = [({"lr": lr, "leaves": lv}, {"IC": ic}) for lr, lv, ic in
            [(0.1, 8, 0.03), (0.2, 8, 0.03), (0.1, 16, 0.05), (0.2, 16, 0.05)]]
    assert fl.inert_axes(rows) == {"lr": [0, 1, 2, 3]}
    rows[3] = ({"lr": 0.2, "leaves": 16}, {"IC": 0.06})
    assert fl.inert_axes(rows) == {"lr": [0, 1]}, "lr changed nothing at 8 leaves, something at 16"
    assert fl.inert_axes([({"lr": 0.1}, {}), ({"lr": 0.2}, {})]) == {}, "no metrics, nothing to compare"


def _row(name, returns, coords=None):
    return {"run_name": name, "returns": returns, "coords": coords or {}, "compare": {}, "flags": []}


def test_annotate_counts_trials_deflates_and_computes_pbo():
    rng = np.random.default_rng(0)
    days = pd.bdate_range("2020-01-01", periods=300)
    rows = [_row(f"noise{i}", pd.Series(rng.normal(0, 0.01, 300), index=days)) for i in range(9)]
    rows.append(_row("skill", pd.Series(rng.normal(0.003, 0.01, 300), index=days)))
    rows.append(_row("no backtest", None))
    grid = annotate(rows, trials=10, failed=2)
    assert grid["trials"] == 20 and grid["trials_in_pool"] == 10 and grid["failed_tasks"] == 2
    assert 0 <= grid["pbo"]["pbo"] <= 0.2 and grid["pbo"]["strategies"] == 10
    skill = rows[9]["stats"]
    assert skill["dsr"] > 0.8 and max(r["stats"]["dsr"] for r in rows[:9]) < 0.1
    assert skill["dsr"] < skill["psr"], "deflation lowers the probability"
    assert rows[10]["stats"]["dsr"] is None
    short = [r for r in rows[:9] if fl.SHORT_TEST in r["flags"]]
    assert short and fl.SHORT_TEST not in rows[9]["flags"]
    alone = [dict(r, flags=[]) for r in rows]
    assert annotate(alone)["trials"] == 10
    assert skill["dsr"] < alone[9]["stats"]["dsr"], "trials declared outside the pool deflate further"


def test_pbo_needs_two_configurations():
    assert "error" in annotate([_row("one", pd.Series([0.01, -0.01, 0.02] * 30))])["pbo"]
