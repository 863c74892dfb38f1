"""What the command line says in the situations a new user hits (issue 13's rough edges): a grid where
every task failed, pools listed or mistyped, near-miss YAML keys, an empty grid, a strategy sweep."""

from __future__ import annotations

import logging
import uuid

from click.testing import CliRunner
from grid_yaml import write_workflow

from qlib_ext import cli
from qlib_ext.api import Submitted


def _failed_pool(mongo_url: str, mlflow_uri: str, error: str) -> str:
    """A pool of two tasks that both failed, with its pool meta and grid run, as `run` leaves it."""
    from qlib_ext.pool.manager import GridTaskManager, open_db, save_pool_meta
    from qlib_ext.pool.record import PoolMeta
    from qlib_ext.tracking.experiment import ensure_experiment
    from qlib_ext.tracking.mlflow_ui import ensure_grid_runs

    pool = f"allfail_{uuid.uuid4().hex[:8]}"
    db = open_db(mongo_url)
    ensure_experiment(mlflow_uri, pool)
    save_pool_meta(db, pool, PoolMeta(mlflow_uri=mlflow_uri, experiment=pool))
    tasks = [{"model": {"class": "NoSuchModel", "module_path": "qlib.contrib.model.gbdt"},
              "qlib_ext": {"pool": pool, "run_name": f"t{i}", "config_id": f"c{i}", "coords": {}}} for i in range(2)]
    tm = GridTaskManager(pool, db)
    tm.create_tasks(tasks, max_attempts=1)
    ensure_grid_runs(mlflow_uri, pool, pool, tasks)
    for _ in tasks:
        tm.fail(tm.claim(worker="host:1"), error)
    return pool


def test_a_grid_where_every_task_failed_exits_1_with_the_first_error(mongo_url, tmp_path):
    from qlib_ext.summary import EXIT_ALL_FAILED, after_workers

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    error = "Traceback (most recent call last):\n  ...\nAttributeError: module has no attribute 'NoSuchModel'"
    pool = _failed_pool(mongo_url, uri, error)
    summary = after_workers(pool, mongo_url=mongo_url, mlflow_uri=uri, metric=None, code=0)
    assert summary.code == EXIT_ALL_FAILED
    assert f"error: all 2 tasks of pool {pool} failed" in summary.text
    assert "AttributeError: module has no attribute 'NoSuchModel'" in summary.text
    assert f"qlib-ext status {pool}" in summary.text and "no finished runs yet" in summary.text
    assert "-m mlflow ui --backend-store-uri " + uri in summary.text and "workflowType=machine_learning" in summary.text
    import mlflow

    client = mlflow.MlflowClient(uri)
    grid = [r for r in client.search_runs([client.get_experiment_by_name(pool).experiment_id])]
    assert [(r.info.status, r.data.metrics.get("failed")) for r in grid] == [("FAILED", 2.0)]

    listed = CliRunner().invoke(cli.main, ["status", "--mongo-url", mongo_url])
    assert listed.exit_code == 0 and f"{pool}  2      failed 2" in listed.output
    wrong = CliRunner().invoke(cli.main, ["status", "nonexistent", "--mongo-url", mongo_url])
    assert wrong.exit_code == 2 and "no pool named 'nonexistent'" in wrong.output and pool in wrong.output


def test_near_miss_keys_and_an_empty_grid_warn(tmp_path, synth_provider, caplog):
    from qlib_ext.workflow.load import load_workflow

    typo = write_workflow(tmp_path / "typo.yaml", synth_provider, "gird:\n    params: {}\nworker:\n    threads: 1\n")
    empty = write_workflow(tmp_path / "empty.yaml", synth_provider, "grid:\n")
    with caplog.at_level(logging.WARNING):
        load_workflow(typo)
        load_workflow(empty)
    assert "top-level key 'gird' is ignored by qlib-ext; did you mean 'grid'?" in caplog.text
    assert "top-level key 'worker' is ignored by qlib-ext; did you mean 'workers'?" in caplog.text
    assert "empty.yaml: grid: has no params, models, strategies or rolling: the workflow runs as ONE task" in (
        caplog.text)


def test_a_strategy_sweep_says_what_follows():
    sub = Submitted("p", 1, 1, "mongodb://x", "sqlite:///x", "p", backtests=4)
    assert str(sub) == "pool p: 1 new of 1 training task, 4 backtests to follow (experiment 'p')"
    assert str(Submitted("p", 4, 4, "m", "u", "p")) == "pool p: 4 new of 4 tasks (experiment 'p')"


def test_resubmitting_a_pool_whose_tasks_failed_says_how_to_retry(tmp_path, synth_provider, mongo_url):
    """'0 new of 2' alone left a user wondering why nothing ran (issue 23 §5): the failed tasks are named, with
    the commands that show why and requeue them."""
    from fixtures import write_chaos_workflow

    from qlib_ext.pool.manager import GridTaskManager, open_db

    pool = f"refail_{uuid.uuid4().hex[:8]}"
    wf = write_chaos_workflow(tmp_path / "wf.yaml", synth_provider, 2, pool, max_attempts=1)
    args = ["submit", "--mongo-url", mongo_url, "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", str(wf)]
    first = CliRunner().invoke(cli.main, args)
    assert first.exit_code == 0 and "retry" not in first.output, first.output
    tm = GridTaskManager(pool, open_db(mongo_url))
    for _ in range(2):
        tm.fail(tm.claim(worker="host:1"), "ValueError: poison")
    again = CliRunner().invoke(cli.main, args)
    assert again.exit_code == 0, again.output
    assert f"pool {pool}: 0 new of 2 tasks" in again.output
    assert (f"2 failed earlier: a submit does not run them again; `qlib-ext status {pool}` shows why, "
            f"`qlib-ext retry {pool}` requeues them (attempts start over)") in again.output
