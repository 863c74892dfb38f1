"""End to end with real parts: the embedded store over a socket, worker processes running real Qlib
(Alpha158, LightGBM, backtest), a sqlite MLflow, the CLI as users type it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pymongo
import pytest
from grid_yaml import write_workflow

pytestmark = pytest.mark.slow

GRID = """
grid:
    pool: e2e
    params:
        task.model.kwargs.learning_rate: [0.05, 0.2]
        task.model.kwargs.num_leaves: [8, 32]
"""


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qlib_ext", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"qlib-ext {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def mlflow_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_grid_runs_on_two_workers_into_mlflow_and_ranks(tmp_path, synth_provider, mongo_url, mlflow_uri):
    wf = write_workflow(tmp_path / "e2e.yaml", synth_provider, GRID)
    common = ["--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri]
    out = cli("run", str(wf), "-n", "2", *common).stdout
    assert "4 new of 4" in out
    assert "cache: 1 datasets and 1 backtest exchanges for 4 waiting tasks ready" in out and "(2 built)" in out
    assert "mlflow ui --backend-store-uri " + mlflow_uri in out

    db = pymongo.MongoClient(mongo_url)["default_task_db"]
    docs = list(db["e2e"].find({}))
    assert [d["status"] for d in docs] == ["done"] * 4
    assert len({d["worker"] for d in docs}) == 2, "both worker processes should have taken tasks"

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    grid_run = [r for r in runs if r.data.tags.get("qlib_ext.row") == "grid"]  # the grid's parent run
    runs = [r for r in runs if r not in grid_run]
    assert len(grid_run) == 1 and all(r.data.tags["mlflow.parentRunId"] == grid_run[0].info.run_id for r in runs)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    committed = {d["outcome"]["run_id"] for d in docs}
    assert {r.info.run_id for r in runs} == committed
    for run in runs:
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        assert p["learning_rate"] in ("0.05", "0.2")  # grid axes under short names (tracking/mlflow_ui.py)
        assert p["num_leaves"] in ("8", "32")
        assert p["model"] == "lgb"
        for key in ("IC", "ICIR", "Rank IC", "1day.excess_return_with_cost.annualized_return",
                    "1day.excess_return_without_cost.max_drawdown", "time.data_s", "time.fit_s",
                    "time.backtest_s", "peak_rss_mb"):
            assert key in m, key
        assert t["qlib_ext.pool"] == "e2e" and t["qlib_ext.grid_hash"] and t["qlib_ext.worker"]
        assert t["qlib_ext.task_id"] in {str(d["_id"]) for d in docs}
        # 2 workers on this machine's cores: threads per worker = cores // 2, in OpenMP and LightGBM alike.
        threads = str(max(1, (os.cpu_count() or 1) // 2))
        assert t["qlib_ext.threads"] == threads and t["qlib_ext.lgb_num_threads"] == threads
        assert "lr=" in run.info.run_name

    board = json.loads(cli("leaderboard", "e2e", "--json", "--metric", "icir", *common).stdout)
    rows = board["rows"]
    assert len(rows) == 4 and board["grid"]["metric"] == "ICIR" and board["grid"]["trials"] == 4
    icir = [r["metrics"]["ICIR"] for r in rows]
    assert icir == sorted(icir, reverse=True)
    assert {r["run_id"] for r in rows} == committed

    assert "0 new of 4" in cli("submit", str(wf), *common).stdout
    status = cli("status", "e2e", "--mongo-url", mongo_url).stdout
    assert "done 4" in status


def test_worker_started_separately_joins_an_existing_pool(tmp_path, synth_provider, mongo_url, mlflow_uri,
                                                           shared_dataset_cache):
    wf = write_workflow(tmp_path / "joined.yaml", synth_provider)
    common = ["--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri]
    assert "1 new of 1" in cli("submit", str(wf), *common).stdout
    # Only the pool name and the store URL: the pool recorded provider, region and experiment.
    cli("worker", "--pool", "joined", "-n", "1", "--mongo-url", mongo_url)
    docs = list(pymongo.MongoClient(mongo_url)["default_task_db"]["joined"].find({}))
    assert [d["status"] for d in docs] == ["done"]
