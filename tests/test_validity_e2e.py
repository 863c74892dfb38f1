"""End to end on real runs (real store, MLflow, Qlib, LightGBM): a planted-alpha configuration beside a
no-information-label configuration and a model that cannot learn; the leaderboard ranks the planted
one first with a far higher Deflated Sharpe, reports N and PBO, flags the purpose-built bad rows, and
``qlib-ext reproduce`` re-runs the winner to the exact same metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pymongo
import pytest
from click.testing import CliRunner
from grid_yaml import write_workflow

from qlib_ext.analysis.leaderboard import leaderboard_frame
from qlib_ext.cli import main

pytestmark = pytest.mark.slow

REAL = '[["Ref($close, -2)/Ref($close, -1) - 1"], ["LABEL0"]]'
"""Alpha158's own label: the next-but-one day's return, which the synthetic data's planted reversal predicts."""

# The return 30 days ahead: independent of today's features in the synthetic data (i.i.d. noise apart
# from the short reversal), so a model trained on it learns noise, like a shuffled label.
NOISE = '[["Ref($close, -30)/Ref($close, -29) - 1"], ["LABEL0"]]'

GRID = f"""
grid:
    pool: validity
    params:
        +data_handler_config.label: [{REAL}, {NOISE}]
    models:
        lgb:
            class: LGBModel
            module_path: qlib.contrib.model.gbdt
            kwargs: {{loss: mse, learning_rate: 0.1, num_leaves: 16, num_boost_round: 30, verbose: -1}}
        dead:  # no leaf can hold 10^6 samples: no split, one constant prediction for every stock
            class: LGBModel
            module_path: qlib.contrib.model.gbdt
            kwargs: {{loss: mse, num_boost_round: 30, min_data_in_leaf: 1000000, verbose: -1}}
"""

LABEL_AXIS = "data_handler_config.label"


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qlib_ext", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _board(*args: str):
    """``qlib-ext leaderboard`` in this process (no interpreter start-up; it never calls qlib.init)."""
    return CliRunner().invoke(main, ["leaderboard", *args])


def test_planted_alpha_ranks_first_and_flags_fire(tmp_path, synth_provider, mongo_url):
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri]
    wf = write_workflow(tmp_path / "validity.yaml", synth_provider, GRID)
    _cli("run", str(wf), "-n", "1", *common)

    board = json.loads(_board("validity", "--json", *common).output)
    rows, grid = board["rows"], board["grid"]
    by_name = {r["run_name"]: r for r in rows}
    assert len(rows) == 4 and grid["trials"] == grid["trials_in_pool"] == 4 and grid["metric"] == "IC"
    planted = rows[0]
    assert planted["run_name"].startswith("lgb") and "-2" in json.dumps(planted["coords"][LABEL_AXIS])
    others = [r["stats"]["dsr"] for r in rows[1:]]
    print({r["run_name"]: (r["metrics"].get("IC"), r["stats"]["sharpe"], r["stats"]["dsr"], r["flags"]) for r in rows})
    print(grid["pbo"])
    assert planted["stats"]["dsr"] > 0.5 and planted["stats"]["dsr"] - max(others) > 0.3
    assert grid["pbo"]["strategies"] == 4 and grid["pbo"]["blocks"] == 16
    # 78 days cannot prove Sharpe 3.3 beats -0.4 at 5 % over 6 pairs (|z| 1.54 < 2.64): PBO is replaced by that
    # verdict, CSCV's number kept beside it
    pbo = grid["pbo"]["cscv_pbo"] if grid["pbo"]["indistinguishable"] else grid["pbo"]["pbo"]
    assert 0.0 <= pbo <= 0.5
    for row in rows:  # our Sharpe is Qlib's information ratio of the same series
        assert row["stats"]["sharpe"] == pytest.approx(row["metrics"]["1day.excess_return_with_cost.information_ratio"],
                                                       rel=1e-9)
    dead = [r for name, r in by_name.items() if name.startswith("dead")]
    assert len(dead) == 2
    for row in dead:  # the label cannot matter to a model that never splits: same backtest either way
        assert {"learned_nothing", f"inert:{LABEL_AXIS}", "short_test"} <= set(row["flags"]), row["flags"]
    # a constant prediction's IC is NaN, or float noise (1e-19) when the label happens to allow it
    assert any("nan_ic" in r["flags"] for r in dead)
    assert not any(f.startswith(("learned_nothing", "nan_ic", "inert")) for f in planted["flags"])

    docs = list(pymongo.MongoClient(mongo_url)["default_task_db"]["validity"].find({}))
    validity = next(d["outcome"]["validity"] for d in docs if d["outcome"]["run_id"] == planted["run_id"])
    assert len(validity["returns"]["dates"]) == len(validity["returns"]["values"]) == planted["stats"]["T"] > 50
    assert validity["trade_days"] > 0 and validity["best_iteration"] > 1
    assert validity["label_horizon"] == 2 and validity["label_gap_days"] == 1

    table = _board("validity", "--top", "2", "--trials", "10", *common).output
    assert "14 configurations tried" in table and "showing 2 of 4" in table and "CSCV, S=16" in table
    bad = _board("validity", "--metric", "no_such_metric", *common)
    assert bad.exit_code != 0 and "unknown metric 'no_such_metric'" in bad.output and "ICIR" in bad.output

    client = mlflow.MlflowClient(mlflow_uri)  # the worker tagged its own flags on the run
    assert "learned_nothing" in client.get_run(dead[0]["run_id"]).data.tags["qlib_ext.flags"]
    assert _board("validity", "--tag-runs", *common).exit_code == 0  # and the leaderboard adds the grid's
    assert "inert:" in client.get_run(dead[0]["run_id"]).data.tags["qlib_ext.flags"]
    frame, stats = leaderboard_frame("validity", mongo_url=mongo_url, mlflow_uri=mlflow_uri, metric="dsr")
    assert list(frame["run_id"])[0] == planted["run_id"] and stats["metric"] == "dsr"
    assert {"sharpe", "psr", "dsr", "min_trl", "T", "flags", "IC"} <= set(frame.columns)

    again = _cli("reproduce", planted["run_id"], *common)
    assert "exact match" in again.stdout, again.stdout
