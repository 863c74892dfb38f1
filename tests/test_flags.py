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


def _ic(mean: float, sd: float = 0.1, days: int = 60, seed: int = 0) -> dict:
    values = np.random.default_rng(seed).normal(0, sd, days)
    values = values - values.mean() + mean  # exactly this mean
    return {"dates": [str(d.date()) for d in pd.bdate_range("2020-01-01", periods=days)], "values": list(values)}


def test_run_flags_fire_on_what_they_name():
    good = {"best_iteration": 30, "pred_flat_share": 0.0, "trade_days": 50, "label_horizon": 2, "label_gap_days": 3,
            "ic": _ic(0.08)}
    assert fl.run_flags(good, {"IC": 0.05}, rolling=True) == []
    assert fl.run_flags({**good, "pred_flat_share": 0.9}, {}, rolling=False) == [fl.LEARNED_NOTHING]
    assert fl.run_flags(good, {"IC": None}, rolling=False) == [fl.NAN_IC]
    nan_ic = {**good, "ic": {"dates": ["d"], "values": [None]}}
    assert fl.run_flags(nan_ic, {}, rolling=False) == [fl.NAN_IC]
    assert fl.run_flags({**good, "trade_days": 0}, {}, rolling=False) == [fl.NO_TRADES]
    leaky = {**good, "label_gap_days": 1}
    assert fl.run_flags(leaky, {}, rolling=True) == [fl.LABEL_LEAK]
    assert fl.run_flags(leaky, {}, rolling=False) == [], "only rolling windows are checked"


@pytest.mark.parametrize("h", [1, 5, 20])
def test_qlib_rolling_label_and_trunc_days_do_not_leak(h):
    # qlib.contrib.rolling: label Ref($close, -(h+1)) / Ref($close, -1) - 1, RollingGen(trunc_days=h+1): the
    # last train/valid day is h+1 trading days before the test start; its label reads the first test day's
    # close, known when the first test prediction (after that close) is made.
    label = f"Ref($close, -{h + 1}) / Ref($close, -1) - 1"
    horizon = fl.label_horizon({"class": "Alpha158", "kwargs": {"label": [label]}})
    assert horizon == h + 1
    at_limit = {"label_horizon": horizon, "label_gap_days": h + 1}
    assert fl.LABEL_LEAK not in fl.run_flags(at_limit, {}, rolling=True)
    one_short = {"label_horizon": horizon, "label_gap_days": h}  # trunc_days = h: reads the close of s + 1
    assert fl.LABEL_LEAK in fl.run_flags(one_short, {}, rolling=True)
    adjacent = {"label_horizon": horizon, "label_gap_days": 1}  # no trunc_days at all
    assert fl.LABEL_LEAK in fl.run_flags(adjacent, {}, rolling=True)


def test_learned_nothing_is_defined_on_the_signal():
    # the TPE search's best row: one tree (best_iteration 1) with a real IC of 0.13 learned something
    one_tree = {"best_iteration": 1, "pred_flat_share": 0.0, "label_horizon": 2, "ic": _ic(0.13)}
    assert fl.LEARNED_NOTHING not in fl.run_flags(one_tree, {"IC": 0.13}, rolling=False)
    # predictions constant within every day rank nothing, whatever the model
    flat = {"pred_flat_share": 1.0, "ic": {"dates": ["2020-01-02"] * 3, "values": [None] * 3}}
    assert fl.LEARNED_NOTHING in fl.run_flags(flat, {}, rolling=False)
    # a Linear model (no iterations at all) whose IC is noise around zero: nothing learned
    linear_noise = {"best_iteration": None, "pred_flat_share": 0.0, "label_horizon": 2, "ic": _ic(0.002)}
    assert fl.LEARNED_NOTHING in fl.run_flags(linear_noise, {"IC": 0.002}, rolling=False)
    # a constant prediction whose IC is float noise (1e-19), not information
    float_noise = {"pred_flat_share": 0.0, "ic": {"dates": ["d"] * 5, "values": [-4e-19] * 5}}
    assert fl.learned_nothing(float_noise)
    # a significantly negative IC is information too (an inverted signal), not "nothing"
    assert not fl.learned_nothing({"pred_flat_share": 0.0, "ic": _ic(-0.1)})


