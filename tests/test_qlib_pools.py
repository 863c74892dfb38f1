"""Pools that Qlib made are pools (issue 23 §3, §6): ``--task-db`` on every command, Qlib-made pools listed
and counted, and ``qlib-ext worker`` draining a pool Qlib's own ``TrainerRM(skip_run_task=True)`` filled so
that the submitter's code keeps working: ``TrainerRM.train`` gets its recorders from ``res`` and Qlib's
``RecorderCollector`` collects the runs; ``leaderboard`` ranks them and Qlib's ``manage`` CLI still reads it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import subprocess
import sys
import threading
import time
import types

import pymongo
import pytest
import yaml
from click.testing import CliRunner
from grid_yaml import write_workflow

from qlib_ext import defaults
from qlib_ext.cli import main

EXPERIMENT = "rolling_exp"
"""TrainerRM's experiment, as in Qlib's examples/model_rolling/task_manager_rolling.py."""

POOL = "rolling_task"
"""TrainerRM's task pool, as in that example."""


@pytest.fixture
def no_task_db_env(monkeypatch):
    """``--task-db`` sets ``$QLIB_EXT_TASK_DB`` for the command's process: restored after the test."""
    monkeypatch.setenv(defaults.TASK_DB_ENV, "")


def _base_task(tmp_path, provider) -> dict:
    return yaml.safe_load(write_workflow(tmp_path / "base.yaml", provider).read_text())["task"]


def _qlib_submit(url: str, db_name: str, tasks: list[dict]) -> list:
    """What a Qlib user's script does: ``TaskManager(POOL).create_task`` (Qlib's own, on ``C["mongo"]``)."""
    from qlib.config import C
    from qlib.workflow.task.manage import TaskManager

    old = C.get("mongo")
    C["mongo"] = {"task_url": url, "task_db_name": db_name}
    try:
        return TaskManager(POOL).create_task(tasks)
    finally:
        C["mongo"] = old


@contextlib.contextmanager
def qlib_tm(url: str, db_name: str):
    """Qlib's own ``TaskManager`` on ``url``/``db_name`` (``C["mongo"]``, what qlib.init sets), for ``DELAY_POOL``."""
    from qlib.config import C
    from qlib.workflow.task.manage import TaskManager

    old = C.get("mongo")
    C["mongo"] = {"task_url": url, "task_db_name": db_name}
    try:
        yield TaskManager(DELAY_POOL)
    finally:
        C["mongo"] = old


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.output


def test_qlib_made_pool_is_listed_counted_and_named_by_task_db(mongo_url, task_db_name, tmp_path, synth_provider,
                                                               no_task_db_env):
    tasks = [_base_task(tmp_path, synth_provider)]
    tasks.append({**tasks[0], "model": {**tasks[0]["model"], "kwargs": {**tasks[0]["model"]["kwargs"],
                                                                          "num_leaves": 8}}})
    assert len(_qlib_submit(mongo_url, task_db_name, tasks)) == 2

    # without --task-db the default database is asked, and the message says how to name another
    other = _cli("status", POOL, "--mongo-url", mongo_url)
    assert f"no pool named '{POOL}'" in other and "--task-db" in other
    listing = _cli("status", "--mongo-url", mongo_url, "--task-db", task_db_name)
    assert re.search(rf"{POOL} \(qlib\)\s+2\s+waiting 2", listing), listing
    assert f"pool {POOL}: waiting 2" in _cli("status", POOL, "--mongo-url", mongo_url, "--task-db", task_db_name)


def test_task_db_from_a_profile(mongo_url, task_db_name, tmp_path, synth_provider, no_task_db_env, monkeypatch):
    _qlib_submit(mongo_url, task_db_name, [_base_task(tmp_path, synth_provider)])
    profile = tmp_path / "qlib-ext.toml"
    profile.write_text(f'mongo_url = "{mongo_url}"\ntask_db = "{task_db_name}"\n')
    out = _cli("--profile", str(profile), "status")
    assert re.search(rf"{POOL} \(qlib\)\s+1\s+waiting 1", out), out


def test_task_db_is_an_option_of_every_pool_command():
    for command in ("run", "submit", "worker", "status", "leaderboard", "retry", "cancel", "report", "reproduce"):
        assert "--task-db" in _cli(command, "--help"), command


