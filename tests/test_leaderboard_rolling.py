"""Rolling windows of one configuration become one leaderboard row: the metric's mean and std over
windows, and the IC of the stitched out-of-sample predictions (real runs, real store, real MLflow)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import mlflow
import pytest
from grid_yaml import write_workflow

pytestmark = pytest.mark.slow

GRID = """
grid:
    pool: roll
    params:
        task.model.kwargs.learning_rate: [0.05, 0.2]
    rolling: {step: 40, type: expanding}
"""


def test_windows_aggregate_per_configuration(tmp_path, synth_provider, mongo_url, shared_dataset_cache):
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    wf = write_workflow(tmp_path / "roll.yaml", synth_provider, GRID)
    common = ["--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri]
    run = subprocess.run([sys.executable, "-m", "qlib_ext", "run", str(wf), "-n", "2", *common],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    out = subprocess.run([sys.executable, "-m", "qlib_ext", "leaderboard", "roll", "--json", *common],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = json.loads(out)["rows"]
    assert len(rows) == 2, "one row per learning rate"
    client = mlflow.MlflowClient(mlflow_uri)
    for row in rows:
        assert row["metrics"]["windows"] == len(row["runs"]) >= 2
        assert not any(k.startswith("window.") for k in row["params"])
        ics = [client.get_run(r).data.metrics["IC"] for r in row["runs"]]
        assert row["metrics"]["IC"] == pytest.approx(statistics.fmean(ics))
        assert row["metrics"]["IC.std"] == pytest.approx(statistics.stdev(ics))
        assert -1 < row["metrics"]["stitched.IC"] < 1
        # every column is aggregated, not only the sort metric; Sharpe/DSR on the stitched returns
        assert row["metrics"]["ICIR"] is not None and "ICIR.std" in row["metrics"] and row["stats"]["dsr"] is not None
        assert row["stats"]["T"] > 40 * (len(row["runs"]) - 1)
        # no grid.rolling.trunc_days: Alpha158's label (2 days ahead) reaches each window's test start
        assert "label_leak" in row["flags"]
        lrs = {client.get_run(r).data.params["learning_rate"] for r in row["runs"]}
        assert len(lrs) == 1, "a row never mixes configurations"
    assert rows[0]["metrics"]["IC"] >= rows[1]["metrics"]["IC"]