def test_ic_t_stat_widens_for_overlapping_labels():
    rng = np.random.default_rng(1)
    ic = np.convolve(rng.normal(0.01, 0.1, 300), np.ones(20) / 20, mode="valid")  # a 20-day label's overlap
    naive, hac = fl.ic_t_stat(ic, horizon=1), fl.ic_t_stat(ic, horizon=20)
    assert abs(hac) < 0.8 * abs(naive), "neighbouring days' ICs share most of their label"
    assert fl.ic_t_stat([0.1, None]) is None


def test_inert_axis_flags_the_configurations_it_did_not_change():
    rows = [({"lr": lr, "leaves": lv}, {"IC": ic}) for lr, lv, ic in
            [(0.1, 8, 0.03), (0.2, 8, 0.03), (0.1, 16, 0.05), (0.2, 16, 0.05)]]
    assert fl.inert_axes(rows) == {"lr": [0, 1, 2, 3]}
    rows[3] = ({"lr": 0.2, "leaves": 16}, {"IC": 0.06})
    assert fl.inert_axes(rows) == {"lr": [0, 1]}, "lr changed nothing at 8 leaves, something at 16"
    assert fl.inert_axes([({"lr": 0.1}, {}), ({"lr": 0.2}, {})]) == {}, "no metrics, nothing to compare"


def test_inert_within_the_stated_tolerance():
    # two fit_intercept runs whose IC differs in the 7th digit changed nothing a reader could see
    same = [({"fit_intercept": v}, {"IC": ic, "IR": 1.2345678}) for v, ic in [(True, 0.0312345), (False, 0.0312346)]]
    assert fl.inert_axes(same) == {"fit_intercept": [0, 1]}
    apart = [({"lr": v}, {"IC": ic}) for v, ic in [(0.1, 0.0312), (0.2, 0.0316)]]  # 1.3 % apart: a change
    assert fl.inert_axes(apart) == {}


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


def test_indistinguishable_grid_says_so_instead_of_a_pbo():
    from qlib_ext.analysis.leaderboard import _pbo_line

    days = pd.bdate_range("2020-01-01", periods=300)
    base = np.random.default_rng(0).normal(0.0008, 0.01, 300)
    tied = [_row(f"fit_intercept={v}", pd.Series(base, index=days)) for v in (True, False)]
    grid = annotate(tied)
    assert grid["pbo"]["pbo"] is None and grid["pbo"]["indistinguishable"] and grid["pbo"]["cscv_pbo"] == 0.5
    rng = np.random.default_rng(0)
    flat = [_row(f"lgb{i}", pd.Series(base + rng.normal(0, 0.0005, 300), index=days)) for i in range(4)]
    grid = annotate(flat)
    line = _pbo_line(grid)
    assert grid["pbo"]["pbo"] is None and grid["pbo"]["cscv_pbo"] > 0.7
    assert "indistinguishable" in line and "Jobson-Korkie/Memmel" in line and "flat, not overfit" in line
    flat.append(_row("skill", pd.Series(base + 0.003, index=days)))
    grid = annotate(flat)
    assert grid["pbo"]["pbo"] is not None and not grid["pbo"]["indistinguishable"]
    assert "holds up" in _pbo_line(grid) and "PBO (CSCV, S=16" in _pbo_line(grid)


def test_rolling_row_decides_learned_nothing_on_the_stitched_ic():
    from qlib_ext.analysis.leaderboard import _window_flags

    windows = [_ic(0.02, sd=0.1, days=20, seed=s) for s in range(8)]  # each window alone: |t| < 1.96
    members = [{"flags": fl.run_flags({"pred_flat_share": 0.0, "ic": w}, {}, rolling=True),
                "validity": {"pred_flat_share": 0.0, "ic": w}} for w in windows]
    assert all(fl.LEARNED_NOTHING in m["flags"] for m in members)
    stitched = pd.Series([v for w in windows for v in w["values"]])
    assert _window_flags(members, stitched) == [], "160 days of IC 0.02 is a signal"
    assert _window_flags(members, None) == [fl.LEARNED_NOTHING], "no stitched IC: the windows' own flags"


def test_daily_ic_from_predictions_and_labels():
    from qlib_ext.analysis.series import daily_ic

    index = pd.MultiIndex.from_product([pd.bdate_range("2020-01-01", periods=3), ["A", "B", "C"]],
                                       names=["datetime", "instrument"])
    pred = pd.DataFrame({"score": [1.0, 2.0, 3.0] * 3}, index=index)
    label = pd.DataFrame({"LABEL0": [0.1, 0.2, 0.3, 0.3, 0.2, 0.1, 0.1, 0.3, 0.2]}, index=index)
    assert daily_ic(pred, label).round(6).tolist() == [1.0, -1.0, 0.5]