# --------------------------------------------------------------------------- TrainerRM, drained by qlib-ext
@pytest.mark.slow
def test_trainer_rm_skip_run_task_drained_by_qlib_ext_worker(mongo_url, task_db_name, tmp_path, synth_provider,
                                                             monkeypatch, no_task_db_env):
    """Qlib's ``TrainerRM(EXP, POOL, skip_run_task=True).train(tasks)`` (rolling tasks from Qlib's ``RollingGen``,
    their segments pandas Timestamps) waits on the pool; ``qlib-ext worker`` drains it; ``train`` then returns
    the recorders of our runs, and Qlib's ``RecorderCollector`` collects every one."""
    import qlib.workflow.task.manage as manage
    from data_fixtures import init_qlib
    from qlib.model.trainer import TrainerRM
    from qlib.workflow.task.collect import RecorderCollector
    from qlib.workflow.task.gen import RollingGen, task_generator

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_qlib(synth_provider, mlflow_uri, mongo={"task_url": mongo_url, "task_db_name": task_db_name})
    real_sleep = time.sleep
    monkeypatch.setattr(manage, "time", types.SimpleNamespace(sleep=lambda _s: real_sleep(0.2)))
    base = _base_task(tmp_path, synth_provider)
    base["model"]["kwargs"]["num_boost_round"] = 10
    base["record"] = base["record"][:2]  # SignalRecord, SigAnaRecord: the rolling example's records, no backtest
    base["dataset"]["kwargs"]["segments"]["test"] = ("2016-03-28", "2016-06-10")
    tasks = task_generator(base, RollingGen(step=30, rtype=RollingGen.ROLL_SD))
    assert len(tasks) == 2
    got: dict = {}

    def submitter() -> None:
        try:
            got["recs"] = TrainerRM(EXPERIMENT, POOL, skip_run_task=True).train(tasks)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            got["error"] = e

    thread = threading.Thread(target=submitter, daemon=True)
    thread.start()
    db = pymongo.MongoClient(mongo_url)[task_db_name]
    deadline = time.monotonic() + 120
    while db[POOL].count_documents({}) < 2 and time.monotonic() < deadline:
        real_sleep(0.2)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    worker = subprocess.run(
        [sys.executable, "-m", "qlib_ext", "worker", "--pool", POOL, "--task-db", task_db_name, "-n", "1",
         "--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri, "--provider-uri", str(synth_provider),
         "--experiment", EXPERIMENT], capture_output=True, text=True, timeout=600, env=env)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    thread.join(timeout=120)
    assert "error" not in got and "recs" in got, got

    recs = got["recs"]
    assert len(recs) == 2 and all(r.load_object("task")["dataset"] for r in recs)
    assert [r.load_object("task")["dataset"]["kwargs"]["segments"]["test"] for r in recs] == \
        [t["dataset"]["kwargs"]["segments"]["test"] for t in tasks]
    assert all(r.list_tags()[TrainerRM.TM_ID] for r in recs)
    collected = RecorderCollector(EXPERIMENT)()
    assert len(collected["pred"]) == 2, collected.keys()
    runs = {r.id for r in recs}
    assert {r.info["id"] for r in _finished(EXPERIMENT)} == runs

    # qlib-ext ranks them; Qlib's manage CLI still reads the pool (res now holds Recorders)
    board = _cli("leaderboard", POOL, "--mongo-url", mongo_url, "--task-db", task_db_name, "--json")
    assert {row["run_id"] for row in yaml.safe_load(board)["rows"]} == runs, board
    boot = ("import runpy, sys, qlib; qlib.init(provider_uri=sys.argv.pop(1), "
            "mongo={'task_url': sys.argv.pop(1), 'task_db_name': sys.argv.pop(1)}); "
            "runpy.run_module('qlib.workflow.task.manage', run_name='__main__', alter_sys=True)")
    out = subprocess.run([sys.executable, "-c", boot, str(synth_provider), mongo_url, task_db_name,
                          "-t", POOL, "task_stat"], capture_output=True, text=True, timeout=120, env=env)
    assert re.search(r"^done:\s+2$", out.stdout, re.M), out.stdout + out.stderr


def _finished(experiment: str) -> list:
    from qlib.workflow import R

    recorders = R.list_recorders(experiment_name=experiment)
    return [r for r in recorders.values() if r.status == "FINISHED"]


# --------------------------------------------------------------------------- DelayTrainerRM, finished by qlib-ext
DELAY_EXPERIMENT = "delay_exp"
DELAY_POOL = "delay_task"


