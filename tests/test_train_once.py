"""Train once, sweep strategies: H model configurations x S strategy points train H models.

Expansion and follow-up construction are checked on plain dicts; the end-to-end test runs the CLI
with two worker processes, real Qlib/LightGBM, the embedded store and a sqlite MLflow.
"""

from __future__ import annotations

import json

import bson
import mlflow
import pymongo
import pytest
from grid_yaml import write_workflow
from test_config import BASE, write_yaml
from test_grid_e2e import cli

from qlib_ext.analysis.leaderboard import _ranked
from qlib_ext.errors import ConfigError
from qlib_ext.pool.manager import GridTaskManager, task_hash
from qlib_ext.pool.record import TaskMeta
from qlib_ext.worker.follow_up import backtest_tasks, enqueue
from qlib_ext.workflow.expand import expand
from qlib_ext.workflow.load import load_workflow

GRID = """
grid:
    params: {task.model.kwargs.learning_rate: [0.05, 0.1]}
    strategies: {topk: [20, 50], n_drop: [2, 5]}
"""

TOPK = "port_analysis_config.strategy.kwargs.topk"
LR = "task.model.kwargs.learning_rate"


def _expand(tmp_path, grid: str, **kwargs) -> list[dict]:
    return expand(load_workflow(write_yaml(tmp_path, grid, **kwargs)))


def _classes(records: list[dict]) -> list[str]:
    return [r["class"] for r in records]


# --------------------------------------------------------------------------- expansion
def test_h_times_s_grid_becomes_h_training_tasks_with_s_sweep_points(tmp_path):
    tasks = _expand(tmp_path, GRID)
    assert len(tasks) == 2
    for task, lr in zip(tasks, (0.05, 0.1), strict=True):
        meta = task["qlib_ext"]
        assert _classes(task["record"]) == ["SignalRecord", "SigAnaRecord"]
        assert meta["coords"] == {LR: lr} and meta["strategy"] == {} and meta["run_name"] == f"lgb lr={lr}"
        assert len(meta["sweep"]) == 4
        points = [(p["strategy"]["topk"], p["strategy"]["n_drop"]) for p in meta["sweep"]]
        assert points == [(20, 2), (20, 5), (50, 2), (50, 5)]
        for point in meta["sweep"]:
            (record,) = point["record"]
            assert record["class"] == "PortAnaRecord"
            assert record["kwargs"]["config"]["strategy"]["kwargs"] == {"signal": "<PRED>", **point["strategy"]}
            assert point["coords"][LR] == lr and point["coords"][TOPK] == point["strategy"]["topk"]
        bson.encode(task)
    config_ids = [p["config_id"] for t in tasks for p in t["qlib_ext"]["sweep"]]
    assert len(set(config_ids)) == 8


def test_train_once_false_is_the_naive_h_times_s_grid_with_the_same_points(tmp_path):
    sweep = [p for t in _expand(tmp_path, GRID) for p in t["qlib_ext"]["sweep"]]
    naive = _expand(tmp_path, GRID.replace("grid:\n", "grid:\n    train_once: false\n"))
    assert len(naive) == 8 and not any("sweep" in t["qlib_ext"] for t in naive)
    assert all(_classes(t["record"]) == ["SignalRecord", "SigAnaRecord", "PortAnaRecord"] for t in naive)
    # Same run names and config ids: a point's identity does not depend on the mode.
    assert [(t["qlib_ext"]["run_name"], t["qlib_ext"]["config_id"]) for t in naive] == [
        (p["run_name"], p["config_id"]) for p in sweep]
    assert [t["record"][2] for t in naive] == [p["record"][0] for p in sweep]


def test_a_grid_without_strategy_points_is_unchanged(tmp_path):
    tasks = _expand(tmp_path, "grid:\n    params: {task.model.kwargs.learning_rate: [0.05, 0.1]}\n")
    assert len(tasks) == 2 and not any("sweep" in t["qlib_ext"] for t in tasks)
    assert all(_classes(t["record"])[-1] == "PortAnaRecord" for t in tasks)


