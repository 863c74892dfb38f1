"""An attempt's life against a real store and a real sqlite MLflow (qlib_ext/worker/attempt.py): the run is
RUNNING while its result is committed and FINISHED only after the commit; a refused commit ends it KILLED
without it ever being FINISHED; a failure is recorded in the pool before the run ends FAILED; the reaper
ends only the runs whose attempt is over.

Tasks are ``tests/fixtures.py::ChaosModel`` points run by a ``Worker`` in this process (or in a forked child
when the task has a timeout). MLflow keeps no status history, so every status write is recorded by a hook
on its SQLAlchemy store, in one list with the pool's commit and fail calls: the order is the proof.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlflow
import pymongo
import pytest
from data_fixtures import init_qlib
from mlflow.entities import RunStatus as MlflowStatus
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from qlib_ext.pool.manager import GridTaskManager
from qlib_ext.pool.record import Doc, Outcome, Tag
from qlib_ext.pool.status import EndReason, RunStatus, TaskStatus
from qlib_ext.tracking.reaper import _verdict
from qlib_ext.worker.loop import StopState, Worker
from qlib_ext.worker.settings import WorkerSettings

POOL = "attempt"


def _task(i: int, **kwargs) -> dict:
    return {"model": {"class": "ChaosModel", "module_path": "fixtures", "kwargs": {"i": i, "seconds": 0, **kwargs}},
            "dataset": {"class": "TinyDataset", "module_path": "fixtures", "kwargs": {}}, "record": [],
            "qlib_ext": {"pool": POOL, "experiment": POOL, "run_name": f"point {i}"}}


@pytest.fixture
def pool(tmp_path, synth_provider, mongo_url, task_db_name, monkeypatch):
    """A pool, an MLflow store, qlib.init in this process, and ``events``: every run status MLflow stored
    (``("status", run_id, STATUS)``) and every commit/fail with the run's status at that moment."""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_qlib(synth_provider, mlflow_uri)
    client = pymongo.MongoClient(mongo_url)
    tm = GridTaskManager(POOL, client[task_db_name])
    events: list[tuple] = []
    runs = mlflow.MlflowClient(mlflow_uri)

    def update_run_info(store, run_id, run_status, *args, **kwargs):
        events.append(("status", run_id, MlflowStatus.to_string(run_status)))
        return real_update(store, run_id, run_status, *args, **kwargs)

    def commit(manager, claim, result, *args, **kwargs):
        events.append(("commit", result[Outcome.RUN_ID], runs.get_run(result[Outcome.RUN_ID]).info.status))
        if getattr(tm, "steal", False):  # another worker claimed the task meanwhile: the commit is fenced out
            manager.task_pool.update_one({Doc.ID: claim.id}, {"$inc": {Doc.ATTEMPT: 1}})
        return real_commit(manager, claim, result, *args, **kwargs)

    def fail(manager, claim, error, *args, **kwargs):
        events.append(("fail", None, None))
        return real_fail(manager, claim, error, *args, **kwargs)

    real_update, real_commit, real_fail = SqlAlchemyStore.update_run_info, GridTaskManager.commit, GridTaskManager.fail
    monkeypatch.setattr(SqlAlchemyStore, "update_run_info", update_run_info)
    monkeypatch.setattr(GridTaskManager, "commit", commit)
    monkeypatch.setattr(GridTaskManager, "fail", fail)
    settings = WorkerSettings(pool=POOL, mongo_url=mongo_url, mlflow_uri=mlflow_uri, provider_uri=str(synth_provider),
                              db_name=task_db_name, allowed_modules=("qlib.", "qlib_ext.", "fixtures"))
    yield SimpleNamespace(tm=tm, events=events, runs=runs, settings=settings)
    client.close()


def _run_one(pool, **settings) -> dict:
    """Claim and run one task as a worker does; return its document."""
    for key, value in settings.items():
        setattr(pool.settings, key, value)
    assert Worker(pool.settings, StopState(1)).step() is True
    (doc,) = pool.tm.task_pool.find({})
    return doc


def _statuses(events: list[tuple], run_id: str) -> list[str]:
    return [e[2] for e in events if e[0] == "status" and e[1] == run_id]


def _run_id(pool) -> str:
    (run,) = [r for r in pool.runs.search_runs([pool.runs.get_experiment_by_name(POOL).experiment_id])]
    return run.info.run_id


@pytest.mark.parametrize("timeout", [None, 60.0], ids=["in-process", "child-process"])
def test_the_run_is_running_while_its_result_is_committed_and_finished_only_after(pool, timeout):
    pool.tm.create_tasks([_task(1)])
    doc = _run_one(pool, task_timeout=timeout)
    run_id = doc[Doc.OUTCOME][Outcome.RUN_ID]
    assert doc[Doc.STATUS] == TaskStatus.DONE.value
    commits = [e for e in pool.events if e[0] == "commit"]
    assert commits == [("commit", run_id, RunStatus.RUNNING.value)]
    assert _statuses(pool.events, run_id)[-1] == RunStatus.FINISHED.value
    assert pool.events.index(commits[0]) < pool.events.index(("status", run_id, RunStatus.FINISHED.value))
    run = pool.runs.get_run(run_id)
    assert run.info.status == RunStatus.FINISHED.value and run.data.metrics["IC"] == 0.001  # flushed before commit
    assert run.data.tags[Tag.ATTEMPT] == "1" and run.data.tags[Tag.TASK_ID] == str(doc[Doc.ID])
    assert "mlflow.source.name" in run.data.tags and "mlflow.user" in run.data.tags  # MLflow's own context tags


