"""How the leaderboard picks and checks its ranking metric (pure logic on hand-made rows)."""

from __future__ import annotations

import pytest

from qlib_ext.analysis.leaderboard import SWEEP_METRIC, _choose_metric, _sort_key, format_table
from qlib_ext.errors import ConfigError

ROWS = [{"metrics": {"IC": 0.1, "ICIR": 0.5, SWEEP_METRIC: 1.2}, "kind": None}]


def test_metric_matches_case_insensitively():
    assert _choose_metric(ROWS, "icir", {}, "p") == ("ICIR", "max")
    assert _choose_metric(ROWS, "DSR", {}, "p") == ("dsr", "max")


def test_unknown_metric_lists_the_logged_ones():
    with pytest.raises(ConfigError, match=r"unknown metric 'ICX' in --metric; the runs logged: .*ICIR.*sharpe"):
        _choose_metric(ROWS, "ICX", {}, "p")
    with pytest.raises(ConfigError, match="grid.objective.metric of pool p"):
        _choose_metric(ROWS, None, {"metric": "nope", "direction": "maximize"}, "p")


def test_defaults_objective_and_direction():
    assert _choose_metric(ROWS, None, {}, "p") == ("IC", "max")
    sweep = [{**ROWS[0], "kind": "backtest"}]
    assert _choose_metric(sweep, None, {}, "p") == (SWEEP_METRIC, "max"), "a sweep's rows share one IC"
    objective = {"metric": "ICIR", "direction": "minimize"}
    assert _choose_metric(ROWS, None, objective, "p") == ("ICIR", "min")
    assert _choose_metric(ROWS, "icir", objective, "p") == ("ICIR", "min"), "--metric naming the objective keeps it"
    values = [0.3, None, 0.1, 0.2]
    assert sorted(values, key=lambda v: _sort_key(v, "min")) == [0.1, 0.2, 0.3, None]
    assert sorted(values, key=lambda v: _sort_key(v, "max")) == [0.3, 0.2, 0.1, None]


def test_table_says_how_many_were_tried_and_shown():
    rows = [{"run_name": f"r{i}", "run_id": str(i), "metrics": {"IC": 0.1 - i / 100}, "flags": ["short_test"] * i,
             "stats": {"sharpe": 1.0, "psr": 0.9, "dsr": 0.5, "T": 60}} for i in range(3)]
    grid = {"metric": "IC", "direction": "max", "trials": 13, "trials_in_pool": 3, "trials_declared": 10,
            "failed_tasks": 1, "pbo": {"error": "needs at least 2 configurations with returns, have 1"}}
    text = format_table(rows, grid, top=2)
    assert text.splitlines()[0] == ("13 configurations tried (N for the DSR: 3 with returns in this pool + 10 declared "
                                    "with --trials; 1 failed tasks not counted); ranked by IC (max); showing 2 of 3")
    assert "DSR" in text.splitlines()[1] and "r2" not in text and "PBO: not computed (needs at least 2" in text
