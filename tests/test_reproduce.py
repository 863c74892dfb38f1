"""The comparison behind ``qlib-ext reproduce`` (pure logic; the real re-run is in test_validity_e2e)."""

from __future__ import annotations

import math

from qlib_ext.worker.reproduce import _renamed, compare


def test_exact_match_skips_timings_and_system_metrics():
    cpu = "system/vm/cpu_utilization_percentage"  # MLflow's system metrics measure the machine
    rep = compare("a", "b", {"IC": 0.1, "time.fit_s": 3.0, "peak_rss_mb": 900.0, cpu: 51.8},
                  {"IC": 0.1, "time.fit_s": 5.0, "peak_rss_mb": 950.0, cpu: 52.4})
    assert rep.ok and list(rep.compared) == ["IC"] and "exact match" in rep.table()


def test_last_bit_differences_fail_unless_tolerated():
    recorded, again = {"IR": 3.0251108102752977}, {"IR": 3.0251108102752986}
    assert not compare("a", "b", recorded, again).ok
    assert "MISMATCH" in compare("a", "b", recorded, again).table()
    assert compare("a", "b", recorded, again, tolerance=1e-12).ok


def test_nan_equals_nan_and_missing_metrics_fail():
    assert compare("a", "b", {"IC": math.nan}, {"IC": math.nan}).ok
    rep = compare("a", "b", {"IC": 0.1, "ICIR": 0.5}, {"IC": 0.1})
    assert not rep.ok and rep.missing == ["ICIR"]


def test_reproduced_runs_go_to_their_own_experiment():
    task = {"qlib_ext": {"experiment": "grid", "run_name": "lgb lr=0.1"}, "model": {}}
    meta = _renamed(task)["qlib_ext"]
    assert meta["experiment"] == "grid-reproduce" and meta["run_name"] == "lgb lr=0.1 (reproduced)"
    assert task["qlib_ext"]["experiment"] == "grid", "the loaded task is left alone"