def test_a_refused_commit_ends_the_run_killed_and_it_was_never_finished(pool):
    pool.tm.create_tasks([_task(2)])
    pool.tm.steal = True
    doc = _run_one(pool)
    assert doc[Doc.STATUS] == TaskStatus.RUNNING.value and Doc.OUTCOME not in doc  # the thief's claim
    run_id = _run_id(pool)
    assert [e for e in pool.events if e[0] == "commit"] == [("commit", run_id, RunStatus.RUNNING.value)]
    assert RunStatus.FINISHED.value not in _statuses(pool.events, run_id)
    run = pool.runs.get_run(run_id)
    assert run.info.status == RunStatus.KILLED.value
    assert run.data.tags[Tag.DISCARDED] == EndReason.LOST_BEFORE_COMMIT.value


def test_a_failure_is_recorded_in_the_pool_before_the_run_ends_failed(pool):
    pool.tm.create_tasks([_task(3, fail_on=[3])])
    doc = _run_one(pool)
    assert doc[Doc.STATUS] == TaskStatus.WAITING.value and "poison grid point" in doc[Doc.ERRORS][0]["error"]
    run_id = _run_id(pool)
    assert _statuses(pool.events, run_id)[-1] == RunStatus.FAILED.value
    assert pool.events.index(("fail", None, None)) < pool.events.index(("status", run_id, RunStatus.FAILED.value))
    assert pool.runs.get_run(run_id).info.status == RunStatus.FAILED.value


CATBOOST_CPU = "catboost/private/libs/options/catboost_options.cpp:594: Error: poisson bootstrap is not supported " \
               "on CPU"
"""CatBoost's own words for a setting the CPU cannot run (raised here by ChaosModel: CatBoost is not installed)."""


@pytest.mark.parametrize("task, timeout, cause", [
    (_task(4, bogus=1), None, "got an unexpected keyword argument 'bogus'"),
    (_task(7, fail_on=[7], message=CATBOOST_CPU), 60.0, "poisson bootstrap is not supported on CPU"),
], ids=["bad-keyword", "catboost-cpu-child"])
def test_an_error_that_recurs_identically_fails_the_task_at_its_first_attempt(pool, task, timeout, cause):
    """A bad keyword, a missing class, a setting the hardware cannot run: the same error on every attempt, so the
    first one fails the task with the reason instead of using all three (issue 23 §5)."""
    pool.tm.create_tasks([task], max_attempts=3)
    doc = _run_one(pool, task_timeout=timeout)
    assert doc[Doc.STATUS] == TaskStatus.FAILED.value and doc[Doc.ATTEMPT] == 1
    (error,) = doc[Doc.ERRORS]
    assert cause in error["error"] and "not retried: this error recurs identically" in error["error"]
    assert f"qlib-ext retry {POOL} --failed" in error["error"]
    assert pool.runs.get_run(_run_id(pool)).info.status == RunStatus.FAILED.value


# ---------------------------------------------------------------------- the reaper's one job
def _run(status: str, attempt: str = "2", worker: str = "w:1", run_id: str = "r1", **tags) -> SimpleNamespace:
    tags = {Tag.ATTEMPT: attempt, Tag.WORKER: worker, **tags}
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id=run_id), data=SimpleNamespace(tags=tags))


def _doc(status: str, attempt: int = 2, worker: str = "w:1", committed: str | None = None) -> dict:
    doc = {Doc.STATUS: status, Doc.ATTEMPT: attempt, Doc.WORKER: worker}
    if committed:
        doc[Doc.OUTCOME] = {Outcome.RUN_ID: committed}
    return doc


def test_the_reaper_ends_only_runs_whose_attempt_is_over():
    running = RunStatus.RUNNING.value
    assert _verdict(_run(running), _doc("running")) is None  # live
    assert _verdict(_run(running), None) is None  # its task is gone
    assert _verdict(_run(running, attempt="0"), _doc("done", committed="x")) is None  # a reproduction
    assert _verdict(_run(running), _doc("done", committed="r1"))[0] is RunStatus.FINISHED  # died after its commit
    spooled = _run(running, **{Tag.SPOOLED: "/spool/t-a2.json"})
    assert _verdict(spooled, _doc("waiting")) is None and _verdict(spooled, _doc("failed")) is None  # commit pending
    assert _verdict(spooled, _doc("running", attempt=3, worker="w:2"))[0] is RunStatus.KILLED  # claimed since
    over = (_doc("waiting"), _doc("running", attempt=3), _doc("running", worker="w:2"), _doc("done", committed="r9"))
    for doc in over:
        status, reason = _verdict(_run(running), doc)
        assert status is RunStatus.KILLED and reason.startswith(EndReason.ATTEMPT_OVER.value)