def test_rolling_windows_times_strategies_train_once_per_window(tmp_path, synth_provider):
    from data_fixtures import SYNTH_SEGMENTS
    from test_gen import _synth_base

    wf = load_workflow(write_yaml(tmp_path, "grid:\n    rolling: {step: 20}\n    strategies: {topk: [5, 10]}\n",
                                  base=_synth_base()))
    tasks = expand(wf, provider_uri=str(synth_provider))
    windows = [t["qlib_ext"]["window"]["index"] for t in tasks]
    assert windows == list(range(len(tasks))) and len(tasks) > 1
    assert all(len(t["qlib_ext"]["sweep"]) == 2 for t in tasks)
    # Each strategy point keeps one config id over the windows: the leaderboard groups windows by it.
    ids = {p["strategy"]["topk"]: set() for p in tasks[0]["qlib_ext"]["sweep"]}
    for task in tasks:
        for point in task["qlib_ext"]["sweep"]:
            ids[point["strategy"]["topk"]].add(point["config_id"])
            backtest = point["record"][0]["kwargs"]["config"]["backtest"]
            assert [backtest["start_time"], backtest["end_time"]] == task["dataset"]["kwargs"]["segments"]["test"]
    assert all(len(v) == 1 for v in ids.values()) and len(set().union(*ids.values())) == 2
    assert tasks[0]["dataset"]["kwargs"]["segments"]["test"][0] >= SYNTH_SEGMENTS["test"][0]


def test_model_and_dataset_placeholders_become_the_saved_predictions(tmp_path):
    base = BASE.replace("signal: <PRED>", "model: <MODEL>, dataset: <DATASET>")
    assert "dataset: <DATASET>, topk" in base
    (task,) = _expand(tmp_path, "grid:\n    strategies: {topk: [20, 50]}\n", base=base)
    for point in task["qlib_ext"]["sweep"]:
        kwargs = point["record"][0]["kwargs"]["config"]["strategy"]["kwargs"]
        assert kwargs["signal"] == "<PRED>" and "model" not in kwargs and "dataset" not in kwargs


def test_train_once_must_be_a_boolean(tmp_path):
    with pytest.raises(ConfigError, match="str value 'yes' in grid.train_once of .*; expected true"):
        _expand(tmp_path, "grid:\n    train_once: 'yes'\n    strategies: {topk: [20]}\n")


# --------------------------------------------------------------------------- follow-up tasks
def test_follow_up_tasks_are_plain_backtest_tasks_naming_the_training_run(tmp_path):
    task = _expand(tmp_path, GRID)[0]
    follow = backtest_tasks(task, "run123", "task9")
    assert len(follow) == 4
    for point, bt in zip(task["qlib_ext"]["sweep"], follow, strict=True):
        meta = bt["qlib_ext"]
        assert set(bt) == {"record", "qlib_ext"} and bt["record"] == point["record"]
        assert meta["kind"] == "backtest" and meta["parent_run_id"] == "run123" and meta["parent_task_id"] == "task9"
        assert meta["run_name"] == point["run_name"] and meta["coords"] == point["coords"]
        assert meta["model"] == "lgb" and meta["model_class"] == "LGBModel" and meta["pool"] == "wf"
        bson.encode(bt)
    assert len({task_hash(bt) for bt in follow}) == 4


@pytest.fixture
def tm(mongo_url, task_db_name):
    client = pymongo.MongoClient(mongo_url)
    yield GridTaskManager("pool", client[task_db_name])
    client.close()


def test_enqueue_needs_the_lease_and_dedups_a_repeat(tm, tmp_path):
    task = _expand(tmp_path, GRID)[0]
    tm.create_tasks([task])
    claim = tm.claim(60)
    follow = backtest_tasks(task, "run1", str(claim.id))
    assert enqueue(tm, claim, follow, 60) and enqueue(tm, claim, follow, 60)
    assert tm.counts() == {"running": 1, "waiting": 4}
    tm.task_pool.update_one({"_id": claim.id}, {"$set": {"worker": "someone-else"}})
    assert not enqueue(tm, claim, backtest_tasks(task, "run2", str(claim.id)), 60)
    assert tm.counts() == {"running": 1, "waiting": 4}


