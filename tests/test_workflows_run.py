"""Every shipped workflow runs end to end (a spread sample of its grid, on a small synthetic dataset
with the default calendar), so none of them can rot; plain_qrun.yaml shows a plain qrun YAML
without a grid: section runs as one task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pymongo
import pytest

from qlib_ext.workflow.load import load_workflow

pytestmark = pytest.mark.slow

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.yaml"))


@pytest.fixture(scope="module")
def small_default_calendar(tmp_path_factory) -> Path:
    """30 stocks on the full default calendar (2015-01-05 .. 2020-10-02) the workflows are written for."""
    from qlib_ext.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("wf") / "synth"
    write_synthetic(out, instruments=30, days=1500, start="2015-01-05", seed=1, market="csi300")
    return out


def test_every_workflow_is_tested():
    assert {p.stem for p in WORKFLOWS} >= {"quickstart", "lgb_grid", "random_search", "multi_model",
                                           "strategy_grid", "rolling", "plain_qrun"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(workflow, small_default_calendar, mongo_url, tmp_path, shared_dataset_cache):
    # The cache is shared: six workflows prepare plain_qrun.yaml's dataset, and only the first builds it.
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # One task proves a workflow runs; multi_model needs its first (LightGBM) and last (linear) task.
    limit = "2" if workflow.stem == "multi_model" else "1"
    # A second worker only where the pool holds a second task (strategy_grid: 4 follow-up backtests);
    # elsewhere it would start, import Qlib and find nothing to claim.
    workers = "2" if workflow.stem in ("multi_model", "strategy_grid") else "1"
    cmd = [sys.executable, "-m", "qlib_ext", "run", str(workflow), "--limit", limit, "-n", workers,
           "--provider-uri", str(small_default_calendar), "--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if workflow.stem == "plain_qrun":
        assert "1 new of 1" in proc.stdout, "a plain qrun YAML (no grid:) runs as one task"
    db = pymongo.MongoClient(mongo_url)["default_task_db"]
    pool = load_workflow(workflow).pool  # the store is shared by the session: look up this workflow's pool
    docs = list(db[pool].find({}, {"status": 1, "outcome": 1, "errors": 1}))
    assert docs and all(d["status"] == "done" for d in docs), [d.get("errors") for d in docs]
    client = mlflow.MlflowClient(mlflow_uri)
    for d in docs:
        run = client.get_run(d["outcome"]["run_id"])
        assert run.info.status == "FINISHED"
        assert "IC" in run.data.metrics or "1day.excess_return_with_cost.annualized_return" in run.data.metrics