def _linear_tasks(tmp_path, provider) -> list[dict]:
    """Two tiny Linear tasks (OLS, ridge) with the rolling example's records: a prediction and its IC."""
    base = _base_task(tmp_path, provider)
    base["record"] = base["record"][:2]
    linear = {"class": "LinearModel", "module_path": "qlib.contrib.model.linear"}
    return [{**base, "model": {**linear, "kwargs": kwargs}} for kwargs in ({"estimator": "ols"},
                                                                            {"estimator": "ridge", "alpha": 0.1})]


def _begun(mongo_url: str, db_name: str, n: int) -> list:
    """``n`` tasks as ``DelayTrainerRM.train`` leaves them, written by Qlib's own ``TaskManager``: created, fetched
    and committed ``part_done`` with a Qlib Recorder in ``res`` (what ``run_task`` does with ``begin_task_train``'s
    return value; Qlib's base ``Recorder`` here, without the MLflow database an ``MLflowRecorder`` opens: the
    slow test below has real ones); returns the recorders."""
    from qlib.workflow.recorder import Recorder
    from qlib.workflow.task.manage import TaskManager

    with qlib_tm(mongo_url, db_name) as qtm:
        qtm.create_task([{"model": {"class": "M", "kwargs": {"i": i}}, "dataset": {"class": "D"}} for i in range(n)])
        recs = []
        while (task := qtm.fetch_task()) is not None:
            recs.append(Recorder("7", f"rec{len(recs)}"))
            recs[-1].id = f"run{len(recs)}"
            qtm.commit_task_res(task, recs[-1], status=TaskManager.STATUS_PART_DONE)
        assert qtm.task_stat() == {"part_done": n}
    return recs


def test_second_stage_claims_part_done_and_every_way_back_leads_there(mongo_url, task_db_name):
    """``DelayTrainerRM``'s tasks are claimed from ``part_done`` only when asked, their ``res`` read as the run it
    names (no Qlib or MLflow code run to read it); a failed attempt, an expired lease, ``retry`` after the last
    attempt and ``cancel``/``retry`` all put them back to ``part_done`` with ``res`` kept, never to ``waiting``."""
    from qlib_ext.pool.codec import RecorderRef
    from qlib_ext.pool.manager import GridTaskManager

    recs = _begun(mongo_url, task_db_name, 2)
    client = pymongo.MongoClient(mongo_url)
    tm = GridTaskManager(DELAY_POOL, client[task_db_name])
    assert tm.claim(worker="a:1") is None  # TrainerRM's stage: nothing waiting
    claim = tm.claim(worker="a:1", status="part_done")
    ref = claim.task["res"]
    assert isinstance(ref, RecorderRef) and ref.run_id in {r.id for r in recs}
    assert ref.experiment_id == "7"

    def state() -> tuple:
        doc = tm.task_pool.find_one({"_id": claim.id})
        return doc["status"], doc.get("attempt"), "res" in doc

    assert tm.fail(claim, "boom", max_attempts=2) == "part_done" and state() == ("part_done", 1, True)
    again = tm.claim(worker="a:1", status="part_done", query={"_id": claim.id})
    tm.task_pool.update_one({"_id": claim.id}, {"$set": {"lease_until": tm.now() - dt.timedelta(seconds=5)}})
    assert [c.id for c in tm.reclaim_expired(max_attempts=2)] == [claim.id]
    assert state() == ("failed", 2, True) and again.attempt == 2
    assert tm.retry(failed_only=True) == 1 and state() == ("part_done", 0, True)
    assert tm.cancel() == 2 and tm.counts() == {"cancelled": 2}
    assert tm.retry() == 2 and tm.counts() == {"part_done": 2}
    with qlib_tm(mongo_url, task_db_name) as qtm:  # Qlib's own reader still unpickles the Recorders
        assert qtm.task_stat() == {"part_done": 2}
    client.close()


def test_trainer_flag_is_checked():
    from qlib_ext.errors import ConfigError
    from qlib_ext.pool.record import PoolMeta
    from qlib_ext.worker.settings import check_trainer

    assert check_trainer("p", PoolMeta(pool="p", qlib_made=True), "delay") == "delay"
    with pytest.raises(ConfigError, match="submitted by qlib-ext: leave --trainer out"):
        check_trainer("p", PoolMeta(pool="p"), "delay")
    with pytest.raises(ConfigError, match="expected one of: rm, delay"):
        check_trainer("p", PoolMeta(pool="p"), "Delay")