def test_leaderboard_rows_skip_the_training_task_and_stale_backtests():
    committed = {"t1": "run2"}

    def ranked(block: dict) -> bool:
        return _ranked(TaskMeta.from_dict(block), committed)

    assert not ranked({"sweep": [{}]})
    assert ranked({"kind": "backtest", "parent_task_id": "t1", "parent_run_id": "run2"})
    assert not ranked({"kind": "backtest", "parent_task_id": "t1", "parent_run_id": "run1"})
    assert ranked({"kind": "backtest", "parent_task_id": "t2", "parent_run_id": "run7"})
    assert ranked({"coords": {}})


# --------------------------------------------------------------------------- end to end
E2E_GRID = """
grid:
    pool: train_once_e2e
    params: {task.model.kwargs.num_leaves: [8, 32]}
    strategies: {topk: [5, 10]}
"""


@pytest.mark.slow
def test_two_models_times_two_strategies_train_twice_and_backtest_four_times(tmp_path, synth_provider, mongo_url,
                                                                            shared_dataset_cache):
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    wf = write_workflow(tmp_path / "train_once_e2e.yaml", synth_provider, E2E_GRID)
    common = ["--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri]
    out = cli("run", str(wf), "-n", "2", *common).stdout
    assert "2 new of 2" in out

    docs = list(pymongo.MongoClient(mongo_url)["default_task_db"]["train_once_e2e"].find({}))
    assert len(docs) == 6 and [d["status"] for d in docs] == ["done"] * 6
    trainings = {str(d["_id"]): d for d in docs if d["filter"]["qlib_ext"].get("sweep")}
    backtests = [d for d in docs if d["filter"]["qlib_ext"].get("kind") == "backtest"]
    assert len(trainings) == 2 and len(backtests) == 4

    client = mlflow.MlflowClient(mlflow_uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("train_once_e2e")
                                                          .experiment_id])}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    runs = {k: r for k, r in runs.items() if r.data.tags.get("qlib_ext.row") != "grid"}  # the grid's parent run
    fits = [r for r in runs.values() if r.data.tags.get("qlib_ext.kind") != "backtest"]
    assert sorted(r.info.run_id for r in fits) == sorted(d["outcome"]["run_id"] for d in trainings.values())
    assert all("time.fit_s" in r.data.metrics and "time.backtest_s" not in r.data.metrics for r in fits)
    assert len(runs) == 6
    for doc in backtests:
        run = runs[doc["outcome"]["run_id"]]
        parent_doc = trainings[doc["filter"]["qlib_ext"]["parent_task_id"]]
        parent = runs[parent_doc["outcome"]["run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["num_leaves"] == parent.data.params["num_leaves"]
        assert run.data.params["strategy.topk"] in ("5", "10") and run.data.params["model"] == "lgb"
        assert run.data.metrics["IC"] == parent.data.metrics["IC"]
        for key in ("time.backtest_s", "1day.excess_return_with_cost.annualized_return"):
            assert key in run.data.metrics, key
        assert {"pred.pkl", "label.pkl"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        # drawn after the grid, not by the worker (issue 24); conftest makes `run` wait for the grid plots
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/run.png"]
    points = {(r.data.params["num_leaves"], r.data.params["strategy.topk"])
              for r in runs.values() if r.data.tags.get("qlib_ext.kind") == "backtest"}
    assert points == {("8", "5"), ("8", "10"), ("32", "5"), ("32", "10")}

    board = json.loads(cli("leaderboard", "train_once_e2e", "--json", *common).stdout)
    rows = board["rows"]
    assert len(rows) == 4
    # its rows share one model per num_leaves: a sweep ranks by a backtest metric, not by IC
    assert board["grid"]["metric"] == "1day.excess_return_with_cost.information_ratio"
    assert {r["run_id"] for r in rows} == {d["outcome"]["run_id"] for d in backtests}
    assert all({"num_leaves", "strategy.topk", "model"} <= set(r["params"]) for r in rows)