def test_a_res_pickle_that_is_no_recorder_is_refused():
    import pickle

    from qlib_ext.errors import TaskDecodeError
    from qlib_ext.pool.codec import decode_document

    with pytest.raises(TaskDecodeError, match="refused global posix.system"):
        decode_document({"_id": 1, "res": pickle.dumps(_Shell())})


class _Shell:
    def __reduce__(self) -> tuple:
        return os.system, ("true",)


def _worker(mongo_url: str, db_name: str, mlflow_uri: str, provider, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "qlib_ext", "worker", "--pool", DELAY_POOL, "--task-db", db_name, "-n", "1",
         "--mongo-url", mongo_url, "--mlflow-uri", mlflow_uri, "--provider-uri", str(provider),
         "--experiment", DELAY_EXPERIMENT, *extra], capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.slow
def test_delay_trainer_rm_part_done_finished_by_qlib_ext_worker(mongo_url, task_db_name, tmp_path, synth_provider,
                                                                monkeypatch, no_task_db_env):
    """Qlib's ``DelayTrainerRM(EXP, POOL, skip_run_task=True).train(tasks)`` runs ``begin_task_train`` itself (Qlib
    never skips that stage) and leaves each task ``part_done``, ``res`` holding the Recorder of a run with only
    the task in it. ``qlib-ext worker`` (TrainerRM's stage) leaves them and names the flag; ``qlib-ext worker
    --trainer delay`` runs ``end_task_train`` on each, in that same run, while ``end_train`` waits; ``end_train``
    then returns those recorders with their predictions, and ``RecorderCollector`` collects every one."""
    import qlib.workflow.task.manage as manage
    from data_fixtures import init_qlib
    from qlib.model.trainer import DelayTrainerRM
    from qlib.workflow.task.collect import RecorderCollector
    from qlib.workflow.task.manage import TaskManager

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_qlib(synth_provider, mlflow_uri, mongo={"task_url": mongo_url, "task_db_name": task_db_name})
    real_sleep = time.sleep
    monkeypatch.setattr(manage, "time", types.SimpleNamespace(sleep=lambda _s: real_sleep(0.2)))
    trainer = DelayTrainerRM(DELAY_EXPERIMENT, DELAY_POOL, skip_run_task=True)
    recs = trainer.train(_linear_tasks(tmp_path, synth_provider))
    runs = [r.id for r in recs]
    assert len(set(runs)) == 2 and not any("pred.pkl" in r.list_artifacts() for r in recs)
    assert TaskManager(DELAY_POOL).task_stat() == {"part_done": 2}
    listing = _cli("status", "--mongo-url", mongo_url, "--task-db", task_db_name)
    assert re.search(rf"{DELAY_POOL} \(qlib\)\s+2\s+part_done 2", listing), listing

    # TrainerRM's stage has nothing to do here: the worker says which flag runs DelayTrainerRM's
    plain = _worker(mongo_url, task_db_name, mlflow_uri, synth_provider)
    assert plain.returncode == 0 and "--trainer delay" in plain.stdout + plain.stderr, plain.stdout + plain.stderr
    assert TaskManager(DELAY_POOL).task_stat() == {"part_done": 2}

    got: dict = {}

    def end_train() -> None:
        try:
            got["recs"] = trainer.end_train(recs)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            got["error"] = e

    waiter = threading.Thread(target=end_train, daemon=True)
    waiter.start()
    delay = _worker(mongo_url, task_db_name, mlflow_uri, synth_provider, "--trainer", "delay")
    assert delay.returncode == 0, delay.stdout + delay.stderr
    waiter.join(timeout=120)
    assert "error" not in got and [r.id for r in got.get("recs", [])] == runs, got

    assert TaskManager(DELAY_POOL).task_stat() == {"done": 2}
    for rec in recs:  # the very runs begin_task_train made, now with the model, the dataset and the prediction
        assert {"pred.pkl", "params.pkl", "dataset", "task"} <= set(rec.list_artifacts()), rec.list_artifacts()
        assert len(rec.load_object("pred.pkl")) > 0
        assert rec.list_tags()[DelayTrainerRM.STATUS_KEY] == DelayTrainerRM.STATUS_END
    assert {r.info["id"] for r in _finished(DELAY_EXPERIMENT)} == set(runs)
    collected = RecorderCollector(DELAY_EXPERIMENT)()
    assert len(collected["pred"]) == 2, collected.keys()
    board = _cli("leaderboard", DELAY_POOL, "--mongo-url", mongo_url, "--task-db", task_db_name, "--json")
    assert {row["run_id"] for row in yaml.safe_load(board)["rows"]} == set(runs), board
